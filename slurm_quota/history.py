"""The history view (`slurm-quota history`): journal rows and charges, newest first.

Owns the records of what happened (JournalEntry, ChargeEntry) and how stored rows become
them. It must not write to the ledger; the rows come from db.py's read queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Union

from slurm_quota import db, numbers
from slurm_quota.errors import InvalidInput
from slurm_quota.validate import parse_name

HISTORY_DEFAULT_LIMIT = 50
HISTORY_MAX_LIMIT = 100_000


@dataclass(frozen=True)
class JournalEntry:
    """One journal row."""

    id: int
    time: datetime | None
    actor: str
    action: str
    target_kind: str
    target: str
    field: str | None
    old_value: str | None
    new_value: str | None
    reason: str | None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (time in UTC, ISO 8601)."""
        return {
            "kind": "journal",
            "id": self.id,
            "time": _iso(self.time),
            "actor": self.actor,
            "action": self.action,
            "target_kind": self.target_kind,
            "target": self.target,
            "field": self.field,
            "old": self.old_value,
            "new": self.new_value,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class ChargeEntry:
    """One charges row: a charged run of a job and the inputs of its charge."""

    id: int
    time: datetime | None
    job_id: int
    array_job_id: int | None
    array_task_id: int | None
    het_job_id: int | None
    het_job_offset: int | None
    username: str
    account: str
    partition: str | None
    job_state: str | None
    start_time: int
    end_time: int
    elapsed_s: int
    cpus: int
    gpus: str
    gpu_factors: str
    cpu_minutes: int
    gpu_minutes: int
    source: str
    cpu_s: int = 0  # the run's exact amounts (migration 0005); the minutes follow the one rule
    gpu_ms: int = 0

    @property
    def display_job_id(self) -> str:
        """The job id as Slurm shows it: 123_4 for an array task, 123+1 for a het component."""
        if self.array_job_id is not None and self.array_task_id is not None:
            return f"{self.array_job_id}_{self.array_task_id}"
        if self.het_job_id is not None and self.het_job_offset is not None:
            return f"{self.het_job_id}+{self.het_job_offset}"
        return str(self.job_id)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (time in UTC, ISO 8601; start/end as epoch seconds as stored)."""
        return {
            "kind": "charge",
            "id": self.id,
            "time": _iso(self.time),
            "job_id": self.job_id,
            "display_job_id": self.display_job_id,
            "array_job_id": self.array_job_id,
            "array_task_id": self.array_task_id,
            "het_job_id": self.het_job_id,
            "het_job_offset": self.het_job_offset,
            "username": self.username,
            "account": self.account,
            "partition": self.partition,
            "state": self.job_state,
            "start_time": self.start_time,
            "end_time": self.end_time,
            "elapsed_s": self.elapsed_s,
            "cpus": self.cpus,
            "gpus": self.gpus,
            "gpu_factors": self.gpu_factors,
            "cpu_minutes": self.cpu_minutes,
            "gpu_minutes": self.gpu_minutes,
            "cpu_s": self.cpu_s,
            "gpu_ms": self.gpu_ms,
            "source": self.source,
        }


HistoryEntry = Union[JournalEntry, ChargeEntry]


def _parse_db_time(value: Any) -> datetime | None:
    """A stored timestamp (CURRENT_TIMESTAMP text, ISO 8601 or epoch seconds) in UTC."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, timezone.utc)
    text = str(value).strip()
    epoch = numbers.int_or_none(text)
    if epoch is not None:
        try:
            return datetime.fromtimestamp(epoch, timezone.utc)
        except (OverflowError, OSError, ValueError):
            return None
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)  # CURRENT_TIMESTAMP is UTC
    return parsed.astimezone(timezone.utc)


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _journal_entry(row: Any) -> JournalEntry:
    return JournalEntry(
        id=int(row["id"]),
        time=_parse_db_time(row["at"]),
        actor=str(row["actor"]),
        action=str(row["action"]),
        target_kind=str(row["target_kind"]),
        target=str(row["target"]),
        field=row["field"],
        old_value=row["old_value"],
        new_value=row["new_value"],
        reason=row["reason"],
    )


