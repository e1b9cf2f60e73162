"""Admin commands: migrate, quotas, adjust, defaults, GPU factors, settings, history.

Parse, call one library function, format. No SQL here. The writes (quotas, adjust, defaults,
GPU factors, settings) pass what was typed to slurm_quota.remote.perform, which checks it in
one place: directly on the ledger for root, through the service for anyone else (an admin or
operator as MUNGE and Slurm say).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import click

from slurm_quota.cli.base import (
    Settings,
    WholeNumber,
    cli,
    echo_json,
    open_db,
    pass_settings,
    require_root,
    warn,
)


@cli.command("migrate")
@pass_settings
def migrate_cmd(settings: Settings) -> None:
    """Create the database or upgrade it (also a seed-system database) to the latest schema.

    \b
    Example:
      slurm-quota --db /var/lib/state/slurm-quota/slurm-quota.db migrate
    """
    require_root("migrate")
    from slurm_quota import db

    ledger = settings.ledger()
    applied = db.migrate(ledger)
    version = db.schema_version(ledger)
    if applied:
        click.echo(f"Applied migrations {', '.join(map(str, applied))}; schema version {version}.")
    else:
        click.echo(f"Schema already at version {version}; nothing to do.")


@cli.command("check")
@click.option(
    "--repair", is_flag=True,
    help="Recompute the reserved and consumed totals that drifted (root; journaled).",
)  # fmt: skip
@click.option(
    "--digest", is_flag=True,
    help="Print the rows and a SHA-256 of each ledger table instead (compare two ledgers).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_settings
def check_cmd(settings: Settings, repair: bool, digest: bool, as_json: bool) -> None:
    """Check the ledger: SQLite integrity, the schema's triggers and indexes, that every
    user's and account's reserved minutes and jobs equal the sum of its preallocations, and
    that its exact consumption (CPU-seconds, GPU-ms) equals its charged runs plus its
    adjustments, with the minutes derived from it by the one rule.

    The plugin decides submissions from those reserved totals. Exit status 0 when nothing
    is wrong (or --repair fixed all of it), 1 when something is left to fix, 75 when the
    ledger is locked. Without --repair nothing is written and root is not required (reading
    needs access to the ledger's directory too, as for history). --repair changes only the
    totals that drifted, journals each, and refuses a file that fails the integrity check.

    \b
    Examples:
      slurm-quota check
      slurm-quota check --repair
      slurm-quota check --digest    # per-table rows and SHA-256: compare two ledgers
    """
    if repair:
        require_root("check --repair")
    if digest:
        if repair:
            raise click.UsageError("--digest reads only; it excludes --repair.")
        _print_digests(settings, as_json)
        return
    from slurm_quota import access, check
    from slurm_quota.errors import Inconsistent

    with _ledger(settings, readonly=not repair, checked_by_caller=True) as conn:
        report = check.check(conn, repair=repair, actor=access.current_actor())
    if as_json:
        echo_json(report.as_dict())
    else:
        _print_check(report)
    if not report.ok:
        raise Inconsistent(" ".join(_check_advice(report, repair)))


def _print_digests(settings: Settings, as_json: bool) -> None:
    from slurm_quota import copyledger

    with _ledger(settings, readonly=True) as conn:
        found = copyledger.digests(conn)
    if as_json:
        echo_json([d.__dict__ for d in found])
        return
    for d in found:
        click.echo(f"{d.table:<24} {d.rows:>9} rows  sha256 {d.sha256}")


@cli.command("copy-ledger")
@click.argument("source", metavar="FROM")
@click.argument("target", metavar="TO")
@click.option(
    "--replace", is_flag=True, help="Overwrite a target that already holds rows (all of them)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def copy_ledger_cmd(source: str, target: str, replace: bool, as_json: bool) -> None:
    """Copy a whole ledger from SQLite to MariaDB or back, exactly, and prove it.

    FROM and TO are a SQLite file (PATH or sqlite:PATH), `mariadb:` (the MariaDB ledger of
    the configuration file, SLURM_QUOTA_CONF) or `mariadb:FILE` (that of another
    configuration file): the password stays in the configuration file. TO is created or
    migrated to the latest schema first; FROM must be at it. A TO that holds any row is
    refused unless --replace. Every table is copied (users, accounts, preallocations,
    factors, settings, charges, journal, adjustments) in one transaction, then the
    per-table digests of both sides are compared (exit 1 when they differ). Stop slurmctld
    (or its plugin) and the timers first: docs/upgrading.md.

    \b
    Examples:
      slurm-quota copy-ledger /var/lib/state/slurm-quota/slurm-quota.db mariadb:
      slurm-quota copy-ledger mariadb: /root/ledger-backup.db
      slurm-quota check --digest          # on each side: the same lines
    """
    require_root("copy-ledger")
    from slurm_quota import config, copyledger, db

    source_ledger = config.ledger_argument(source)
    target_ledger = config.ledger_argument(target)
    if source_ledger == target_ledger:
        raise click.UsageError("FROM and TO are the same ledger.")
    from_conn = db.connect(source_ledger, readonly=True)
    try:
        db.migrate(target_ledger)
        to_conn = db.connect(target_ledger)
        try:
            report = copyledger.copy(from_conn, to_conn, replace=replace)
        finally:
            to_conn.close()
    finally:
        from_conn.close()
    if as_json:
        echo_json(report.as_dict())
        return
    total = sum(report.rows.values())
    click.echo(f"Copied {total} rows from {report.source} to {report.target}:")
    for digest in report.target_digests:
        click.echo(f"  {digest.table:<24} {digest.rows:>9} rows  sha256 {digest.sha256[:16]}")
    click.echo("Both ledgers hold the same rows (per-table digests equal).")


def _print_check(report) -> None:
    """The check report for a person: one section per check, a verdict last."""
    if report.integrity:
        click.echo(f"Integrity: FAILED ({len(report.integrity)} message(s) from quick_check):")
        for message in report.integrity:
            click.echo(f"  {message}")
        click.echo("Schema, reserved totals, owners: not checked in a damaged file.")
        return
    click.echo("Integrity: ok.")
    if report.missing:
        click.echo(f"Schema: {len(report.missing)} object(s) missing:")
        for kind, name in report.missing:
            click.echo(f"  {kind} {name}")
    else:
        click.echo("Schema: every trigger and index present.")
    state = "repaired" if report.repaired else "drifted"
    click.echo(f"Reserved totals: {len(report.drift)} owner(s) {state}.")
    for d in report.drift:
        click.echo(
            f"  {d.kind} {d.name}: stored {d.stored[0]} CPU min, {d.stored[1]} GPU min, "
            f"{d.stored[2]} jobs; preallocations {d.actual[0]} CPU min, {d.actual[1]} GPU "
            f"min, {d.actual[2]} jobs"
        )
    click.echo(f"Consumed totals: {len(report.consumed)} owner(s) {state}.")
    for c in report.consumed:
        click.echo(
            f"  {c.kind} {c.name}: stored {c.stored[0]} CPU-s, {c.stored[1]} GPU-ms "
            f"({c.stored[2]}, {c.stored[3]} min); charges + adjustments {c.actual[0]} CPU-s, "
            f"{c.actual[1]} GPU-ms ({c.actual[2]}, {c.actual[3]} min)"
        )
    click.echo(f"Preallocations without an owner row: {len(report.unowned)} owner(s).")
    for kind, name, count in report.unowned:
        click.echo(f"  {kind} {name}: {count} preallocation(s), counted in no total")
    if report.ok:
        click.echo("Ledger consistent now." if report.repaired else "Ledger consistent.")


def _check_advice(report, repair: bool) -> list[str]:
    """What to do about each kind of finding left (the message of the exit-1 error)."""
    advice = []
    if report.integrity:
        advice.append(
            "The file fails SQLite's integrity check"
            + (", so nothing was repaired" if repair else "")
            + ": restore it from a backup or recover it with `sqlite3 DB .recover`."
        )
    if report.missing:
        advice.append(
            "Triggers or indexes are missing, so the reserved totals will drift again: "
            "recreate them from the package's migrations or restore a backup."
        )
    if report.drift and not report.repaired:
        advice.append(
            "Reserved totals differ from the preallocations: run `slurm-quota check --repair`."
        )
    if report.consumed and not report.repaired:
        advice.append(
            "Consumed totals differ from the charges and adjustments: run "
            "`slurm-quota check --repair`."
        )
    if report.unowned:
        advice.append(
            "Preallocations name a user or account that has no row: setting its quota "
            "creates the row and counts them; `slurm-quota prune --preallocs` removes them "
            "once their jobs are gone."
        )
    return advice


# Quota values may be -1 (unlimited): without this click would read `-1` as an option.
_NEGATIVE_OK = {"ignore_unknown_options": True}

_KIND_LABEL = {"user": "User", "account": "Account"}
_RESOURCE_LABEL = {"cpu": "CPU", "gpu": "GPU"}


def _reason_option(func):
    return click.option(
        "--reason",
        metavar="TEXT",
        default=None,
        help="Why: recorded in the journal with the change.",
    )(func)


def _json_option(func):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(
        func
    )


@contextlib.contextmanager
def _ledger(
    settings: Settings, *, readonly: bool = False, checked_by_caller: bool = False
) -> Iterator[Any]:
    """Open the ledger for one command and close it afterwards.

    A writable open refuses a ledger that fails the integrity check (no admin write into a
    damaged file), unless the command checks that itself (check --repair).
    """
    conn = open_db(settings, readonly=readonly, intact=not (readonly or checked_by_caller))
    try:
        yield conn
    finally:
        conn.close()


def _write(settings: Settings, command: str, **args: Any) -> Any:
    """Run one write command (root: on the ledger; else: through the service)."""
    import os

    from slurm_quota import DEFAULT_URL, remote

    url = os.environ.get("SLURM_QUOTA_URL") or DEFAULT_URL
    return remote.perform(settings.ledger, command, args, url=url)


def _minutes(value: int) -> str:
    from slurm_quota import ledger

    return "∞ (unlimited)" if value == ledger.UNLIMITED else f"{value} minutes"


def _set_quota(
    settings: Settings, command: str, kind: str, resource: str, name: str, n: str, reason
) -> None:
    """Shared body of the four quota commands."""
    change = _write(settings, command, name=name, minutes=n, reason=reason)
    label = f"{_KIND_LABEL[kind]} {change.name}"
    res = _RESOURCE_LABEL[resource]
    if change.created:
        other = "gpu" if resource == "cpu" else "cpu"
        click.echo(
            f"{label} created: {res} quota {_minutes(change.new_minutes)}; "
            f"{_RESOURCE_LABEL[other]} quota {_minutes(change.other_quota_minutes)} "
            f"(default for new {kind}s)."
        )
    elif change.old_minutes == change.new_minutes:
        click.echo(f"{label}: {res} quota unchanged at {_minutes(change.new_minutes)}.")
    else:
        click.echo(
            f"{label}: {res} quota {_minutes(change.old_minutes)} -> "
            f"{_minutes(change.new_minutes)}."
        )


@cli.command("user-quota", context_settings=_NEGATIVE_OK)
@click.argument("user")
@click.argument("n")
@_reason_option
@pass_settings
def user_quota_cmd(settings: Settings, user: str, n: str, reason: str | None) -> None:
    """Set the CPU-minute quota of USER to N (-1 = unlimited). Admins and operators.

    A new user row gets the default GPU quota (see `default-quotas`).

    \b
    Examples:
      sudo slurm-quota user-quota alice 50000
      sudo slurm-quota user-quota bob -1 --reason "PI request"
    """
    _set_quota(settings, "user-quota", "user", "cpu", user, n, reason)


@cli.command("user-gpu-quota", context_settings=_NEGATIVE_OK)
@click.argument("user")
@click.argument("n")
@_reason_option
@pass_settings
def user_gpu_quota_cmd(settings: Settings, user: str, n: str, reason: str | None) -> None:
    """Set the GPU-minute quota of USER to N (-1 = unlimited). Admins and operators.

    A new user row gets the default CPU quota (see `default-quotas`).

    \b
    Examples:
      sudo slurm-quota user-gpu-quota alice 10000
      sudo slurm-quota user-gpu-quota bob -1
    """
    _set_quota(settings, "user-gpu-quota", "user", "gpu", user, n, reason)


@cli.command("account-quota", context_settings=_NEGATIVE_OK)
@click.argument("account")
@click.argument("n")
@_reason_option
@pass_settings
def account_quota_cmd(settings: Settings, account: str, n: str, reason: str | None) -> None:
    """Set the CPU-minute quota of the Slurm ACCOUNT to N (-1 = unlimited). Admins and operators.

    Account names are matched exactly as Slurm reports them (sacctmgr stores them in
    lower case). A new account row gets the default GPU quota.

    \b
    Examples:
      sudo slurm-quota account-quota projx 200000
      sudo slurm-quota account-quota projy -1
    """
    _set_quota(settings, "account-quota", "account", "cpu", account, n, reason)


@cli.command("account-gpu-quota", context_settings=_NEGATIVE_OK)
@click.argument("account")
@click.argument("n")
@_reason_option
@pass_settings
def account_gpu_quota_cmd(settings: Settings, account: str, n: str, reason: str | None) -> None:
    """Set the GPU-minute quota of the Slurm ACCOUNT to N (-1 = unlimited). Admins and operators.

    A new account row gets the default CPU quota.

    \b
    Examples:
      sudo slurm-quota account-gpu-quota projx 50000
      sudo slurm-quota account-gpu-quota projy -1
    """
    _set_quota(settings, "account-gpu-quota", "account", "gpu", account, n, reason)


@cli.command("adjust")
@click.option("--user", "user", metavar="USER", help="Adjust this user.")
@click.option("--account", "account", metavar="ACCOUNT", help="Adjust this account.")
@click.option("--cpu", "cpu", is_flag=True, help="Adjust consumed CPU minutes.")
@click.option("--gpu", "gpu", is_flag=True, help="Adjust consumed GPU minutes.")
@click.option("--minutes", "minutes", metavar="±N", help="Signed delta in minutes (+30, -30).")
@click.option("--hours", "hours", metavar="±N", help="Signed delta in hours (+2, -1.5).")
@_reason_option
@pass_settings
def adjust_cmd(
    settings: Settings,
    user: str | None,
    account: str | None,
    cpu: bool,
    gpu: bool,
    minutes: str | None,
    hours: str | None,
    reason: str | None,
) -> None:
    """Add or subtract consumed minutes of one user or account. Admins and operators.

    Exactly one of --user/--account, one of --cpu/--gpu and one of --minutes/--hours,
    with an explicit sign. The result is clamped at 0 (consumed time never goes negative).
    The user/account must already be in the ledger.

    \b
    Examples:
      sudo slurm-quota adjust --user alice --cpu --minutes=+30
      sudo slurm-quota adjust --user alice --gpu --minutes=-120 --reason "node failure"
      sudo slurm-quota adjust --account projx --cpu --hours=+2
    """
    result = _write(
        settings, "adjust", user=user, account=account, cpu=cpu, gpu=gpu, minutes=minutes,
        hours=hours, reason=reason,
    )
    kind, resource, delta = result.kind, result.resource, result.delta_minutes
    res = _RESOURCE_LABEL[resource]
    clamped = ", clamped at 0" if result.clamped else ""
    click.echo(
        f"{_KIND_LABEL[kind]} {result.name}: consumed {res} minutes "
        f"{result.old_minutes} -> {result.new_minutes} ({delta:+d}{clamped})."
    )
    if result.clamped:
        warn(
            f"note: {delta:+d} would take consumed {res} minutes to "
            f"{result.old_minutes + delta}; clamped at 0 (applied "
            f"{result.new_minutes - result.old_minutes:+d})."
        )


@cli.command("default-quotas")
@_json_option
@pass_settings
def default_quotas_cmd(settings: Settings, as_json: bool) -> None:
    """Show the quotas given to users/accounts when their row is created (∞ = unlimited).

    \b
    Example:
      slurm-quota default-quotas
      slurm-quota default-quotas --json
    """
    from slurm_quota import admin, ledger

    with _ledger(settings, readonly=True) as conn:
        defaults = admin.get_default_quotas(conn)
    values = defaults.as_settings()
    if as_json:
        echo_json(values)
        return
    from tabulate import tabulate

    rows = [(key, ledger.format_quota(v)) for key, v in values.items()]
    click.echo(tabulate(rows, headers=["SETTING", "MINUTES"], disable_numparse=True))


@cli.command("set-default-quotas")
@click.option("--user-cpu", metavar="N", help="Default CPU quota of new users.")
@click.option("--user-gpu", metavar="N", help="Default GPU quota of new users.")
@click.option("--account-cpu", metavar="N", help="Default CPU quota of new accounts.")
@click.option("--account-gpu", metavar="N", help="Default GPU quota of new accounts.")
@_reason_option
@pass_settings
def set_default_quotas_cmd(
    settings: Settings,
    user_cpu: str | None,
    user_gpu: str | None,
    account_cpu: str | None,
    account_gpu: str | None,
    reason: str | None,
) -> None:
    """Set default quotas (minutes, -1 = unlimited) for new rows. Admins and operators.

    Existing users and accounts keep their quotas.

    \b
    Examples:
      sudo slurm-quota set-default-quotas --user-cpu 50000 --account-cpu 200000
      sudo slurm-quota set-default-quotas --user-gpu -1 --account-gpu -1
    """
    from slurm_quota import ledger

    changes = _write(
        settings, "set-default-quotas", user_cpu=user_cpu, user_gpu=user_gpu,
        account_cpu=account_cpu, account_gpu=account_gpu, reason=reason,
    )
    for change in changes:
        click.echo(
            f"{change.key}: {ledger.format_quota(change.old_minutes)} -> "
            f"{ledger.format_quota(change.new_minutes)}"
        )
    click.echo("Applies to users/accounts created from now on; existing rows are unchanged.")


@cli.command("settings")
@_json_option
@pass_settings
def settings_cmd(settings: Settings, as_json: bool) -> None:
    """Show every stored setting: default quotas and what the plugin reads.

    \b
    Example:
      slurm-quota settings
      slurm-quota settings --json
    """
    from slurm_quota import admin

    with _ledger(settings, readonly=True) as conn:
        values = admin.list_settings(conn)
    if as_json:
        echo_json(values)
        return
    if not values:
        click.echo("No settings stored (default quotas are unlimited; no plugin settings).")
        return
    from tabulate import tabulate

    click.echo(tabulate(sorted(values.items()), headers=["SETTING", "VALUE"]))


@cli.command("set-setting")
@click.argument("key")
@click.argument("value", required=False)
@click.option("--unset", is_flag=True, help="Remove the setting instead of setting it.")
@_reason_option
@pass_settings
def set_setting_cmd(
    settings: Settings, key: str, value: str | None, unset: bool, reason: str | None
) -> None:
    """Set a plugin setting. Admins and operators.

    \b
    KEY is one of:
      default_time_minutes     time limit (minutes) of a job that gives none, when its
                               partition has neither DefaultTime nor MaxTime
      node_gpus                GPUs of one node (e.g. gpu:h100:2,gpu:a100:2), taken by an
                               --exclusive job; slurmctld does not tell the plugin
      node_gpus.PARTITION      the same for one partition
      cluster_keys             yes when several clusters share the ledger: each run's
                               charge key names its cluster (set it before the second
                               cluster charges; reconcile and prune then sweep only
                               their own cluster's orphan preallocations)
    Default quotas are set with `set-default-quotas`.

    \b
    Examples:
      sudo slurm-quota set-setting node_gpus gpu:h100:4
      sudo slurm-quota set-setting node_gpus.gpu gpu:a100:8 --reason "new nodes"
      sudo slurm-quota set-setting --unset default_time_minutes
    """
    if unset == (value is not None):
        raise click.UsageError("Give KEY VALUE, or --unset KEY.")
    change = _write(settings, "set-setting", key=key, value=None if unset else value,
                    reason=reason)
    shown = {None: "not set"}
    click.echo(f"{change.key}: {shown.get(change.old, change.old)} -> "
               f"{shown.get(change.new, change.new)}")


@cli.command("gpu-factors")
@_json_option
@pass_settings
def gpu_factors_cmd(settings: Settings, as_json: bool) -> None:
    """Show GPU factors: `default` (for untyped/unknown GPUs) first, then each type.

    \b
    Example:
      slurm-quota gpu-factors
      slurm-quota gpu-factors --json
    """
    from slurm_quota import admin

    with _ledger(settings, readonly=True) as conn:
        factors = admin.gpu_factors(conn)
    if as_json:
        echo_json(
            [
                {"gpu_type": f.gpu_type, "factor": f.factor, "configured": f.configured}
                for f in factors
            ]
        )
        return
    from tabulate import tabulate

    rows = [
        (f.gpu_type, repr(f.factor) + ("" if f.configured else " (built-in, not set)"))
        for f in factors
    ]
    click.echo(tabulate(rows, headers=["GPU TYPE", "FACTOR"], disable_numparse=True))


@cli.command("set-gpu-factor", context_settings=_NEGATIVE_OK)
@click.argument("gpu_type", metavar="TYPE")
@click.argument("factor", metavar="FACTOR")
@_reason_option
@pass_settings
def set_gpu_factor_cmd(settings: Settings, gpu_type: str, factor: str, reason: str | None) -> None:
    """Set the factor (finite, >= 0) that multiplies GPU minutes of GPU TYPE. Admins and operators.

    TYPE `default` applies to untyped GPUs and types without their own factor (1.0 when
    not set). A factor of 0.5 counts 10 GPU minutes as 5.

    \b
    Examples:
      sudo slurm-quota set-gpu-factor h100 0.5
      sudo slurm-quota set-gpu-factor default 1.0
    """
    change = _write(settings, "set-gpu-factor", gpu_type=gpu_type, factor=factor, reason=reason)
    old = "not set" if change.old_factor is None else repr(change.old_factor)
    click.echo(f"GPU factor of {change.gpu_type}: {old} -> {change.new_factor!r}.")


@cli.command("history")
@click.option("--user", "user", metavar="USER", help="Only this user (journal and charges).")
@click.option("--account", "account", metavar="ACCOUNT", help="Only this account.")
@click.option("--job", "job", metavar="JOBID", help="Only charges of this job (or array/het job).")
@click.option(
    "--period", "period", metavar="DATE",
    help="The archived allocation period containing DATE: its totals, then its journal rows "
    "and the runs that ended in it.",
)  # fmt: skip
@click.option(
    "--limit",
    type=WholeNumber(1, 100_000),
    default=50,
    show_default=True,
    help="Show at most this many entries.",
)
@_json_option
@pass_settings
def history_cmd(
    settings: Settings,
    user: str | None,
    account: str | None,
    job: str | None,
    period: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Show quota changes (journal) and charged jobs, newest first.

    Journal rows show who changed what (old -> new) and why; charge rows show the job's
    inputs (elapsed seconds, CPUs, GPUs by type, factors) and the minutes charged.
    Times are local in the table, UTC in --json.

    \b
    Examples:
      slurm-quota history --user alice
      slurm-quota history --account projx --limit 20
      slurm-quota history --job 12345 --json
      slurm-quota history --account physics --period 2026-11-15
    """
    from slurm_quota import history as history_view
    from slurm_quota import validate
    from slurm_quota.errors import InvalidInput

    if user is not None and account is not None:
        raise InvalidInput("history takes --user or --account, not both.")
    if user is not None:
        user = validate.parse_name("user", user)
    if account is not None:
        account = validate.parse_name("account", account)
    job_id = validate.parse_job_id(job)
    with _ledger(settings, readonly=True) as conn:
        archived, span = _period_of(conn, period, user, account)
        entries = history_view.history(
            conn, user=user, account=account, job_id=job_id, limit=limit, period=span
        )
    if as_json:
        echo_json([e.to_json() for e in entries] if period is None else
                  {"periods": archived, "entries": [e.to_json() for e in entries]})  # fmt: skip
        return
    for r in archived:
        click.echo(
            f"Period {r['period_start']} .. {r['period_end']} ({r['period']}) of {r['kind']} "
            f"{r['name']}: used {r['used_cpu_minutes']} of {r['quota_cpu_minutes']} CPU min, "
            f"{r['used_gpu_minutes']} of {r['quota_gpu_minutes']} GPU min; carried in "
            f"{r['carry_in_cpu_minutes']}, out {r['carry_out_cpu_minutes']} CPU min."
        )
    if not entries:
        if user is not None:
            click.echo(f"No history found for user: {user}")
        elif account is not None:
            click.echo(f"No history found for account: {account}")
        elif job_id is not None:
            click.echo(f"No charges found for job: {job_id}")
        else:
            click.echo("No history found.")
        return
    from tabulate import tabulate

    rows = [_history_row(e) for e in entries]
    click.echo(
        tabulate(
            rows,
            headers=["TIME", "EVENT", "TARGET", "CHANGE", "DETAILS"],
            disable_numparse=True,
        )
    )


def _period_of(conn, period: str | None, user: str | None, account: str | None):
    """(archive rows, (start, end)) of the archived period containing the date `period`."""
    if period is None:
        return [], None
    from slurm_quota import periods
    from slurm_quota.errors import InvalidInput, NotFound

    if user is None and account is None:
        raise InvalidInput("history --period needs --user or --account.")
    kind, name = ("user", user) if user is not None else ("account", account)
    rows = periods.archive_at(conn, periods.parse_day(period, periods.site_zone(conn)), kind, name)
    if not rows:
        raise NotFound(f"No archived period of {kind} {name} contains {period}.")
    return rows, (rows[0]["period_start_epoch"], rows[0]["period_end_epoch"])


def _local_time(moment) -> str:
    if moment is None:
        return "?"
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _gpu_s_text(gpu_ms: int) -> str:
    """GPU-milliseconds as GPU-seconds with the decimals that are not zero (8250 -> 8.25)."""
    whole, frac = divmod(int(gpu_ms), 1000)
    return f"{whole}.{frac:03d}".rstrip("0") if frac else str(whole)


def _history_row(entry) -> tuple[str, str, str, str, str]:
    """One table row for a journal or charge entry."""
    from slurm_quota.history import ChargeEntry

    if isinstance(entry, ChargeEntry):
        gpus = entry.gpus or "none"
        details = f"{entry.cpus} CPUs x {entry.elapsed_s} s; GPUs {gpus}"
        if entry.gpu_factors:
            details += f" (factors {entry.gpu_factors})"
        details += f"; {entry.job_state or '?'}"
        return (
            _local_time(entry.time),
            f"charge job {entry.display_job_id}",
            f"user {entry.username} / account {entry.account}",
            f"+{entry.cpu_s} CPU-s, +{_gpu_s_text(entry.gpu_ms)} GPU-s",
            details,
        )
    old = "none" if entry.old_value is None else entry.old_value
    new = "none" if entry.new_value is None else entry.new_value
    change = f"{entry.field}: {old} -> {new}" if entry.field else f"{old} -> {new}"
    details = f"by {entry.actor}"
    if entry.reason:
        details += f": {entry.reason}"
    return (
        _local_time(entry.time),
        entry.action,
        f"{entry.target_kind} {entry.target}",
        change,
        details,
    )
