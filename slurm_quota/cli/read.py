"""Read commands: stats (HTTP or local database) and serve.

Parse, call one library function, format. No SQL here. Heavy imports (sqlite3 through
slurm_quota.db, requests, waitress) stay inside the commands so `--help` starts fast.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from slurm_quota import DEFAULT_URL
from slurm_quota.cli.base import (
    Seconds,
    Settings,
    WholeNumber,
    cli,
    echo_json,
    open_db,
    pass_settings,
)

_EXPLICIT = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def _calling_user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError as err:
        raise click.UsageError(
            f"Your uid {os.getuid()} has no user name; name a user: slurm-quota stats USER."
        ) from err


def _served_ledger(settings: Any) -> Any:
    """The ledger serve reads: a Path (SQLite) or the configuration's MariaDBLedger."""
    ledger = settings.ledger()
    return Path(ledger.path) if ledger.kind == "sqlite" else ledger


def _local_mode(ctx: click.Context, local: bool) -> bool:
    """Local when asked (--local) or when the database was named (--db, SLURM_QUOTA_DB)."""
    url_given = ctx.get_parameter_source("url") == ParameterSource.COMMANDLINE
    root = ctx.find_root()
    db_given = root.get_parameter_source("db_path") in _EXPLICIT
    if local and url_given:
        raise click.UsageError("--local reads the database directly; it excludes --url.")
    return local or (db_given and not url_given)


@cli.command("stats")
@click.argument("user", required=False, metavar="[USER]")
@click.option("--user", "user_opt", metavar="USER", help="Show this user and their accounts.")
@click.option("--account", metavar="ACCOUNT", help="Show this account only.")
@click.option("--all", "all_", is_flag=True, help="Show every user and every account.")
@click.option("--hours", is_flag=True, help="Display hours (2 decimals) instead of minutes.")
@click.option("--json", "as_json", is_flag=True, help="Print the /stats JSON instead of tables.")
@click.option(
    "--forecast",
    is_flag=True,
    help="Add when each quota runs out at the pace of the last 14 days, and where each owner "
    "stands in its allocation period (JSON: the key `forecasts`).",
)
@click.option(
    "--local",
    is_flag=True,
    help="Read the database directly instead of asking the service (implied by --db or "
    "SLURM_QUOTA_DB).",
)
@click.option(
    "--url",
    envvar="SLURM_QUOTA_URL",
    default=DEFAULT_URL,
    show_default=True,
    metavar="URL",
    help="Address of `slurm-quota serve` (env SLURM_QUOTA_URL).",
)
@click.option(
    "--color",
    type=click.Choice(["auto", "always", "never"]),
    default="auto",
    show_default=True,
    help="Colour the usage bars; auto = on a terminal unless NO_COLOR is set.",
)
@pass_settings
@click.pass_context
def stats_cmd(
    ctx: click.Context,
    settings: Settings,
    user: str | None,
    user_opt: str | None,
    account: str | None,
    all_: bool,
    hours: bool,
    as_json: bool,
    forecast: bool,
    local: bool,
    url: str,
    color: str,
) -> None:
    """Show consumed, preallocated (open jobs) and quota minutes of users and accounts.

    Without a selector: you and the accounts you have jobs in. The service named by
    SLURM_QUOTA_URL answers; with --local, --db or SLURM_QUOTA_DB the database is read
    directly (the same tables either way). --hours changes the display only.

    \b
    Examples:
      slurm-quota stats                  # you and your accounts
      slurm-quota stats alice            # alice and her accounts (same as --user alice)
      slurm-quota stats --account hpc    # the account hpc only
      slurm-quota stats --all --hours    # everybody, in hours
      slurm-quota stats --account hpc --forecast   # and when it runs out at this pace
      slurm-quota --db /var/lib/state/slurm-quota/slurm-quota.db stats --all
    """
    given = [
        name
        for name, value in (("USER", user), ("--user", user_opt), ("--account", account))
        if value is not None
    ] + (["--all"] if all_ else [])
    if len(given) > 1:
        raise click.UsageError(f"{' and '.join(given)} are mutually exclusive; give one.")
    for label, value in (("USER", user), ("--user", user_opt), ("--account", account)):
        if value is not None and not value.strip():
            raise click.UsageError(f"{label} must not be empty.")
    username = user if user is not None else user_opt
    if username is None and account is None and not all_:
        username = _calling_user()

    from slurm_quota import client, stats, tables

    if _local_mode(ctx, local):
        conn = open_db(settings, readonly=True)
        try:
            payload = stats.stats_payload(conn, username=username, account=account, all_=all_)
            if forecast:
                payload = stats.with_forecasts(conn, payload, int(time.time()))
        finally:
            conn.close()
    else:
        payload = client.fetch_stats(url, username=username, account=account, forecast=forecast)
    if as_json:
        echo_json(payload)
        return
    selector = ("user", username) if username else ("account", account) if account else None
    use_color = tables.color_wanted(color, isatty=sys.stdout.isatty())
    text = tables.render_tables(payload, hours=hours, color=use_color, selector=selector)
    # click.echo would strip the colour codes off a non-terminal even under --color always.
    click.echo(text, nl=False, color=use_color)
    if forecast:
        click.echo("")
        click.echo(
            tables.render_forecast(payload.get("forecasts", []), hours=hours, now=int(time.time())),
            nl=False,
        )


