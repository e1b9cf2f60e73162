"""Reconcile and prune: repair what the jobcomp path missed, release what nobody will charge.

Owns: the batched catch-up charge from accounting, the replay of spooled jobcomp failures,
the orphan-preallocation sweep and `prune`. Built on slurm_quota.charge (one run = one
exactly-once charge) and slurm_quota.slurm (one batched sacct query, one squeue). Must not
format output for people.

Safety rule: a Slurm that does not answer never causes a deletion. Every Slurm query a
decision needs is made (and must succeed) before the first row is deleted.
"""

from __future__ import annotations

import calendar
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from slurm_quota import charge as charge_mod
from slurm_quota import ledger, numbers
from slurm_quota import slurm as slurm_mod
from slurm_quota.errors import (
    ImplausibleSlurmData,
    InvalidInput,
    SlurmQuotaError,
    SlurmUnavailable,
)

log = logging.getLogger(__name__)

# Default window when --since is not given: back from the newest charged end by this margin
# (covers jobcomp lag and a lost backlog), or the last 24 h on an empty ledger.
DEFAULT_MARGIN_S = 6 * 3600
DEFAULT_EMPTY_WINDOW_S = 24 * 3600
DEFAULT_GRACE_MIN = 10
# prune --preallocs: what counts as "recent accounting" (a just-ended job whose jobcomp
# charge is still queued keeps its row until then).
PRUNE_RECENT_S = 3600
# Charges per write transaction in reconcile: short enough for the plugin's lock bound.
BATCH = 200
ORPHAN_REASON = "token neither queued nor in recent accounting"
DEFAULT_SPOOL_DIR = "/var/spool/slurm-quota/charge"


def parse_created_at(value: object) -> int | None:
    """created_at of a preallocation as epoch seconds (UTC text or a number), else None."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return int(value)
    text = str(value).strip().replace("T", " ")
    epoch = numbers.int_or_none(text)
    if epoch is not None:
        return epoch
    text = text.split(".", 1)[0].rstrip("Z")
    try:
        return calendar.timegm(time.strptime(text[:19], "%Y-%m-%d %H:%M:%S"))
    except ValueError:
        return None


def orphan_rows(
    prealloc_rows: Iterable[Mapping[str, object]],
    alive_tokens: Iterable[str],
    *,
    now: int,
    grace_s: int,
) -> list[Mapping[str, object]]:
    """Preallocations no job refers to any more: token not alive and older than the grace.

    A row whose age cannot be read is kept.
    """
    alive = {t.lower() for t in alive_tokens}
    out = []
    for row in prealloc_rows:
        uuid = str(row["job_uuid"])
        if uuid.lower() in alive:
            continue
        created = parse_created_at(row["created_at"])
        if created is None or created > now - grace_s:
            continue
        out.append(row)
    return out


def own_cluster_rows(
    rows: list[dict], cluster: str
) -> tuple[list[dict], int]:
    """On a ledger several clusters share: the preallocations this cluster's plugin made
    (column `cluster`, migration 0007), and how many others were left out (another cluster's,
    or written before 0007 or without a readable ClusterName: no cluster may sweep those)."""
    mine = [r for r in rows if str(r.get("cluster") or "").lower() == cluster.lower()]
    return mine, len(rows) - len(mine)


def _prealloc_text(row: Mapping[str, object]) -> str:
    return json.dumps(
        {
            "username": row["username"],
            "account": row["account"],
            "preallocated_cpu_minutes": row["preallocated_cpu_minutes"],
            "preallocated_gpu_minutes": row["preallocated_gpu_minutes"],
            "array_size": row["array_size"],
            "created_at": row["created_at"],
            "cluster": row.get("cluster", ""),
        },
        sort_keys=True,
    )


def _actor() -> str:
    from slurm_quota.access import current_actor

    return current_actor()


# ---------------------------------------------------------------------------------------
# Spool files written by scripts/slurm-quota-charge-wrapper: <JOBID>.<START>.env
# ---------------------------------------------------------------------------------------


def read_spool_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of one spool file (values verbatim, no shell evaluation)."""
    env: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            env[key.strip()] = value
    return env


def spool_files(spool_dir: Path | None) -> list[Path]:
    """Spooled runs, oldest first (missing dir = nothing spooled)."""
    if spool_dir is None or not spool_dir.is_dir():
        return []
    files = [p for p in spool_dir.iterdir() if p.name.endswith(".env") and p.is_file()]
    files.sort(key=lambda p: (p.stat().st_mtime, p.name))
    return files


