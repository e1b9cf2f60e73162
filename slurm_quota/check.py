"""The consistency check of the ledger (`slurm-quota check`), and its one repair.

Owns what is checked and what may be repaired. The plugin decides every submission from the
per-owner reserved totals that migration 0003's triggers maintain, never from the
preallocations themselves, so a total that drifted (triggers dropped, a row edited by hand,
an `INSERT OR REPLACE` from an old tool, a partial restore) refuses jobs that fit or lets
through jobs that do not, silently. The check finds that, and the rest of what would make
those totals wrong again:

- SQLite's own `PRAGMA quick_check` (page and index structure);
- every trigger and index the migrations create is present;
- each user's and account's reserved CPU/GPU minutes and job count equal the sum over its
  preallocations;
- no preallocation names a user or account without a row (it counts in no total);
- each user's and account's exact consumption (migration 0005: CPU-seconds, GPU-ms) equals
  the sum over its charged runs plus its consumption_adjustments (opening balance, adjust),
  and its seed minute columns equal the one rule (ceil) applied to the exact totals.

Repair (`repaired=True`) recomputes each drifted owner's totals (reserved, and consumed
from charges + adjustments) under the write lock, so
nothing written between the check and the repair is lost, and journals each owner fixed. A
file that fails quick_check gets no other check and no repair. Missing schema objects and
preallocations without an owner are reported with what to do; they are not changed. All
SQL is in db.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slurm_quota import db
from slurm_quota.journal import Journal

ACTION_REPAIR_RESERVED = "repair-reserved"
ACTION_REPAIR_CONSUMED = "repair-consumed"
CONSUMED_REPAIR_REASON = (
    "slurm-quota check --repair: recomputed from the charges and consumption adjustments"
)
_CONSUMED = ("cpu_s", "gpu_ms", "cpu_minutes", "gpu_minutes")
REPAIR_REASON = "slurm-quota check --repair: recomputed from the preallocations"
_TOTALS = ("cpu_minutes", "gpu_minutes", "jobs")
REPAIR_BATCH = 500  # owners per write transaction (bench/check.py: ~50 ms of write lock)


@dataclass(frozen=True)
class Drift:
    """One owner whose stored reserved totals differ from its preallocations."""

    kind: str
    name: str
    stored: tuple  # reserved CPU minutes, GPU minutes, jobs (as stored: a hand edit may
    actual: tuple  # have left text or a fraction); actual ones are whole numbers

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "stored": dict(zip(_TOTALS, self.stored)),
            "actual": dict(zip(_TOTALS, self.actual)),
        }


@dataclass(frozen=True)
class ConsumedDrift:
    """One owner whose exact consumption (or its minutes) differs from what explains it."""

    kind: str
    name: str
    stored: tuple  # consumed CPU-s, GPU-ms, CPU minutes, GPU minutes (as stored)
    actual: tuple  # Σ charges + Σ adjustments, and their minutes by the one rule

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "stored": dict(zip(_CONSUMED, self.stored)),
            "actual": dict(zip(_CONSUMED, self.actual)),
        }


def _consumed_pair(row: tuple) -> tuple[tuple, tuple]:
    """(stored, actual) of a db.consumed_drift / consumed_of row (name first)."""
    from slurm_quota import ledger

    stored = _totals(row[1:5])
    cpu_s, gpu_ms = int(row[5]), int(row[6])
    actual = (cpu_s, gpu_ms, ledger.minutes_from_cpu_s(cpu_s), ledger.minutes_from_gpu_ms(gpu_ms))
    return stored, actual


@dataclass
class Report:
    """What `check` found, and what it repaired."""

    integrity: list[str] = field(default_factory=list)  # quick_check messages; [] = sound
    missing: list[tuple[str, str]] = field(default_factory=list)  # (trigger|index, name)
    drift: list[Drift] = field(default_factory=list)
    unowned: list[tuple[str, str, int]] = field(default_factory=list)  # (kind, name, count)
    consumed: list[ConsumedDrift] = field(default_factory=list)
    repaired: bool = False  # the drift listed was written back to its actual values
    checked: bool = False  # the checks past integrity ran (not on a damaged file)

    @property
    def ok(self) -> bool:
        """Nothing wrong is left in the ledger."""
        drift_left = bool(self.drift or self.consumed) and not self.repaired
        return not (self.integrity or self.missing or drift_left or self.unowned)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form; the checks past integrity are null when they did not run."""
        ran = self.checked
        return {
            "ok": self.ok,
            "integrity": self.integrity or ["ok"],
            "missing_schema_objects": [{"type": t, "name": n} for t, n in self.missing]
            if ran else None,
            "reserved_drift": [d.as_dict() for d in self.drift] if ran else None,
            "repaired": self.repaired,
            "unowned_preallocations": [
                {"kind": k, "name": n, "preallocations": c} for k, n, c in self.unowned
            ] if ran else None,
            "consumed_drift": [d.as_dict() for d in self.consumed] if ran else None,
        }  # fmt: skip


