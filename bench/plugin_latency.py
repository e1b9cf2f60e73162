"""Benchmark the job_submit plugin: decision latency, and sbatch throughput on the lab.

1. Latency: lua/job_submit.lua under the real lua5.1 + LuaDBI + SQLite (WAL), on a ledger with
   10k users (finite quotas, so every check runs in full), 100 accounts and 1k vs 100k open
   preallocations spread over the users. bench/plugin_latency_driver.lua times each
   slurm_job_submit call (monotonic clock around the call only) and the connection open alone.
2. Throughput (--lab): sequential `sbatch --hold --uid=alice` into the project's Slurm lab,
   with our plugin vs a no-op job_submit.lua, interleaved rounds; ratio = ours / no-op.

    .venv/bin/python bench/plugin_latency.py [--calls 2000] [--lab] [--lab-jobs 100]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from slurm_quota import db  # noqa: E402

PLUGIN = REPO / "lua" / "job_submit.lua"
DRIVER = REPO / "bench" / "plugin_latency_driver.lua"
NOOP_PLUGIN = """function slurm_job_submit(job_desc, part_list, submit_uid)
    job_desc.admin_comment = "noop"
    return slurm.SUCCESS
end
function slurm_job_modify(job_desc, job_rec, part_list, modify_uid)
    return slurm.SUCCESS