# ---------------------------------------------------------------------------------------
# reconcile
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReconcileReport:
    """What one reconcile did (or would do with dry_run)."""

    since: int
    until: int
    dry_run: bool
    sacct_rows: int
    runs: int
    already_charged: int
    charged: int
    cpu_minutes: int
    gpu_minutes: int
    released_elements: int
    spool_replayed: int
    spool_removed: int
    spool_kept: tuple[tuple[str, str], ...]
    queue_jobs: int | None
    orphans: tuple[str, ...]
    sweep_error: str | None
    seconds: float
    charged_keys: tuple[str, ...] = field(default=())
    cpu_s: int = 0  # exact sums of the runs charged; the minutes above follow the one rule
    gpu_ms: int = 0
    periods: tuple[str, ...] = field(default=())  # allocation period changes (periods.py)
    sweep_note: str | None = None  # what the orphan sweep left alone, when that is expected

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly form."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "charged_keys"}
        d["spool_kept"] = [{"file": f, "reason": r} for f, r in self.spool_kept]
        d["orphans"] = list(self.orphans)
        return d


def _queue_or_error(runner):
    """squeue's tokens, or the reason the orphan sweep cannot run."""
    try:
        return slurm_mod.queue_tokens(runner=runner)
    except SlurmUnavailable as err:
        return f"orphan sweep skipped, the queue could not be read: {err}"


def default_since(conn, now: int) -> int:
    """Window start: newest charged end − margin, or the last 24 h on an empty ledger."""
    from slurm_quota import db

    newest = db.newest_charge_end(conn)
    if newest is None:
        return now - DEFAULT_EMPTY_WINDOW_S
    return min(newest, now) - DEFAULT_MARGIN_S


