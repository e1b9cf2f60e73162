"""Wall time of the jobcomp call `slurm-quota charge`, start-up included, one job at a time.

    .venv/bin/python bench/charge_startup.py [--runs 40] [--importtime] [--source DIR]

Method (the budget is ≤ 100 ms per job, slurmctld runs one charge after another):
  * a temp ledger migrated by `.venv/bin/slurm-quota --db X migrate`;
  * a fake `scontrol` first on PATH that `cat`s the captured stdout of the "scontrol" entry of
    tests/fixtures/slurm-22.05/charge/plain.json (a real Slurm 22.05 record);
  * env = that fixture's jobcomp "env" + PATH + SLURM_QUOTA_DB, nothing else (as slurmctld);
  * before each run (not timed) `DELETE FROM charges`, so every run really charges (one write
    transaction) instead of stopping at "already charged";
  * each run is a fresh `.venv/bin/slurm-quota charge` process, timed from spawn to exit
    (after one charge that is not counted, so .pyc files exist).
Prints p50/p90/min/max of the wall time (p90 = statistics.quantiles(n=10)[8]), the median
CPU time of the child, the fake scontrol's own cost and the load average. --importtime adds
the top cumulative entries of one `python -X importtime` run of the same charge. --source DIR
runs the slurm_quota package of DIR instead (PYTHONPATH, same venv and console script), e.g.
`git archive <commit> | tar -x -C DIR`, to interleave before/after runs on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
QUOTA_BIN = VENV_BIN / "slurm-quota"
FIXTURE = REPO / "tests" / "fixtures" / "slurm-22.05" / "charge" / "plain.json"


def _setup(tmp: Path, source: str | None) -> tuple[Path, dict[str, str], Path]:
    case = json.loads(FIXTURE.read_text())
    bindir = tmp / "bin"
    bindir.mkdir()
    (bindir / "scontrol.out").write_text(case["scontrol"]["stdout"])
    scontrol = bindir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\ncat '{bindir / 'scontrol.out'}'\n")
    scontrol.chmod(0o755)
    db_path = tmp / "ledger.db"
    env = dict(case["env"], PATH=f"{bindir}:/usr/bin:/bin", SLURM_QUOTA_DB=str(db_path))
    if source:
        env["PYTHONPATH"] = str(Path(source).resolve())
    subprocess.run([str(QUOTA_BIN), "--db", str(db_path), "migrate"], check=True,
                   capture_output=True, env=env)  # fmt: skip
    return db_path, env, scontrol


def _clear_charges(db_path: Path) -> None:
    conn = sqlite3.connect(str(db_path), isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("DELETE FROM charges")
    finally:
        conn.close()


def _child_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _timed(
    argv: list[str], env: dict[str, str]
) -> tuple[float, float, subprocess.CompletedProcess]:
    cpu0 = _child_cpu_s()
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    wall = time.perf_counter() - t0
    return wall * 1000, (_child_cpu_s() - cpu0) * 1000, proc


def _summary(label: str, walls: list[float]) -> str:
    p90 = statistics.quantiles(walls, n=10)[8]
    return (
        f"{label}: p50 {statistics.median(walls):.1f} ms, p90 {p90:.1f} ms, "
        f"min {min(walls):.1f} ms, max {max(walls):.1f} ms (n={len(walls)})"
    )


def bench(runs: int, source: str | None) -> None:
    with tempfile.TemporaryDirectory(prefix="charge-startup-") as tmp_name:
        db_path, env, scontrol = _setup(Path(tmp_name), source)
        _clear_charges(db_path)
        _timed([str(QUOTA_BIN), "charge"], env)  # warm-up, not counted (writes .pyc files)
        load_before = os.getloadavg()
        walls: list[float] = []
        cpus: list[float] = []
        for _ in range(runs):
            _clear_charges(db_path)
            wall, cpu, proc = _timed([str(QUOTA_BIN), "charge"], env)
            if proc.returncode != 0 or ": charged " not in proc.stdout:
                sys.exit(f"charge failed (exit {proc.returncode}): {proc.stdout}{proc.stderr}")
            walls.append(wall)
            cpus.append(cpu)
        scontrol_walls = [_timed([str(scontrol)], env)[0] for _ in range(20)]
        python = shutil.which("python3", path=str(VENV_BIN)) or sys.executable
        pass_walls = [_timed([python, "-c", "pass"], env)[0] for _ in range(20)]
        load_after = os.getloadavg()
    print(_summary("slurm-quota charge" + (f" [{source}]" if source else ""), walls))
    print(f"  child CPU p50 {statistics.median(cpus):.1f} ms")
    print(f"  fake scontrol alone: p50 {statistics.median(scontrol_walls):.1f} ms; "
          f"python -c pass: p50 {statistics.median(pass_walls):.1f} ms")  # fmt: skip
    print(f"  load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")


def importtime(top: int, source: str | None) -> None:
    with tempfile.TemporaryDirectory(prefix="charge-startup-") as tmp_name:
        _, env, _ = _setup(Path(tmp_name), source)
        python = str(VENV_BIN / "python")
        proc = subprocess.run([python, "-X", "importtime", str(QUOTA_BIN), "charge"], env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    if proc.returncode != 0:
        sys.exit(f"charge failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    entries = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, cumulative_us, name = line[len("import time:") :].split("|")
        entries.append((int(cumulative_us), int(self_us), name.rstrip()))
    total = sum(c for c, _, name in entries if not name.startswith("  "))
    print(f"importtime: top-level imports {total / 1000:.1f} ms in total; top {top} cumulative:")
    for cumulative, self_us, name in sorted(entries, reverse=True)[:top]:
        print(f"  {cumulative / 1000:7.1f} ms cumulative {self_us / 1000:6.1f} ms self  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--importtime", action="store_true", help="also show -X importtime")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--source", help="directory holding another slurm_quota to measure")
    args = parser.parse_args()
    bench(args.runs, args.source)
    if args.importtime:
        importtime(args.top, args.source)


if __name__ == "__main__":
    main()
