"""Benchmark of `slurm-quota check [--repair]` on a site-sized ledger.

Builds the read-side bench's ledger (10k users, 1k accounts, 100k open preallocations, 50k
charges), then measures, --runs times each:

- `check` in the library: quick_check, the scan (schema objects, reserved drift, unowned
  rows) and the whole call, on a consistent ledger;
- `slurm-quota check` as a process (what an admin or a monitoring probe waits for);
- `check --repair` with --drift owners' totals broken by hand: the whole call and, what the
  plugin feels, the longest time the write lock is held at once (the repair writes
  check.REPAIR_BATCH owners per transaction; the plugin waits at most 200 ms for the lock).

Targets: a read-only check under 1 s; no write lock held over 200 ms, whatever the drift.

    .venv/bin/python bench/check.py [--runs 5] [--drift 10,1000,10000] [--markdown]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from slurm_quota import check, db

HERE = Path(__file__).resolve().parent
SLURM_QUOTA = str(Path(sys.executable).parent / "slurm-quota")
LOCK_TARGET_MS = 200.0
CHECK_TARGET_MS = 1000.0


def _build_ledger():
    spec = importlib.util.spec_from_file_location("bench_serve", HERE / "serve.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_ledger


def _ms(seconds: float) -> float:
    return seconds * 1000.0


def time_library_check(path: Path) -> tuple[float, float, float]:
    """(quick_check ms, whole check ms, scan ms) of one read-only check."""
    conn = db.connect(path, readonly=True)
    try:
        t0 = time.perf_counter()
        db.quick_check(conn)
        t1 = time.perf_counter()
        report = check.check(conn)
        t2 = time.perf_counter()
    finally:
        conn.close()
    assert report.ok, report.as_dict()
    whole = _ms(t2 - t1)
    return _ms(t1 - t0), whole, whole - _ms(t1 - t0)


def time_cli_check(path: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [SLURM_QUOTA, "--db", str(path), "check"], capture_output=True, text=True, check=False
    )
    elapsed = _ms(time.perf_counter() - t0)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return elapsed


def break_totals(path: Path, owners: int) -> None:
    """Add one job to the stored totals of `owners` owners (a tenth of them accounts)."""
    accounts = owners // 10
    conn = sqlite3.connect(path)
    conn.execute(
        "UPDATE users SET reserved_jobs = reserved_jobs + 1 WHERE username IN "
        "(SELECT username FROM users ORDER BY username LIMIT ?)",
        (owners - accounts,),
    )
    conn.execute(
        "UPDATE accounts SET reserved_jobs = reserved_jobs + 1 WHERE account IN "
        "(SELECT account FROM accounts ORDER BY account LIMIT ?)",
        (accounts,),
    )
    conn.commit()
    conn.close()


def time_repair(path: Path, owners: int) -> tuple[float, float]:
    """(whole repair ms, longest write lock ms) with `owners` totals broken beforehand."""
    break_totals(path, owners)
    held: list[float] = []
    real = db.write_transaction

    @contextlib.contextmanager
    def timed(conn):  # BEGIN IMMEDIATE to the end of COMMIT (nothing else writes here)
        start = time.perf_counter()
        with real(conn):
            yield conn
        held.append(_ms(time.perf_counter() - start))

    db.write_transaction = timed  # type: ignore[assignment]
    conn = db.connect(path)
    try:
        t0 = time.perf_counter()
        report = check.check(conn, repair=True, actor="bench")
        whole = _ms(time.perf_counter() - t0)
    finally:
        conn.close()
        db.write_transaction = real  # type: ignore[assignment]
    assert report.repaired and report.ok and len(report.drift) == owners, len(report.drift)
    return whole, max(held)


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} / {max(values):.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--drift", default="10,1000,10000", help="drifted owners per repair run")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    drifts = [int(n) for n in args.drift.split(",")]
    with tempfile.TemporaryDirectory(prefix="sq-bench-check-") as tmp:
        path = Path(tmp) / "ledger.db"
        t0 = time.perf_counter()
        _build_ledger()(path, users=10_000, accounts=1_000, preallocs=100_000, charges=50_000)
        print(f"ledger built in {time.perf_counter() - t0:.1f} s "
              f"({path.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)  # fmt: skip
        lib = [time_library_check(path) for _ in range(args.runs)]
        cli = [time_cli_check(path) for _ in range(args.runs)]
        repairs = {n: [time_repair(path, n) for _ in range(args.runs)] for n in drifts}
    rows = [
        ("check: PRAGMA quick_check", summary([r[0] for r in lib]), ""),
        ("check: scan (schema, drift, unowned)", summary([r[2] for r in lib]), ""),
        ("check: whole library call", summary([r[1] for r in lib]),
         f"≤ {CHECK_TARGET_MS:.0f} ms"),
        ("`slurm-quota check` process", summary(cli), f"≤ {CHECK_TARGET_MS:.0f} ms"),
    ]  # fmt: skip
    for n, runs in repairs.items():
        rows.append((f"check --repair, {n} owners drifted: whole", summary([r[0] for r in runs]),
                     ""))  # fmt: skip
        rows.append((f"check --repair, {n} owners drifted: longest write lock",
                     summary([r[1] for r in runs]), f"≤ {LOCK_TARGET_MS:.0f} ms"))  # fmt: skip
    if args.markdown:
        print(f"| step ({args.runs} runs) | median / max ms | target |")
        print("|---|---|---|")
        for name, value, target in rows:
            print(f"| {name} | {value} | {target} |")
    else:
        for name, value, target in rows:
            print(f"{name:55s} {value:>18s} ms  {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