def reconcile(
    conn,
    *,
    since: int | None = None,
    now: int | None = None,
    grace_s: int = DEFAULT_GRACE_MIN * 60,
    spool_dir: Path | None = None,
    dry_run: bool = False,
    runner: slurm_mod.Runner | None = None,
    sleep=time.sleep,
) -> ReconcileReport:
    """Charge every ended run accounting knows and the ledger lacks, replay the spool, then
    release orphan preallocations (only when squeue and sacct both answered)."""
    from slurm_quota import db

    t0 = time.monotonic()
    now = int(time.time()) if now is None else int(now)
    since = default_since(conn, now) if since is None else int(since)
    if since > now:
        raise InvalidInput("--since is in the future; nothing to reconcile.")

    # 0. Allocation periods: rollovers due and windows to age (no Slurm needed, so done
    # even when Slurm does not answer below). Idempotent: a second run finds nothing due.
    period_events: list[str] = []
    if not dry_run:
        from slurm_quota import periods

        period_events = [
            f"{e.kind} {e.name}: {e.action}: {e.detail}"
            for e in periods.maintain_all(conn, now, _actor())
        ]

    # 1. One batched sacct query (SlurmUnavailable propagates: nothing was changed yet).
    # On a ledger shared by several clusters (setting cluster_keys), the runs are this
    # cluster's (sacct's default) and their keys name it: ClusterName, from scontrol.
    shared = charge_mod.clusters_share(conn)
    cluster = slurm_mod.cluster_name(runner=runner) if shared else None
    rows = slurm_mod.sacct_window(since, now, runner=runner)
    runs: dict[str, charge_mod.Run] = {}
    tokens: dict[str, str | None] = {}
    gpus: dict[str, Mapping[str, int]] = {}
    for row in rows:
        run = charge_mod.run_from_sacct(row)
        if run is None:
            continue
        if cluster:
            run = run._replace(cluster=cluster)
        runs[run.charge_key] = run
        tokens[run.charge_key] = row.token
        gpus[run.charge_key] = row.gpus_by_type
    known = db.charged_keys_since(conn, since - DEFAULT_EMPTY_WINDOW_S)
    todo = [run for run in runs.values() if not any(k in known for k in run.keys)]
    todo.sort(key=lambda r: (r.end_time, r.job_id))
    charged_keys: list[str] = []
    cpu_total = gpu_total = released_total = 0
    already = len(runs) - len(todo)
    for i in range(0, len(todo), BATCH):
        chunk = todo[i : i + BATCH]
        if dry_run:
            factors = charge_mod.factors_of(conn)
            for run in chunk:
                alloc = charge_mod.Allocation(tokens[run.charge_key], gpus[run.charge_key])
                if charge_mod.charge_exists(conn, run):
                    already += 1
                    continue
                try:
                    c = charge_mod.compute_charge(run, alloc, factors, "reconcile:sacct")
                except ImplausibleSlurmData as err:
                    log.warning("%s", err)
                    continue
                charged_keys.append(run.charge_key)
                cpu_total += c.cpu_s
                gpu_total += c.gpu_ms
            continue
        with db.write_transaction(conn):
            factors = charge_mod.factors_of(conn)
            for run in chunk:
                alloc = charge_mod.Allocation(tokens[run.charge_key], gpus[run.charge_key])
                try:
                    res = charge_mod.charge_in_transaction(
                        conn, run, alloc, "reconcile:sacct", factors
                    )
                except ImplausibleSlurmData as err:
                    # Raised before this run wrote anything: the others of the batch stay.
                    log.warning("%s", err)
                    continue
                if not res.charged:
                    already += 1
                    continue
                charged_keys.append(run.charge_key)
                cpu_total += res.charge.cpu_s
                gpu_total += res.charge.gpu_ms
                released_total += res.released

    # 2. Spooled jobcomp failures.
    done_keys = set(charged_keys)
    replayed = removed = 0
    kept: list[tuple[str, str]] = []
    for path in spool_files(spool_dir):
        try:
            env = read_spool_file(path)
            run = charge_mod.with_cluster(conn, charge_mod.run_from_env(env), env.get("CLUSTER"))
        except (OSError, InvalidInput, ImplausibleSlurmData) as err:
            kept.append((path.name, f"unreadable: {err}"))
            continue
        if run.charge_key in done_keys or charge_mod.charge_exists(conn, run):
            if not dry_run:
                _unlink(path)
            removed += 1
            continue
        try:
            res = charge_mod.charge_env(
                conn, env, runner=runner, source="spool", dry_run=dry_run, sleep=sleep
            )
        except SlurmQuotaError as err:
            kept.append((path.name, str(err)))
            continue
        if res.charged:
            replayed += 1
            done_keys.add(run.charge_key)
            charged_keys.append(run.charge_key)
            cpu_total += res.charge.cpu_s
            gpu_total += res.charge.gpu_ms
            released_total += res.released
        if not dry_run:
            _unlink(path)  # only now: the charge committed (or was already there)

    # 3. Orphan sweep: needs squeue too; sacct already answered above.
    orphans: list[str] = []
    sweep_error = sweep_note = None
    queue_jobs = None
    queue = _queue_or_error(runner)
    if isinstance(queue, str):
        sweep_error = queue
    else:
        queue_jobs = queue.job_count
        alive = set(queue.tokens) | slurm_mod.tokens_of(rows)
        open_rows = [dict(r) for r in db.list_preallocations(conn)]
        if shared:
            # This cluster's squeue and sacct do not list the other clusters' jobs: only the
            # preallocations its own plugin made (column `cluster`) may be swept.
            open_rows, others = own_cluster_rows(open_rows, str(cluster))
            sweep_note = (
                f"several clusters share this ledger (setting cluster_keys): only cluster "
                f"{cluster}'s preallocations were swept; {others} of other clusters (or of "
                f"no known cluster) left alone"
            )
        candidates = orphan_rows(open_rows, alive, now=now, grace_s=grace_s)
        if dry_run:
            orphans = [str(r["job_uuid"]) for r in candidates]
        elif candidates:
            from slurm_quota.journal import Journal

            journal = Journal(conn, _actor())
            with db.write_transaction(conn):
                for row in candidates:
                    if db.delete_preallocation(conn, str(row["job_uuid"])):
                        orphans.append(str(row["job_uuid"]))
                        journal.record(
                            "reconcile", "preallocation", str(row["job_uuid"]), field="orphan",
                            old=_prealloc_text(row), reason=ORPHAN_REASON,
                        )
    if not dry_run:
        charge_mod.notify_thresholds(conn, None)  # every owner; retries failed commands
        db.checkpoint(conn)  # the plugin never checkpoints; the timer bounds the WAL
    return ReconcileReport(
        since=since,
        until=now,
        dry_run=dry_run,
        sacct_rows=len(rows),
        runs=len(runs),
        already_charged=already,
        charged=len(charged_keys) - replayed,
        cpu_minutes=ledger.minutes_from_cpu_s(cpu_total),
        gpu_minutes=ledger.minutes_from_gpu_ms(gpu_total),
        cpu_s=cpu_total,
        gpu_ms=gpu_total,
        released_elements=released_total,
        spool_replayed=replayed,
        spool_removed=removed,
        spool_kept=tuple(kept),
        queue_jobs=queue_jobs,
        orphans=tuple(orphans),
        sweep_error=sweep_error,
        sweep_note=sweep_note,
        seconds=time.monotonic() - t0,
        charged_keys=tuple(charged_keys),
        periods=tuple(period_events),
    )


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------------
# prune
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PruneReport:
    """What prune deleted (or would delete with dry_run)."""

    dry_run: bool
    preallocations: tuple[str, ...]
    users: tuple[str, ...]
    accounts: tuple[str, ...]

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly form."""
        return {
            "dry_run": self.dry_run,
            "preallocations": list(self.preallocations),
            "users": list(self.users),
            "accounts": list(self.accounts),
        }


def prune(
    conn,
    *,
    preallocs: bool,
    users: bool,
    accounts: bool,
    user: str | None = None,
    account: str | None = None,
    dry_run: bool = False,
    grace_s: int = DEFAULT_GRACE_MIN * 60,
    now: int | None = None,
    runner: slurm_mod.Runner | None = None,
) -> PruneReport:
    """Delete orphan preallocations, then users/accounts with no quota, no usage and no open
    preallocation; journaled. Slurm is asked first: if it does not answer, nothing is deleted.

    --user narrows preallocations and users to that user (accounts are then left alone);
    --account narrows preallocations and accounts (users are then left alone).
    """
    from slurm_quota import db

    now = int(time.time()) if now is None else int(now)
    orphan_candidates: list[dict] = []
    if preallocs:
        queue = slurm_mod.queue_tokens(runner=runner)
        recent = slurm_mod.sacct_window(now - PRUNE_RECENT_S, now, runner=runner)
        alive = set(queue.tokens) | slurm_mod.tokens_of(recent)
        rows = [dict(r) for r in db.list_preallocations(conn, username=user, account=account)]
        if charge_mod.clusters_share(conn):
            # as reconcile: only this cluster's own preallocations can be judged orphans
            rows, _ = own_cluster_rows(rows, slurm_mod.cluster_name(runner=runner))
        orphan_candidates = [dict(r) for r in orphan_rows(rows, alive, now=now, grace_s=grace_s)]
    do_users = users and (account is None or user is not None)
    do_accounts = accounts and (user is None or account is not None)
    if dry_run:
        # Users/accounts whose only blocker is an orphan preallocation would go too.
        user_names = _prunable_after(conn, "user", user, orphan_candidates) if do_users else []
        account_names = (
            _prunable_after(conn, "account", account, orphan_candidates) if do_accounts else []
        )
        return PruneReport(
            True,
            tuple(str(r["job_uuid"]) for r in orphan_candidates),
            tuple(user_names),
            tuple(account_names),
        )
    from slurm_quota.journal import Journal

    journal = Journal(conn, _actor())
    deleted_p: list[str] = []
    deleted_u: list[str] = []
    deleted_a: list[str] = []
    with db.write_transaction(conn):
        for row in orphan_candidates:
            uuid = str(row["job_uuid"])
            if db.delete_preallocation(conn, uuid):
                deleted_p.append(uuid)
                journal.record(
                    "prune", "preallocation", uuid, old=_prealloc_text(row), reason=ORPHAN_REASON,
                )
        for kind, enabled, name, out in (
            ("user", do_users, user, deleted_u),
            ("account", do_accounts, account, deleted_a),
        ):
            if not enabled:
                continue
            for row in db.prunable_owners(conn, kind, name):
                if db.delete_prunable_owner(conn, kind, str(row["name"])):
                    out.append(str(row["name"]))
                    journal.record(
                        "prune", kind, str(row["name"]),
                        old=json.dumps({k: row[k] for k in row.keys()}, sort_keys=True),
                        reason="no quota set, nothing consumed, no open job",
                    )
    return PruneReport(False, tuple(deleted_p), tuple(deleted_u), tuple(deleted_a))


def _prunable_after(conn, kind: str, name: str | None, orphans: list[dict]) -> list[str]:
    """Prunable users/accounts if the orphan preallocations were gone (dry-run view)."""
    from slurm_quota import db

    now_prunable = [str(r["name"]) for r in db.prunable_owners(conn, kind, name)]
    key = "username" if kind == "user" else "account"
    owners_with_orphans = {str(r[key]) for r in orphans}
    if not owners_with_orphans:
        return now_prunable
    # An owner blocked only by orphans: every one of its preallocations is an orphan.
    extra = []
    orphan_ids = {str(r["job_uuid"]) for r in orphans}
    for owner in sorted(owners_with_orphans - set(now_prunable)):
        if name is not None and owner != name:
            continue
        kwargs = {"username": owner} if kind == "user" else {"account": owner}
        open_rows = db.list_preallocations(conn, **kwargs)
        if all(str(r["job_uuid"]) in orphan_ids for r in open_rows) and _no_quota_no_usage(
            conn, kind, owner
        ):
            extra.append(owner)
    return sorted(now_prunable + extra)


def _no_quota_no_usage(conn, kind: str, name: str) -> bool:
    from slurm_quota import db

    row = db.get_owner(conn, kind, name)
    if row is None:
        return False
    return (
        (row["total_consumed_cpu_minutes"] or 0) == 0
        and (row["total_consumed_gpu_minutes"] or 0) == 0
        and (row["quota_cpu_minutes"] if row["quota_cpu_minutes"] is not None else -1) == -1
        and (row["quota_gpu_minutes"] if row["quota_gpu_minutes"] is not None else -1) == -1
    )
