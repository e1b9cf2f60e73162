"""Allocation period commands: set-period, close-period, periods.

Parse, call one library function (slurm_quota.periods), format. No SQL here.
"""

from __future__ import annotations

import click

from slurm_quota.cli.base import (
    Settings,
    WholeNumber,
    cli,
    echo_json,
    open_db,
    pass_settings,
    require_root,
)


def _owner(user: str | None, account: str | None, default: bool) -> tuple[str, str]:
    chosen = [(k, v) for k, v in (("user", user), ("account", account)) if v is not None]
    if default:
        chosen.append(("site", ""))
    if len(chosen) != 1:
        raise click.UsageError("Give exactly one of --user, --account or --default.")
    return chosen[0]


@cli.command("set-period")
@click.argument("spec", required=False, metavar="[PERIOD]")
@click.option("--user", metavar="USER", help="The period of this user.")
@click.option("--account", metavar="ACCOUNT", help="The period of this account.")
@click.option("--default", "default", is_flag=True, help="The site default (everyone else).")
@click.option(
    "--carry-over",
    "carry_over",
    type=WholeNumber(0, 100),
    default=0,
    show_default=True,
    metavar="PERCENT",
    help="Carry unused quota into the next period, at most this percentage of the quota.",
)
@click.option(
    "--time-zone", metavar="ZONE", help="With --default: the IANA zone of the boundaries."
)
@click.option("--unset", is_flag=True, help="Remove the user's or account's own period.")
@click.option("--reason", metavar="TEXT", default=None, help="Why: recorded in the journal.")
@pass_settings
def set_period_cmd(
    settings: Settings,
    spec: str | None,
    user: str | None,
    account: str | None,
    default: bool,
    carry_over: int,
    time_zone: str | None,
    unset: bool,
    reason: str | None,
) -> None:
    """Set the allocation period of a user, an account or the site default.

    PERIOD is none (consumption never restarts: the default), month, quarter, year, a start
    date and a length repeated (2027-01-01+1y, 2026-09-01+6m, 2026-12-07+2w, 2026-12-01+10d),
    or rolling:N (only the charges of the last N days count). At each calendar boundary the
    period is archived and consumption restarts at 0, or at minus the carried-over unused
    quota (--carry-over, capped at that percentage of the quota). Boundaries are midnights
    of the site's time zone (--default --time-zone; unset: the controller's zone).
    The charge and `reconcile` apply boundaries; the change is journaled.

    \b
    Examples:
      slurm-quota set-period --account physics year --carry-over 10
      slurm-quota set-period --default month --time-zone Europe/Berlin
      slurm-quota set-period --user alice rolling:30
      slurm-quota set-period --user alice --unset
    """
    require_root("set-period")
    from slurm_quota import periods, validate
    from slurm_quota.access import current_actor

    kind, name = _owner(user, account, default)
    reason = validate.parse_reason(reason)
    if unset == (spec is not None):
        raise click.UsageError("Give a PERIOD, or --unset.")
    conn = open_db(settings, intact=True)
    try:
        if unset:
            events = periods.unset_rule(
                conn, kind, name, actor=current_actor(), reason=reason, now=periods.now_s()
            )
            click.echo(f"Period of {kind} {name or '(site default)'}: own rule removed.")
        else:
            assert spec is not None
            events = periods.set_rule(
                conn, kind, name, spec, carry_over, time_zone=time_zone,
                actor=current_actor(), reason=reason, now=periods.now_s(),
            )  # fmt: skip
            target = "site default" if kind == "site" else f"{kind} {name}"
            click.echo(
                f"Period of {target}: {periods.parse_spec(spec).text}, carry-over {carry_over} %."
            )
    finally:
        conn.close()
    for e in events:
        click.echo(f"  {e.action}: {e.detail}")


