"""slurm-quota: CPU/GPU-minute quotas for Slurm, enforced at submission.

This package owns the Python side: schema migrations, the ledger rules, charging at job
completion, the admin CLI and the read-only HTTP service. The submit-time checks live in
lua/job_submit.lua and share the same SQLite file.
"""

__version__ = "0.1.0"

DEFAULT_DB_PATH = "/var/lib/state/slurm-quota/slurm-quota.db"
# Where `slurm-quota stats` and the dashboard find `slurm-quota serve` (SLURM_QUOTA_URL).
DEFAULT_URL = "http://127.0.0.1:9911/"
