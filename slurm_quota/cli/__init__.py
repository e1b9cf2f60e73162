"""Command-line interface: `slurm-quota`.

Owns: the entry point and the ONE place where errors become messages and exit codes
(0 ok, 1 error, 2 usage, 75 temporary failure, 130 interrupted; a library error's code is
its class's, slurm_quota.errors). Commands live in the modules of this package by area;
they parse, call one library function and format.
"""

from __future__ import annotations

import sys

import click

from slurm_quota.cli.base import cli
from slurm_quota.errors import (  # noqa: F401  (the EXIT_ codes are the CLI's statuses)
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TEMPFAIL,
    EXIT_USAGE,
    SlurmQuotaError,
)

# Importing the command modules registers their commands on the group.
from slurm_quota.cli import admin, jobs, periods, read  # noqa: E402,F401  isort: skip


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit status instead of exiting."""
    try:
        cli.main(args=argv, prog_name="slurm-quota", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.Abort:
        click.echo("Aborted.", err=True)
        return EXIT_INTERRUPTED
    except click.ClickException as exc:
        exc.show()
        return EXIT_USAGE if isinstance(exc, click.UsageError) else EXIT_ERROR
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        return EXIT_INTERRUPTED
    except SlurmQuotaError as exc:
        click.echo(f"slurm-quota: error: {exc}", err=True)
        return exc.exit_code
    return EXIT_OK


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