def _charge_entry(row: Any) -> ChargeEntry:
    moment = _parse_db_time(row["charged_at"])
    if moment is None:
        moment = _parse_db_time(row["end_time"])
    return ChargeEntry(
        id=int(row["id"]),
        time=moment,
        job_id=int(row["job_id"]),
        array_job_id=_opt_int(row["array_job_id"]),
        array_task_id=_opt_int(row["array_task_id"]),
        het_job_id=_opt_int(row["het_job_id"]),
        het_job_offset=_opt_int(row["het_job_offset"]),
        username=str(row["username"]),
        account=str(row["account"]),
        partition=row["partition"],
        job_state=row["job_state"],
        start_time=int(row["start_time"]),
        end_time=int(row["end_time"]),
        elapsed_s=int(row["elapsed_s"]),
        cpus=int(row["cpus"]),
        gpus=str(row["gpus"] or ""),
        gpu_factors=str(row["gpu_factors"] or ""),
        cpu_minutes=int(row["cpu_minutes"]),
        gpu_minutes=int(row["gpu_minutes"]),
        source=str(row["source"]),
        cpu_s=int(row["cpu_s"]),
        gpu_ms=int(row["gpu_ms"]),
    )


_EPOCH = datetime.fromtimestamp(0, timezone.utc)


def history(
    conn: Any,
    *,
    user: str | None = None,
    account: str | None = None,
    job_id: int | None = None,
    limit: int = HISTORY_DEFAULT_LIMIT,
    period: tuple[int, int] | None = None,
) -> list[HistoryEntry]:
    """Journal and charge rows, newest first, at most `limit` in total.

    --user/--account select that owner's journal rows and charges; --job selects the charges
    of that job (and of its array/het elements) only, since journal rows name no job.
    period (start, end epoch s): only the journal rows written and the runs that ended in it.
    """
    if user is not None and account is not None:
        raise InvalidInput("Give --user or --account, not both.")
    if user is not None:
        user = parse_name("user", user)
    if account is not None:
        account = parse_name("account", account)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= HISTORY_MAX_LIMIT:
        raise InvalidInput(f"--limit must be between 1 and {HISTORY_MAX_LIMIT}.")
    if period is not None:
        if job_id is not None:
            raise InvalidInput("Give --job or --period, not both.")
        return _period_history(conn, user, account, period, limit)
    entries: list[HistoryEntry] = []
    if job_id is None:
        if user is not None:
            rows = db.read_journal(conn, target_kind="user", target=user, limit=limit)
        elif account is not None:
            rows = db.read_journal(conn, target_kind="account", target=account, limit=limit)
        else:
            rows = db.read_journal(conn, limit=limit)
        entries.extend(_journal_entry(r) for r in rows)
    charge_rows = db.read_charges(conn, username=user, account=account, job_id=job_id, limit=limit)
    entries.extend(_charge_entry(r) for r in charge_rows)
    # Newest first; at equal times charges after journal rows is arbitrary but stable.
    entries.sort(key=lambda e: (e.time or _EPOCH, e.id), reverse=True)
    return entries[:limit]


def _utc_text(epoch_s: int) -> str:
    return datetime.fromtimestamp(epoch_s, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _period_history(
    conn: Any, user: str | None, account: str | None, period: tuple[int, int], limit: int
) -> list[HistoryEntry]:
    start, end = period
    kind, target = ("user", user) if user is not None else ("account", account)
    rows = db.read_journal_between(
        conn, _utc_text(start), _utc_text(end), target_kind=kind if target else None,
        target=target, limit=limit,
    )  # fmt: skip
    entries: list[HistoryEntry] = [_journal_entry(r) for r in rows]
    charge_rows = db.read_charges_ended_between(
        conn, start, end, username=user, account=account, limit=limit
    )
    entries.extend(_charge_entry(r) for r in charge_rows)
    entries.sort(key=lambda e: (e.time or _EPOCH, e.id), reverse=True)
    return entries[:limit]
