-- 0007: each preallocation names the cluster whose slurmctld made it.
--
-- Several clusters may share one ledger (setting cluster_keys). Until 0007 a preallocation
-- did not say whose job held it, so `reconcile` could not release the orphans of a shared
-- ledger: one cluster's squeue does not list the others' jobs. The plugin now writes its
-- ClusterName (from slurm.conf, lower case as Slurm keeps it) into `cluster`; reconcile and
-- prune on a shared ledger sweep only their own cluster's rows. Rows written before 0007, or
-- by a plugin that could not read ClusterName, keep '' and are never swept on a shared
-- ledger. A seed plugin that does not know the column still inserts (default '').

BEGIN IMMEDIATE;

ALTER TABLE jobs_preallocations ADD COLUMN cluster TEXT NOT NULL DEFAULT '';

PRAGMA user_version = 7;
COMMIT;
