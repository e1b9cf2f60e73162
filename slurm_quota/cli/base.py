"""The click group and what every command shares: settings, lazy DB access, root check, output.

Owns: the global options (--db / SLURM_QUOTA_DB), the Settings object, helpers to open the
database lazily, to refuse non-root callers and to print JSON. Must not hold SQL or business
rules. Heavy imports (sqlite3, tabulate, requests) stay inside functions so that
`slurm-quota --help` and `slurm-quota charge` start fast.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any

import click

from slurm_quota import DEFAULT_DB_PATH, __version__
from slurm_quota.errors import NotPermitted


@dataclass(frozen=True)
class Settings:
    """Global settings given to the group; commands open the DB only when they need it."""

    db_path: str
    db_given: bool = False  # --db or SLURM_QUOTA_DB was given (it overrides LedgerPath)

    def ledger(self):  # -> config.SQLiteLedger | config.MariaDBLedger
        """The ledger to open: --db / SLURM_QUOTA_DB, else the configuration file's choice
        (SLURM_QUOTA_CONF, /etc/slurm-quota/slurm-quota.conf), else the default file."""
        from slurm_quota import config

        return config.resolve(self.db_path if self.db_given else None, DEFAULT_DB_PATH)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--db",
    "db_path",
    envvar="SLURM_QUOTA_DB",
    default=DEFAULT_DB_PATH,
    show_default=True,
    metavar="PATH",
    help="SQLite ledger file (env SLURM_QUOTA_DB); overrides LedgerPath of the configuration "
    "file (env SLURM_QUOTA_CONF, default /etc/slurm-quota/slurm-quota.conf), which may name a "
    "MariaDB ledger instead.",
)
@click.version_option(__version__, "--version", prog_name="slurm-quota")
@click.pass_context
def cli(ctx: click.Context, db_path: str) -> None:
    """CPU/GPU-minute quotas for Slurm users and accounts.

    Changes of quotas, GPU factors, defaults, consumption (adjust) and settings run on the
    ledger as root, and through the service (SLURM_QUOTA_URL, MUNGE) for Slurm
    administrators and operators on any host; prune, migrate and check --repair need root.
    Exit status: 0 ok, 1 error, 2 usage, 75 temporary failure (DB locked, Slurm or the
    service not answering).
    """
    from click.core import ParameterSource

    given = ctx.get_parameter_source("db_path") in (
        ParameterSource.COMMANDLINE,
        ParameterSource.ENVIRONMENT,
    )
    ctx.obj = Settings(db_path=db_path, db_given=given)


pass_settings = click.make_pass_decorator(Settings)


class WholeNumber(click.IntRange):
    """click.IntRange over ASCII digits only (click.INT also takes ² and ٣ through int())."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        from slurm_quota import numbers

        if isinstance(value, str):
            parsed = numbers.int_or_none(value, signed=True)
            if parsed is None:
                self.fail(
                    f"{numbers.shown(value)} is not a valid integer (digits 0-9).", param, ctx
                )
            value = parsed
        return super().convert(value, param, ctx)


class Seconds(click.FloatRange):
    """click.FloatRange over plain decimals in ASCII digits (no nan, inf, 1_0 or ٣)."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        import re

        from slurm_quota import numbers

        if isinstance(value, str):
            text = value.strip()
            if len(text) > numbers.MAX_DIGITS or not re.fullmatch(
                r"[0-9]+(\.[0-9]*)?|\.[0-9]+", text
            ):
                self.fail(
                    f"{numbers.shown(value)} is not a number of seconds (e.g. 600 or 0.5).",
                    param,
                    ctx,
                )
            value = float(text)
        return super().convert(value, param, ctx)


def require_root(command: str) -> None:
    """Refuse the command unless the real uid is 0 (sudo keeps the real uid 0)."""
    if os.getuid() != 0:
        raise NotPermitted(
            f"`slurm-quota {command}` changes the ledger and is restricted to root "
            f"(you are uid {os.getuid()}); nothing was changed."
        )


def open_db(
    settings: Settings, *, readonly: bool = False, intact: bool = False
):  # -> sqlite3.Connection
    """Open the ledger named by --db (lazy import keeps start-up fast).

    intact=True (admin writes) refuses a file that fails SQLite's integrity check.
    """
    from slurm_quota import db

    return db.connect(settings.ledger(), readonly=readonly, intact=intact)


def echo_json(data: Any) -> None:
    """Print data as JSON on stdout."""
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def warn(message: str) -> None:
    """Print a note for a person on stderr (never mixed into table/JSON stdout)."""
    print(f"slurm-quota: {message}", file=sys.stderr)