@cli.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option(
    "--port", type=WholeNumber(0, 65535), default=9911, show_default=True, help="TCP port."
)
@click.option(
    "--idle-timeout",
    "idle_timeout_s",
    type=Seconds(min=0),
    default=600,
    show_default=True,
    metavar="SECONDS",
    help="Exit after this long without a request (0 = never).",
)
@click.option(
    "--threads",
    type=WholeNumber(1, 64),
    default=4,
    show_default=True,
    metavar="N",
    help="Worker threads answering complete requests.",
)
@click.option(
    "--max-stale",
    "max_stale_s",
    type=Seconds(min=0, max=3600),
    default=0,
    show_default=True,
    metavar="SECONDS",
    help="Send a whole-ledger answer (/stats, /metrics) built at most this long ago while a "
    "fresh one is built (0 = always wait for the ledger as it is).",
)
@click.option(
    "--roles-ttl",
    "roles_ttl_s",
    type=Seconds(min=0, max=3600),
    default=60,
    show_default=True,
    metavar="SECONDS",
    help="Ask Slurm again for PrivateData, AdminLevels, coordinators and associations after "
    "this long.",
)
@click.option(
    "--no-slurm-roles",
    is_flag=True,
    help="Do not ask Slurm who is who: everyone sees everything (PrivateData is not "
    "followed) and nobody writes through the service. For a host without Slurm.",
)
@click.option(
    "--trust-remote-user",
    is_flag=True,
    help="Take REMOTE_USER (or a proxy's X-Remote-User header) as the caller: only behind a "
    "web front end that authenticates, with this service reachable through it alone.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log every request to stderr.")
@pass_settings
def serve_cmd(
    settings: Settings,
    host: str,
    port: int,
    idle_timeout_s: float,
    threads: int,
    max_stale_s: float,
    roles_ttl_s: float,
    no_slurm_roles: bool,
    trust_remote_user: bool,
    verbose: bool,
) -> None:
    """Serve the API (/health, /stats, /metrics), the dashboard (/) and admin writes
    (POST /admin/COMMAND) over HTTP.

    With systemd socket activation (LISTEN_PID/LISTEN_FDS) the socket passed on fd 3 is
    used and --host/--port are ignored. The server is waitress: one event loop reads every
    connection, and --threads workers answer complete requests. A request carrying a MUNGE
    credential is answered for that user: what they may see follows slurm.conf's
    PrivateData, and Slurm administrators and operators may change quotas. Run it as the
    ledger's owner (SlurmUser), with slurm.conf and munged available.

    \b
    Examples:
      slurm-quota serve --host 127.0.0.1 --port 9911 --idle-timeout 600
      slurm-quota serve --idle-timeout 0        # never exit when idle
      curl 'http://127.0.0.1:9911/stats?username=alice'
    """
    import logging

    from slurm_quota import app, roles, serve

    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    serve.run(
        app.Settings(
            db_path=_served_ledger(settings), max_stale_s=max_stale_s,
            roles=None if no_slurm_roles else roles.Roles(roles_ttl_s),
            trust_remote_user=trust_remote_user,
        ),
        host=host,
        port=port,
        idle_timeout_s=idle_timeout_s,
        threads=threads,
        log_requests=verbose,
    )