end
return slurm.SUCCESS
"""


def build_ledger(path: Path, users: int, accounts: int, preallocs: int, seed: int = 1) -> Path:
    """A migrated ledger with `users` users, `accounts` accounts and open preallocations."""
    db.migrate(path)
    rnd = random.Random(seed)
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO accounts (account, quota_cpu_minutes, quota_gpu_minutes) VALUES (?, ?, ?)",
        [(f"acct{a:03d}", 10**12, 10**12) for a in range(accounts)],
    )
    conn.executemany(
        "INSERT INTO users (username, quota_cpu_minutes, total_consumed_cpu_minutes, "
        "quota_gpu_minutes) VALUES (?, ?, ?, ?)",
        [(f"user{u:05d}", 10**12, rnd.randrange(10**6), 10**12) for u in range(users)],
    )
    conn.executemany(
        "INSERT INTO gpu_factors (gpu_type, factor) VALUES (?, ?)",
        [("default", 1.0), ("h100", 2.0), ("a100", 1.0)],
    )
    conn.executemany(
        "INSERT INTO jobs_preallocations (job_uuid, username, account, "
        "preallocated_cpu_minutes, preallocated_gpu_minutes, array_size) VALUES (?, ?, ?, ?, ?, ?)",
        [
            (f"{i:08x}-0000-4000-8000-000000000000", f"user{rnd.randrange(users):05d}",
             f"acct{rnd.randrange(accounts):03d}", rnd.randrange(1, 5000), rnd.randrange(0, 500),
             rnd.choice([1, 1, 1, 10]))
            for i in range(preallocs)
        ],
    )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return path


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def latency(preallocs: int, calls: int, users: int = 10_000, accounts: int = 100) -> dict:
    """Run the driver on a fresh ledger; return p50/p99/mean (µs) and the open cost."""
    with tempfile.TemporaryDirectory() as tmp:
        path = build_ledger(Path(tmp) / "bench.db", users, accounts, preallocs)
        users_file = Path(tmp) / "users.txt"
        rnd = random.Random(2)
        users_file.write_text("".join(
            f"user{u:05d} acct{rnd.randrange(accounts):03d}\n" for u in range(users)))
        env = dict(os.environ, SLURM_QUOTA_DB=str(path))
        proc = subprocess.run(
            ["lua5.1", str(DRIVER), str(PLUGIN), str(users_file), str(calls), "200"],
            capture_output=True, text=True, env=env, check=True,
        )
        if proc.stderr.strip():
            raise SystemExit(f"plugin logged errors:\n{proc.stderr[-2000:]}")
        times, opens, rcs = [], [], set()
        for line in proc.stdout.splitlines():
            if line.startswith("OPEN "):
                opens.append(float(line.split()[1]))
            else:
                us, rc = line.split()
                times.append(float(us))
                rcs.add(int(rc))
        conn = sqlite3.connect(str(path))
        final = conn.execute("SELECT COUNT(*) FROM jobs_preallocations").fetchone()[0]
        conn.close()
    return {
        "preallocations": preallocs, "final_preallocations": final, "calls": len(times),
        "p50_us": statistics.median(times), "p99_us": pct(times, 99),
        "mean_us": statistics.fmean(times), "max_us": max(times), "rcs": sorted(rcs),
        "open_p50_us": statistics.median(opens),
    }


def lab_throughput(jobs: int, rounds: int) -> dict:
    """Sequential held sbatch per second on the lab: our plugin vs a no-op plugin."""
    from tests.integration.lab import Lab

    lab = Lab()
    started = False
    if not lab.is_up():
        lab.up()
        started = True
    noop = Path(tempfile.mkdtemp()) / "noop.lua"
    noop.write_text(NOOP_PLUGIN)
    rates: dict[str, list[float]] = {"ours": [], "noop": []}
    try:
        for _ in range(rounds):
            for name, path in (("ours", PLUGIN), ("noop", noop)):
                lab.install_plugin(path)
                time.sleep(1.1)  # slurmctld reloads on an mtime newer in whole seconds
                warm = lab.sbatch("--hold", "--wrap=true", script="")
                assert warm.rc == 0, warm.stderr
                ac = lab.run("scontrol", "-o", "show", "job", str(warm.job_id)).stdout
                marker = "slurm-quota:" if name == "ours" else "AdminComment=noop"
                assert marker in ac, f"{name} plugin not active: {ac}"
                t0 = time.monotonic()
                for _ in range(jobs):
                    res = lab.sbatch("--hold", "--time=10", "-n", "2", script="#!/bin/sh\ntrue\n")
                    assert res.rc == 0, res.stderr
                rates[name].append(jobs / (time.monotonic() - t0))
                lab.cancel_all()
        lab.install_plugin(PLUGIN)
    finally:
        if started:
            lab.down()
    ours, noop_rate = statistics.median(rates["ours"]), statistics.median(rates["noop"])
    return {"jobs_per_round": jobs, "rounds": rounds, "ours_per_s": ours,
            "noop_per_s": noop_rate, "ratio": ours / noop_rate, "all": rates}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--lab", action="store_true", help="also measure sbatch throughput")
    ap.add_argument("--lab-jobs", type=int, default=100)
    ap.add_argument("--lab-rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    small = latency(1_000, args.calls)
    large = latency(100_000, args.calls)
    result = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, "
                   f"{platform.platform()}",
        "small": small, "large": large, "ratio_p99": large["p99_us"] / small["p99_us"],
        "ratio_p50": large["p50_us"] / small["p50_us"],
    }
    if args.lab:
        result["lab"] = lab_throughput(args.lab_jobs, args.lab_rounds)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    for key in ("small", "large"):
        r = result[key]
        print(f"{r['preallocations']:>7} open preallocations: p50 {r['p50_us'] / 1000:.3f} ms, "
              f"p99 {r['p99_us'] / 1000:.3f} ms, mean {r['mean_us'] / 1000:.3f} ms, "
              f"max {r['max_us'] / 1000:.3f} ms over {r['calls']} calls "
              f"(connection open+check+close p50 {r['open_p50_us'] / 1000:.3f} ms)")
    print(f"100k/1k ratio: p99 {result['ratio_p99']:.2f}, p50 {result['ratio_p50']:.2f}")
    if "lab" in result:
        lab = result["lab"]
        print(f"lab sbatch: ours {lab['ours_per_s']:.1f}/s, no-op {lab['noop_per_s']:.1f}/s, "
              f"ratio {lab['ratio']:.2f} (median of {lab['rounds']} rounds x "
              f"{lab['jobs_per_round']} jobs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