def _totals(values: Any) -> tuple:
    """Three totals as read: whole numbers as int (TOTAL() answers a REAL, exact below 2**53);
    whatever a hand edit stored instead (text, a fraction) is kept as it is, to be shown."""
    return tuple(
        int(v) if isinstance(v, int) or (isinstance(v, float) and v.is_integer()) else v
        for v in values
    )


def _find(conn: Any, report: Report) -> None:
    report.checked = True
    present = db.schema_objects(conn)
    report.missing = [obj for obj in db.expected_schema_objects(conn) if obj not in present]
    report.drift = [
        Drift(
            kind, str(row[0]),
            _totals(row[1:4]),
            _totals(row[4:7]),
        )
        for kind in ("user", "account")
        for row in db.reserved_drift(conn, kind)
    ]
    report.unowned = [
        (kind, name, count)
        for kind in ("user", "account")
        for name, count in db.unowned_preallocations(conn, kind)
    ]
    report.consumed = [
        ConsumedDrift(kind, str(row[0]), *_consumed_pair(row))
        for kind in ("user", "account")
        for row in db.consumed_drift(conn, kind)
    ]


def check(conn: Any, *, repair: bool = False, actor: str = "root") -> Report:
    """Check the ledger open on conn; with repair, fix the reserved totals that drifted.

    A file that fails quick_check is reported as such and nothing else is checked or written.
    Everything is read in one read transaction (one consistent state). The repair writes in
    BEGIN IMMEDIATE transactions (DatabaseUnavailable when another writer holds the ledger
    past the busy timeout).
    """
    report = Report(integrity=db.quick_check(conn))
    if report.integrity:  # what the other checks read may be what is damaged
        return report
    with db.read_snapshot(conn):
        _find(conn, report)
    if repair and (report.drift or report.consumed):
        report.drift = _repair(conn, report.drift, actor)
        report.consumed = _repair_consumed(conn, report.consumed, actor)
        report.repaired = bool(report.drift or report.consumed)
    return report


def _repair_consumed(conn: Any, found: list[ConsumedDrift], actor: str) -> list[ConsumedDrift]:
    """Write back Σ charges + Σ adjustments as the exact totals (and their minutes), in
    batches under the write lock like _repair, re-reading each owner first."""
    fixed = []
    for first in range(0, len(found), REPAIR_BATCH):
        with db.write_transaction(conn):
            for drift in found[first : first + REPAIR_BATCH]:
                row = db.consumed_of(conn, drift.kind, drift.name)
                if row is None:
                    continue
                stored, actual = _consumed_pair(row)
                if stored == actual:
                    continue
                db.set_consumed(conn, drift.kind, drift.name, actual[0], actual[1])
                db.insert_journal(
                    conn,
                    actor=actor,
                    action=ACTION_REPAIR_CONSUMED,
                    target_kind=drift.kind,
                    target=drift.name,
                    field="consumed",
                    old_value=",".join(f"{n}={v}" for n, v in zip(_CONSUMED, stored)),
                    new_value=",".join(f"{n}={v}" for n, v in zip(_CONSUMED, actual)),
                    reason=CONSUMED_REPAIR_REASON,
                )
                fixed.append(ConsumedDrift(drift.kind, drift.name, stored, actual))
    return fixed


def _repair(conn: Any, found: list[Drift], actor: str) -> list[Drift]:
    """Write back the totals of the owners found drifted; return what was written.

    The full scan ran before, without a lock. Under the write lock each owner's totals are
    read again through its index and written with its journal entry, REPAIR_BATCH owners per
    transaction: the lock is held for a few lookups per owner, tens of ms per batch (the
    plugin waits at most 200 ms for it), and a write made since the scan is not lost.
    A lock timeout in a later batch leaves the earlier batches repaired and journaled.
    """
    fixed = []
    for first in range(0, len(found), REPAIR_BATCH):
        with db.write_transaction(conn):
            for drift in found[first : first + REPAIR_BATCH]:
                row = db.reserved_of(conn, drift.kind, drift.name)
                if row is None:  # the owner was deleted meanwhile
                    continue
                stored, actual = _totals(row[:3]), _totals(row[3:])
                if stored == actual:
                    continue
                db.set_reserved(conn, drift.kind, drift.name, *actual)
                Journal(conn, actor, REPAIR_REASON).record(
                    ACTION_REPAIR_RESERVED, drift.kind, drift.name, field="reserved",
                    old=_totals_text(stored), new=_totals_text(actual),
                )
                fixed.append(Drift(drift.kind, drift.name, stored, actual))
    return fixed


def _totals_text(totals: tuple) -> str:
    return ",".join(f"{name}={value}" for name, value in zip(_TOTALS, totals))
