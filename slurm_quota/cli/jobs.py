"""Job lifecycle commands run by Slurm or root: charge, reconcile, prune.

Parse, call one library function, format. No SQL, no subprocess here. Library imports stay
inside the commands: `charge` runs once per finished job, one after another, so its start-up
time is part of slurmctld's completion throughput.
"""

from __future__ import annotations

import os
import time

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

SPOOL_ENV = "SLURM_QUOTA_SPOOL"
DEFAULT_SPOOL_DIR = "/var/spool/slurm-quota/charge"


@cli.command("charge")
@click.option("--dry-run", is_flag=True, help="Compute and print the charge; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_settings
def charge_cmd(settings: Settings, dry_run: bool, as_json: bool) -> None:
    """Charge one finished job run, exactly once (Slurm's jobcomp/script runs this).

    Reads the job from the jobcomp environment (JOBID, START, END, PROCS, USERNAME, ACCOUNT,
    JOBSTATE, ARRAY*/HETJOB*), its token and allocated GPUs from slurmctld (sacct as a
    fallback), then writes the charge, the consumption and the release of the job's
    preallocation in one transaction. Charging the same run again changes nothing.
    Exit 75 when Slurm or the database cannot answer: the wrapper then spools the job and
    `slurm-quota reconcile` charges it later.

    \b
    Example (what scripts/slurm-quota-charge-wrapper does):
      JOBID=31 START=1795264170 END=1795264171 PROCS=1 USERNAME=alice \\
        ACCOUNT=research JOBSTATE=COMPLETED slurm-quota charge
    """
    from slurm_quota import charge
    from slurm_quota.access import require_ledger_writer

    if not dry_run:
        require_ledger_writer(settings.ledger(), "charge")

    conn = open_db(settings, readonly=dry_run)
    try:
        result = charge.charge_env(conn, os.environ, dry_run=dry_run)
    finally:
        conn.close()
    if as_json:
        echo_json(result.as_dict())
    else:
        click.echo(result.describe())


def _parse_since(text: str | None) -> int | None:
    """--since: epoch seconds, a local date/time, or a relative `-6h` / `2d` / `90m`.

    Digits are ASCII only; the result is a time between the epoch and now.
    """
    from slurm_quota import numbers
    from slurm_quota.errors import InvalidInput

    if text is None:
        return None
    value = text.strip()
    now = int(time.time())
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    rel = value.lstrip("-")
    since: int | None = numbers.int_or_none(value)
    if since is None and rel[-1:] in units:
        age = numbers.int_or_none(rel[:-1])
        if age is not None:
            since = now - age * units[rel[-1]]
    if since is None and value.isascii():
        for fmt in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d"):
            try:
                since = int(time.mktime(time.strptime(value, fmt)))
                break
            except (ValueError, OverflowError, OSError):
                continue
    if since is None:
        raise InvalidInput(
            f"--since {numbers.shown(text)} is not a time: use epoch seconds, "
            f"YYYY-MM-DD[THH:MM[:SS]] (local time) or a relative age like 6h, 2d, 90m."
        )
    if not 0 <= since <= now:
        raise InvalidInput(
            f"--since {numbers.shown(text)} is {'before 1970' if since < 0 else 'in the future'}"
            f": give a time between the epoch and now."
        )
    return since


def _spool_option(func):
    return click.option(
        "--spool",
        "spool_dir",
        envvar=SPOOL_ENV,
        default=DEFAULT_SPOOL_DIR,
        show_default=True,
        metavar="DIR",
        help=f"Where the charge wrapper keeps failed jobs (env {SPOOL_ENV}).",
    )(func)


def _grace_option(func):
    return click.option(
        "--grace",
        "grace_min",
        type=WholeNumber(0, 10**7),
        default=10,
        show_default=True,
        metavar="MINUTES",
        help="Only release preallocations older than this (submissions in flight).",
    )(func)


@cli.command("reconcile")
@click.option("--since", "since_text", metavar="T", default=None,
              help="Window start: epoch, YYYY-MM-DD[THH:MM[:SS]] or 6h/2d "
                   "(default: newest charged end - 6 h, or the last 24 h).")  # fmt: skip
@click.option("--dry-run", is_flag=True, help="Show what would change; change nothing.")
@_grace_option
@_spool_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@pass_settings
def reconcile_cmd(
    settings: Settings,
    since_text: str | None,
    dry_run: bool,
    grace_min: int,
    spool_dir: str,
    as_json: bool,
) -> None:
    """Charge what the jobcomp path missed and release preallocations nobody will charge.

    One batched sacct query over runs that ended since T charges every run not yet in the
    ledger; then spooled jobcomp failures are replayed (a spool file is deleted only after
    its charge committed); then preallocations older than the grace period whose token is
    neither queued/running (squeue) nor in that accounting window are released (journaled).
    Nothing is released unless squeue and sacct both answered. Runs as root or as the
    owner of the ledger file (SlurmUser), like `charge`.

    \b
    Examples:
      slurm-quota reconcile
      slurm-quota reconcile --since 2d --dry-run
    """
    if not dry_run:
        from slurm_quota.access import require_ledger_writer

        require_ledger_writer(settings.ledger(), "reconcile")
    from pathlib import Path

    from slurm_quota import reconcile
    from slurm_quota.errors import SlurmUnavailable

    since = _parse_since(since_text)
    conn = open_db(settings, readonly=dry_run)
    try:
        report = reconcile.reconcile(
            conn,
            since=since,
            grace_s=grace_min * 60,
            spool_dir=Path(spool_dir) if spool_dir else None,
            dry_run=dry_run,
        )
    finally:
        conn.close()
    if as_json:
        echo_json(report.as_dict())
    else:
        _print_reconcile(report)
    if report.sweep_error:
        raise SlurmUnavailable(report.sweep_error)


def _fmt_time(epoch: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _print_reconcile(r) -> None:
    would = "would " if r.dry_run else ""
    click.echo(
        f"Accounting {_fmt_time(r.since)} .. {_fmt_time(r.until)}: {r.sacct_rows} sacct rows, "
        f"{r.runs} ended runs, {r.already_charged} already charged."
    )
    click.echo(
        f"Charged{' (dry run)' if r.dry_run else ''}: {r.charged} runs from accounting, "
        f"{r.spool_replayed} from the spool: {r.cpu_minutes} CPU-min, {r.gpu_minutes} GPU-min; "
        f"{r.released_elements} preallocated element(s) released."
    )
    click.echo(
        f"Spool: {r.spool_removed} file(s) {would}removed as already charged, "
        f"{len(r.spool_kept)} kept."
    )
    for name, reason in r.spool_kept:
        warn(f"spool file {name} kept: {reason}")
    if r.sweep_error:
        warn(r.sweep_error)
    elif r.sweep_note:
        warn(r.sweep_note)
    else:
        click.echo(
            f"Orphans: {len(r.orphans)} preallocation(s) {would}released "
            f"(queue holds {r.queue_jobs} jobs)."
        )
        for uuid in r.orphans:
            click.echo(f"  {would}released {uuid}")
    if r.periods:
        click.echo(f"Allocation periods: {len(r.periods)} change(s).")
        for line in r.periods:
            click.echo(f"  {line}")
    click.echo(f"Done in {r.seconds:.2f} s.")


@cli.command("prune")
@click.option("--preallocs", is_flag=True, help="Orphan preallocations (job no longer queued).")
@click.option("--users", is_flag=True, help="Users with no quota, no usage, no open job.")
@click.option("--accounts", is_flag=True, help="Accounts with no quota, no usage, no open job.")
@click.option("--all", "all_", is_flag=True, help="All three (the default).")
@click.option("--user", metavar="U", default=None, help="Only this user (and its preallocations).")
@click.option("--account", metavar="A", default=None,
              help="Only this account (and its preallocations).")  # fmt: skip
@click.option("--dry-run", is_flag=True, help="Show what would be deleted; delete nothing.")
@_grace_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_settings
def prune_cmd(
    settings: Settings,
    preallocs: bool,
    users: bool,
    accounts: bool,
    all_: bool,
    user: str | None,
    account: str | None,
    dry_run: bool,
    grace_min: int,
    as_json: bool,
) -> None:
    """Delete orphan preallocations and unused users/accounts (journaled). Root only.

    A preallocation goes when no queued or running job carries its token and none ended in
    the last hour (squeue and sacct must both answer, else nothing is deleted: exit 75). A
    user/account goes only with no quota set (-1), nothing consumed and no open preallocation.

    \b
    Examples:
      slurm-quota prune --dry-run
      slurm-quota prune --preallocs --user alice
    """
    if not dry_run:
        require_root("prune")
    from slurm_quota import reconcile

    if all_ or not (preallocs or users or accounts):
        preallocs = users = accounts = True
    conn = open_db(settings, readonly=dry_run, intact=not dry_run)
    try:
        report = reconcile.prune(
            conn,
            preallocs=preallocs,
            users=users,
            accounts=accounts,
            user=user,
            account=account,
            dry_run=dry_run,
            grace_s=grace_min * 60,
        )
    finally:
        conn.close()
    if as_json:
        echo_json(report.as_dict())
        return
    verb = "Would prune" if report.dry_run else "Pruned"
    click.echo(
        f"{verb} {len(report.preallocations)} preallocation(s), {len(report.users)} user(s), "
        f"{len(report.accounts)} account(s)."
    )
    for label, names in (
        ("preallocation", report.preallocations),
        ("user", report.users),
        ("account", report.accounts),
    ):
        for name in names:
            click.echo(f"  {label} {name}")