@cli.command("close-period")
@click.option("--user", metavar="USER", help="Close this user's current period.")
@click.option("--account", metavar="ACCOUNT", help="Close this account's current period.")
@click.option("--reason", metavar="TEXT", default=None, help="Why: recorded in the journal.")
@pass_settings
def close_period_cmd(
    settings: Settings, user: str | None, account: str | None, reason: str | None
) -> None:
    """End the current calendar period of a user or account now.

    The period so far is archived and consumption restarts (with the carry-over), as at a
    boundary; the next boundary stays where it was. For an allocation renewed early.

    \b
    Example:
      slurm-quota close-period --account physics --reason "2027 allocation granted early"
    """
    require_root("close-period")
    from slurm_quota import periods, validate
    from slurm_quota.access import current_actor

    kind, name = _owner(user, account, False)
    reason = validate.parse_reason(reason)
    conn = open_db(settings, intact=True)
    try:
        event = periods.close_now(
            conn, kind, name, actor=current_actor(), reason=reason, now=periods.now_s()
        )
    finally:
        conn.close()
    click.echo(f"Closed the period of {kind} {name}: {event.detail}")


@cli.command("periods")
@click.option("--at", "at", metavar="DATE", help="The archived periods containing DATE.")
@click.option("--user", metavar="USER", help="Only this user.")
@click.option("--account", metavar="ACCOUNT", help="Only this account.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_settings
def periods_cmd(
    settings: Settings, at: str | None, user: str | None, account: str | None, as_json: bool
) -> None:
    """Show the site's period rule and each owner's current period, or (--at) the archived
    periods containing a date: quota, used, carried in and out.

    \b
    Examples:
      slurm-quota periods
      slurm-quota periods --at 2026-11-15 --account physics
    """
    from slurm_quota import db, periods

    if user is not None and account is not None:
        raise click.UsageError("Give --user or --account, not both.")
    kind, name = ("user", user) if user is not None else ("account", account)
    conn = open_db(settings, readonly=True)
    try:
        tz = periods.site_zone(conn)
        if at is not None:
            rows = periods.archive_at(conn, periods.parse_day(at, tz), kind if name else None, name)
            if as_json:
                echo_json(rows)
                return
            _print_archive(rows, at)
            return
        site = db.period_rule(conn, "site", "")
        views = [
            v
            for v in periods.current_periods(conn)
            if name is None or (v.kind, v.name) == (kind, name)
        ]
    finally:
        conn.close()
    zone_name = (site[2] if site and site[2] else None) or periods.local_zone_name()
    if as_json:
        echo_json(
            {
                "default": {
                    "period": site[0] if site else "none",
                    "carry_over_percent": site[1] if site else 0,
                    "time_zone": zone_name,
                },
                "owners": [v.as_dict(tz) for v in views],
            }
        )
        return
    click.echo(
        f"Site default: {site[0] if site else 'none'}"
        + (f", carry-over {site[1]} %" if site and site[1] else "")
        + f"; time zone {zone_name}."
    )
    if not views:
        click.echo("No user or account has a period.")
        return
    from tabulate import tabulate

    rows = []
    for v in views:
        d = v.as_dict(tz)
        rows.append((
            f"{v.kind} {v.name}", d["period"] + ("" if v.own_rule else " (default)"),
            f"{d['carry_over_percent']} %", d["period_start"] or "-", d["period_end"] or "-",
            f"{d['carry_in_cpu_minutes']} / {d['carry_in_gpu_minutes']}",
        ))  # fmt: skip
    click.echo(
        tabulate(
            rows,
            headers=["OWNER", "PERIOD", "CARRY", "START", "END", "CARRIED IN CPU/GPU MIN"],
            disable_numparse=True,
        )
    )


def _print_archive(rows: list[dict], at: str) -> None:
    if not rows:
        click.echo(f"No archived period contains {at}.")
        return
    from tabulate import tabulate

    click.echo(
        tabulate(
            [
                (
                    f"{r['kind']} {r['name']}",
                    r["period"],
                    f"{r['period_start']} .. {r['period_end']}",
                    f"{r['used_cpu_minutes']} / {r['quota_cpu_minutes']}",
                    f"{r['used_gpu_minutes']} / {r['quota_gpu_minutes']}",
                    f"{r['carry_in_cpu_minutes']} -> {r['carry_out_cpu_minutes']}",
                )
                for r in rows
            ],
            headers=[
                "OWNER",
                "PERIOD",
                "FROM .. TO",
                "CPU USED/QUOTA",
                "GPU USED/QUOTA",
                "CPU CARRY IN -> OUT",
            ],  # fmt: skip
            disable_numparse=True,
        )
    )


@cli.command("set-thresholds")
@click.option(
    "--command",
    "command",
    metavar="CMD",
    help="Run for each threshold crossed (absolute path first; '' switches thresholds off).",
)
@click.option("--percents", metavar="LIST", help="Thresholds in percent (default 80,95,100).")
@click.option("--reason", metavar="TEXT", default=None, help="Why: recorded in the journal.")
@pass_settings
def set_thresholds_cmd(
    settings: Settings, command: str | None, percents: str | None, reason: str | None
) -> None:
    """Set the command run once per usage threshold, owner, resource and period.

    When a user's or account's consumption reaches a threshold of its quota (consumed /
    quota, in the current period), CMD runs once with SLURM_QUOTA_EVENT_OWNER_KIND,
    _OWNER, _RESOURCE, _THRESHOLD_PERCENT, _USAGE_PERCENT, _QUOTA_MINUTES,
    _CONSUMED_MINUTES, _RESERVED_MINUTES, _PERIOD_START, _CROSSED_AT and _ID in its
    environment. The charge runs it after it committed and `reconcile` at its end (as the
    ledger's owner), each within a bounded time; a command that fails or hangs (10 s) is
    logged and tried again by the next charge or reconcile, up to 20 times.

    \b
    Examples:
      slurm-quota set-thresholds --command /usr/local/sbin/quota-mail --percents 80,95,100
      slurm-quota set-thresholds --command ''          # off
    """
    require_root("set-thresholds")
    from slurm_quota import thresholds, validate
    from slurm_quota.access import current_actor

    reason = validate.parse_reason(reason)
    conn = open_db(settings, intact=True)
    try:
        cfg = thresholds.set_config(conn, command, percents, actor=current_actor(), reason=reason)
    finally:
        conn.close()
    click.echo(
        f"Thresholds {', '.join(f'{p} %' for p in cfg.percents)}: "
        + (f"run {cfg.command}." if cfg.command else "off (no command).")
    )


@cli.command("thresholds")
@click.option(
    "--limit", type=WholeNumber(1, 100_000), default=50, show_default=True, metavar="N",
    help="Show at most this many events.",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_settings
def thresholds_cmd(settings: Settings, limit: int, as_json: bool) -> None:
    """Show the threshold settings and the thresholds crossed, newest first, with whether
    the command ran (done), is to be retried (its last error) or gave up.

    \b
    Example:
      slurm-quota thresholds --limit 20
    """
    from slurm_quota import db, thresholds

    conn = open_db(settings, readonly=True)
    try:
        cfg = thresholds.config(conn)
        events = [dict(r) for r in db.threshold_events(conn, limit)]
    finally:
        conn.close()
    if as_json:
        echo_json({"command": cfg.command, "percents": list(cfg.percents), "events": events})
        return
    click.echo(
        f"Thresholds {', '.join(f'{p} %' for p in cfg.percents)}; command: "
        f"{cfg.command or 'none (off)'}."
    )
    if not events:
        click.echo("No threshold crossed.")
        return
    from tabulate import tabulate

    def state(e: dict) -> str:
        if e["done_at"] is not None:
            return f"done ({e['attempts']} attempt(s))"
        if e["attempts"] >= thresholds.MAX_ATTEMPTS:
            return f"gave up: {e['last_error']}"
        return f"pending: {e['last_error']}" if e["last_error"] else "pending"

    click.echo(
        tabulate(
            [
                (f"{e['owner_kind']} {e['owner']}", e["resource"].upper(),
                 f"{e['threshold_percent']} %", f"{e['usage_percent']} %",
                 f"{e['consumed_minutes']} / {e['quota_minutes']}", state(e))
                for e in events
            ],
            headers=["OWNER", "RES", "THRESHOLD", "USAGE", "CONSUMED / QUOTA", "COMMAND"],
            disable_numparse=True,
        )
    )  # fmt: skip
