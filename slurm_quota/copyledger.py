"""Copying a whole ledger from one engine to the other (`slurm-quota copy-ledger`), and the
per-table digests that prove two ledgers hold the same rows (`slurm-quota check --digest`).

Owns the order of the copy and what "the same" means: every row of every ledger table
(users, accounts, gpu_factors, settings, jobs_preallocations, charges, journal,
consumption_adjustments), every column, the ids too. The schema itself is each side's
migrations'. All SQL is in db.py; this module must not talk to Slurm.

Why the copy is exact although triggers run on the target: owners are inserted first, then
the preallocations (whose triggers add to the owners' reserved totals) and the rest; then the
owners' reserved and exact consumed columns are written back as the source holds them, and
the consumption_adjustments table (to which a trigger may have added) is replaced by the
source's. The digests of both sides are compared after the commit.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from slurm_quota import db
from slurm_quota.errors import Inconsistent, InvalidInput, SchemaError

# Owner columns the target's triggers may change while the copy runs (written back after).
_OWNER_TOTALS = (
    "reserved_cpu_minutes",
    "reserved_gpu_minutes",
    "reserved_jobs",
    "consumed_cpu_s",
    "consumed_gpu_ms",
)


@dataclass(frozen=True)
class TableDigest:
    """The rows of one ledger table and a SHA-256 over them (key order, sorted columns)."""

    table: str
    rows: int
    sha256: str


@dataclass
class CopyReport:
    """What copy-ledger did: rows per table, and the digests of both sides."""

    source: str
    target: str
    rows: dict[str, int] = field(default_factory=dict)
    source_digests: list[TableDigest] = field(default_factory=list)
    target_digests: list[TableDigest] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        """True when every table's digest is the same on both sides."""
        return self.source_digests == self.target_digests

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "rows": self.rows,
            "equal": self.equal,
            "source_digests": [d.__dict__ for d in self.source_digests],
            "target_digests": [d.__dict__ for d in self.target_digests],
        }


def _canonical(value: Any) -> Any:
    # What both engines return for the same stored value: int, float, str or None (db.py /
    # mariadb.py give DECIMAL as int and DATETIME as SQLite's text). Bytes never occur in a
    # ledger; shown as hex should one be there.
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"hex": bytes(value).hex()}
    return value


def _digest_rows(columns: list[str], rows: list[tuple]) -> str:
    order = sorted(range(len(columns)), key=lambda i: columns[i])
    h = hashlib.sha256()
    h.update(json.dumps([columns[i] for i in order]).encode())
    for row in rows:
        line = json.dumps([_canonical(row[i]) for i in order], ensure_ascii=False)
        h.update(b"\n" + line.encode())
    return h.hexdigest()


def _read(conn: Any) -> dict[str, tuple[list[str], list[tuple]]]:
    return {
        table: (cols, list(db.table_rows(conn, table, cols)))
        for table, _key in db.LEDGER_TABLES
        for cols in [db.table_columns(conn, table)]
    }


def _digests(data: dict[str, tuple[list[str], list[tuple]]]) -> list[TableDigest]:
    return [
        TableDigest(table, len(rows), _digest_rows(cols, rows))
        for table, (cols, rows) in data.items()
    ]


def digests(conn: Any) -> list[TableDigest]:
    """The digest of every ledger table, read in one consistent state."""
    with db.read_snapshot(conn):
        return _digests(_read(conn))


def copy(source: Any, target: Any, *, replace: bool = False) -> CopyReport:
    """Copy every row of the ledger open on `source` into the one open on `target`.

    Both must have the latest schema. A target holding any row is refused (InvalidInput)
    unless replace=True, which empties it first, in the same transaction as the copy.
    Raises Inconsistent when the digests differ after the commit (a value the target
    cannot hold as the source did, e.g. a time stored as free text in a SQLite file).
    """
    report = CopyReport(
        source=str(getattr(source, "ledger_path", "")), target=str(target.ledger_path)
    )
    with db.read_snapshot(source):
        data = _read(source)
    report.source_digests = _digests(data)
    report.rows = {table: len(rows) for table, (_cols, rows) in data.items()}
    for table, (cols, _rows) in data.items():
        if sorted(db.table_columns(target, table)) != sorted(cols):
            raise SchemaError(
                f"The table {table} has other columns in {report.target} than in "
                f"{report.source}; both must be at the same schema version (slurm-quota "
                f"migrate). Nothing was copied."
            )
    with db.write_transaction(target):
        present = {t: db.count_rows(target, t) for t, _k in db.LEDGER_TABLES}
        if any(present.values()) and not replace:
            filled = ", ".join(f"{t} ({n})" for t, n in present.items() if n)
            raise InvalidInput(
                f"The target ledger {report.target} is not empty: {filled}. Nothing was "
                f"copied. Copy into an empty ledger, or give --replace to overwrite it."
            )
        for table, _key in reversed(db.LEDGER_TABLES):
            db.delete_all_rows(target, table)
        for table, (cols, rows) in data.items():
            if table != "consumption_adjustments":
                db.insert_rows(target, table, cols, rows)
        for kind, table in (("user", "users"), ("account", "accounts")):
            cols, rows = data[table]
            key = cols.index("username" if kind == "user" else "account")
            picks = [cols.index(c) for c in _OWNER_TOTALS]
            values = [(row[key], *(row[i] for i in picks)) for row in rows]
            db.restore_owner_columns(target, kind, list(_OWNER_TOTALS), values)
        db.delete_all_rows(target, "consumption_adjustments")
        cols, rows = data["consumption_adjustments"]
        db.insert_rows(target, "consumption_adjustments", cols, rows)
    report.target_digests = digests(target)
    if not report.equal:
        differ = [s.table for s, t in zip(report.source_digests, report.target_digests) if s != t]
        raise Inconsistent(
            f"The copy in {report.target} differs from {report.source} in {', '.join(differ)} "
            f"(compare `slurm-quota check --digest` on both): a value there cannot be stored "
            f"the same way on the target. The target keeps the copy; fix the source's rows "
            f"and copy again with --replace."
        )
    return report
