-- 0007 (MariaDB): each preallocation names the cluster whose slurmctld made it, as
-- migrations/0007_prealloc_cluster.sql (see it for the reasons).

ALTER TABLE jobs_preallocations ADD COLUMN IF NOT EXISTS cluster VARCHAR(255) NOT NULL DEFAULT '';

UPDATE schema_version SET version = 7 WHERE id = 1 AND version < 7;
