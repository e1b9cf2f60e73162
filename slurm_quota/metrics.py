"""The Prometheus text (format 0.0.4) of `/metrics`: the whole ledger as gauges and counters.

Owns: the metric families, their names, help texts and labels. It must not write to the
ledger or hold SQL (it reads through db.py's read-model queries).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

from slurm_quota import db
from slurm_quota.ledger import UNLIMITED
from slurm_quota.stats import RowMemo


def _escape_label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float | int | None) -> str:
    if value is None or int(value) == UNLIMITED:
        return "+Inf"
    return str(int(value))


class _Family:
    """One metric family: HELP and TYPE lines, then its samples."""

    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        self.name = name

    def add(self, labels: Mapping[str, str], value: str) -> None:
        if labels:
            inner = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
            self.lines.append(f"{self.name}{{{inner}}} {value}")
        else:
            self.lines.append(f"{self.name} {value}")


def _row_samples(
    label: str, consumed: str, prealloc: str, quota: str, jobs: str, row: Any
) -> tuple[str, str, str, str]:
    """A usage row's samples: (consumed, preallocated, quota) cpu and gpu lines, open jobs."""
    name, cu, cp, cq, gu, gp, gq, _updated, njobs = row
    owner = f'{label}="{_escape_label(name)}"'
    cpu, gpu = f'{{{owner},resource="cpu"}} ', f'{{{owner},resource="gpu"}} '
    return (
        f"{consumed}{cpu}{_number(cu)}\n{consumed}{gpu}{_number(gu)}",
        f"{prealloc}{cpu}{_number(cp)}\n{prealloc}{gpu}{_number(gp)}",
        f"{quota}{cpu}{_number(cq)}\n{quota}{gpu}{_number(gq)}",
        f"{jobs}{{{owner}}} {int(njobs)}",
    )


def metrics_text(
    conn: Any, *, db_path: str | os.PathLike[str] | None = None,
    memos: Mapping[str, RowMemo] | None = None,
) -> str:
    """Prometheus text exposition (format 0.0.4) of the whole ledger.

    Per user and per account (label `username` / `account`, `resource` = cpu|gpu): consumed,
    preallocated and quota minutes (quota +Inf when unlimited), open jobs; charges total and
    charged minutes; rows per table; size of the database files. memos ("user", "account"):
    the service keeps them from one build to the next.
    """
    with db.read_snapshot(conn):
        users = db.stats_users(conn)
        accounts = db.stats_accounts(conn)
        counts = db.ledger_row_counts(conn)
        charges, charged_cpu, charged_gpu = db.charge_totals(conn)
        version = db.ping(conn)
    families: list[_Family] = []
    for kind, label, rows in (("user", "username", users), ("account", "account", accounts)):
        consumed = _Family(
            f"slurm_quota_{kind}_consumed_minutes",
            "gauge",
            f"Minutes charged to the {kind} by completed jobs.",
        )
        prealloc = _Family(
            f"slurm_quota_{kind}_preallocated_minutes",
            "gauge",
            f"Minutes reserved by the {kind}'s open jobs (amount x array elements).",
        )
        quota = _Family(
            f"slurm_quota_{kind}_quota_minutes",
            "gauge",
            f"Quota of the {kind} in minutes (+Inf when unlimited).",
        )
        jobs = _Family(
            f"slurm_quota_{kind}_open_jobs",
            "gauge",
            f"Open jobs (array elements not yet charged) of the {kind}.",
        )
        # Samples written directly (11k rows, 77k lines at 10k users): the label of a row is
        # escaped once, not once per sample; with a memo, only changed rows are rendered.
        render = functools.partial(
            _row_samples, label, consumed.name, prealloc.name, quota.name, jobs.name
        )
        memo = memos.get(kind) if memos is not None else None
        samples = memo.render(rows, render) if memo is not None else map(render, rows)
        for consumed_lines, prealloc_lines, quota_lines, jobs_line in samples:
            consumed.lines.append(consumed_lines)
            prealloc.lines.append(prealloc_lines)
            quota.lines.append(quota_lines)
            jobs.lines.append(jobs_line)
        families += [consumed, prealloc, quota, jobs]
    total = _Family("slurm_quota_charges_total", "counter", "Job runs charged so far.")
    total.add({}, str(charges))
    minutes = _Family(
        "slurm_quota_charged_minutes_total", "counter", "Minutes charged so far, by resource."
    )
    minutes.add({"resource": "cpu"}, str(charged_cpu))
    minutes.add({"resource": "gpu"}, str(charged_gpu))
    rows_f = _Family("slurm_quota_ledger_rows", "gauge", "Rows in each ledger table.")
    for table in sorted(counts):
        rows_f.add({"table": table}, str(counts[table]))
    families += [total, minutes, rows_f]
    if db_path is not None:
        size = _Family(
            "slurm_quota_ledger_file_bytes", "gauge", "Size of the SQLite files of the ledger."
        )
        for suffix, label in (("", "db"), ("-wal", "wal"), ("-shm", "shm")):
            try:
                size.add({"file": label}, str(os.stat(f"{db_path}{suffix}").st_size))
            except OSError:
                continue
        families.append(size)
    schema = _Family("slurm_quota_schema_version", "gauge", "PRAGMA user_version of the ledger.")
    schema.add({}, str(version))
    families.append(schema)
    return "\n".join(line for f in families for line in f.lines) + "\n"
