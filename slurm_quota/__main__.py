"""`python3 -m slurm_quota`: the CLI without the console script (e.g. from a source tree)."""

from slurm_quota.cli import run

run()
