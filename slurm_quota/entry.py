"""Console-script entry point of `slurm-quota`.

slurmctld runs `slurm-quota charge` (no arguments) once per finished job, one after another,
so that one call skips loading click (about half of the start-up time) and goes straight to
the charge. Every other command line, including `charge --help`, goes through the click CLI,
whose error mapping both paths share.
"""

from __future__ import annotations

import sys


def run() -> None:
    """Dispatch `slurm-quota charge` to the fast path, everything else to the CLI."""
    if sys.argv[1:] == ["charge"]:
        from slurm_quota.charge import main

        raise SystemExit(main([]))
    from slurm_quota.cli import run as cli_run

    cli_run()
