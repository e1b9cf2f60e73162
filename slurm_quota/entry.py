"""Console-script entry point of `slurm-quota`.

slurmctld runs `slurm-quota charge` (no arguments) once per finished job, one after another,
so that one call skips loading click (about half of the start-up time) and goes straight to
the charge (charge_main, also `python -m slurm_quota.charge`). Every other command line,
including `charge --help`, goes through the click CLI. Both exit with the code of the
error's class (slurm_quota.errors).
"""

from __future__ import annotations

import sys


def run() -> None:
    """Dispatch `slurm-quota charge` to the fast path, everything else to the CLI."""
    if sys.argv[1:] == ["charge"]:
        raise SystemExit(charge_main([]))
    from slurm_quota.cli import run as cli_run

    cli_run()


def charge_main(argv: list[str] | None = None) -> int:
    """`python -m slurm_quota.charge`: `slurm-quota charge` without loading the click CLI.

    Same behaviour, output and exit codes (each error's class carries its code); the
    database comes from SLURM_QUOTA_DB or the configuration file. Exists because slurmctld runs one
    charge after another and click's import is most of the start-up time.
    """
    import os

    from slurm_quota import DEFAULT_DB_PATH
    from slurm_quota.charge import charge_env
    from slurm_quota.errors import SlurmQuotaError

    args = sys.argv[1:] if argv is None else argv
    if args:
        sys.stderr.write("usage: python -m slurm_quota.charge (reads the jobcomp environment)\n")
        return 2
    try:
        from slurm_quota import config, db
        from slurm_quota.access import require_ledger_writer

        ledger = config.resolve(os.environ.get("SLURM_QUOTA_DB") or None, DEFAULT_DB_PATH)
        require_ledger_writer(ledger, "charge")
        # Not fsynced at COMMIT (WAL, synchronous=NORMAL): a power loss can only drop the last
        # charges, which `reconcile` charges again from accounting (DESIGN §6).
        conn = db.connect(ledger, durable=False)
        try:
            result = charge_env(conn, os.environ)
        finally:
            conn.close()
    except SlurmQuotaError as exc:
        sys.stderr.write(f"slurm-quota: error: {exc}\n")
        return exc.exit_code
    sys.stdout.write(result.describe() + "\n")
    return 0
