"""Benchmarks of the completion path: per-job charge wall time, import time, reconcile
throughput, and (on the lab) jobcomp lag under a burst.

    .venv/bin/python bench/charge.py local [--jobs 200]      # no Slurm needed
    SLURM_QUOTA_LAB_DIR=... .venv/bin/python bench/charge.py lab [--burst 200]

local:
  * charge: N runs of the real `slurm-quota charge` process, each with its own jobcomp-like
    environment, against a ledger of 10k users, 100k open preallocations and 100k past
    charges. Slurm is replaced by a tiny /bin/sh `scontrol` that echoes a record built from
    the job's own environment (synthetic, built here), so the figure is our cost; the real
    scontrol's response time is measured separately by `lab`.
  * in-process: the same charge through slurm_quota.charge with an in-memory runner.
  * importtime of `slurm-quota charge --help`.
  * reconcile: a synthetic sacct output of 100k rows (built here in the real field order)
    fed through the runner injection: all new (100k charges), then all already charged.
lab:
  * a burst of one array of N `true` elements; every charge row is timestamped as it
    appears (DB polled every 50 ms) and compared with the element's END: jobcomp lag.
  * real scontrol response time; a real reconcile over the burst with jobcomp disabled.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from slurm_quota import charge as C  # noqa: E402
from slurm_quota import db  # noqa: E402
from slurm_quota import reconcile as R  # noqa: E402
from slurm_quota import slurm as S  # noqa: E402

QUOTA_BIN = Path(sys.executable).parent / "slurm-quota"
N_USERS = 10_000
N_ACCOUNTS = 500
N_PREALLOCS = 100_000
N_CHARGES = 100_000
T0 = 1_790_000_000


def uuid_for(i: int) -> str:
    return f"00000000-0000-4000-8000-{i:012d}"


def populate(path: Path) -> None:
    """A ledger of realistic size (synthetic rows)."""
    db.migrate(path)
    conn = db.connect(path)
    with db.write_transaction(conn):
        conn.executemany(
            "INSERT INTO users (username, quota_cpu_minutes, quota_gpu_minutes, "
            "total_consumed_cpu_minutes) VALUES (?, ?, ?, ?)",
            [(f"user{i:05d}", 100_000, 10_000, i) for i in range(N_USERS)],
        )
        conn.executemany(
            "INSERT INTO accounts (account, quota_cpu_minutes) VALUES (?, ?)",
            [(f"acct{i:03d}", 10_000_000) for i in range(N_ACCOUNTS)],
        )
        conn.executemany(
            "INSERT INTO jobs_preallocations (job_uuid, username, account, "
            "preallocated_cpu_minutes, preallocated_gpu_minutes, array_size, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, '2026-01-01 00:00:00')",
            [(uuid_for(i), f"user{i % N_USERS:05d}", f"acct{i % N_ACCOUNTS:03d}", 60, 0,
              1 + i % 3) for i in range(N_PREALLOCS)],
        )  # fmt: skip
        conn.executemany(
            "INSERT INTO charges (charge_key, job_id, username, account, start_time, end_time, "
            "elapsed_s, cpus, cpu_minutes, gpu_minutes, source) "
            "VALUES (?, ?, ?, ?, ?, ?, 60, 1, 1, 0, 'bench')",
            [(f"{9_000_000 + i}:{T0 + i}", 9_000_000 + i, f"user{i % N_USERS:05d}",
              f"acct{i % N_ACCOUNTS:03d}", T0 + i, T0 + i + 60) for i in range(N_CHARGES)],
        )  # fmt: skip
        conn.execute("INSERT INTO gpu_factors (gpu_type, factor) VALUES ('h100', 2.0)")
    conn.close()


FAKE_SCONTROL = """#!/bin/sh
# synthetic scontrol for the benchmark: one finished record built from the job's own env
echo "JobId=$4 JobName=bench UserId=$USERNAME($UID) Account=$ACCOUNT JobState=COMPLETED \
StartTime=$START EndTime=$END Partition=main NumCPUs=$PROCS \
TRES=cpu=$PROCS,node=1,billing=$PROCS,gres/gpu=1,gres/gpu:h100=1 \
AdminComment=bench slurm-quota:00000000-0000-4000-8000-$(printf %012d $BENCH_I)  StdErr=/dev/null"
"""


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100 * (len(s) - 1)))))
    return s[k]


def bench_charge_process(path, jobs: int, bindir: Path, ledger_env: dict[str, str]) -> dict:
    """path: the ledger as db.connect takes it; ledger_env: how the CLI finds it."""
    (bindir / "scontrol").write_text(FAKE_SCONTROL)
    (bindir / "scontrol").chmod(0o755)
    walls = []
    for i in range(jobs):
        env = {
            "PATH": f"{bindir}:/usr/bin:/bin", **ledger_env,
            "JOBID": str(500_000 + i), "ARRAYJOBID": "0", "ARRAYTASKID": "4294967294",
            "USERNAME": f"user{i % N_USERS:05d}", "UID": "1001",
            "ACCOUNT": f"acct{i % N_ACCOUNTS:03d}", "PARTITION": "main", "PROCS": "4",
            "START": str(T0 + 10 * i), "END": str(T0 + 10 * i + 3599), "JOBSTATE": "COMPLETED",
            "BENCH_I": str(i),
        }  # fmt: skip
        t = time.perf_counter()
        p = subprocess.run([str(QUOTA_BIN), "charge"], env=env, capture_output=True, text=True)
        walls.append((time.perf_counter() - t) * 1000)
        if p.returncode != 0 or "charged user" not in p.stdout:
            raise SystemExit(f"charge failed: {p.returncode} {p.stdout} {p.stderr}")
    conn = db.connect(path)
    released = conn.execute(
        "SELECT COUNT(*) FROM charges WHERE source = 'jobcomp:scontrol' AND released_prealloc = 1"
    ).fetchone()[0]
    conn.close()
    assert released == jobs, released
    # The fake scontrol alone (process spawn + echo), to separate it from our cost.
    sc = []
    for i in range(50):
        t = time.perf_counter()
        subprocess.run(
            [str(bindir / "scontrol"), "show", "job", "-o", str(i)],
            env={"BENCH_I": "1", "PATH": "/usr/bin:/bin"},
            capture_output=True,
        )
        sc.append((time.perf_counter() - t) * 1000)
    return {
        "jobs": jobs,
        "p50_ms": round(statistics.median(walls), 1),
        "p99_ms": round(pct(walls, 99), 1),
        "max_ms": round(max(walls), 1),
        "fake_scontrol_p50_ms": round(statistics.median(sc), 1),
    }


def bench_charge_inprocess(path, jobs: int) -> dict:
    conn = db.connect(path)
    times = []
    for i in range(jobs):
        jid = 700_000 + i
        env = {"JOBID": str(jid), "USERNAME": f"user{i % N_USERS:05d}", "ACCOUNT": "acct001",
               "PROCS": "8", "START": str(T0 + i), "END": str(T0 + i + 59),
               "JOBSTATE": "COMPLETED", "ARRAYJOBID": "0", "ARRAYTASKID": "4294967294"}  # fmt: skip
        line = (f"JobId={jid} UserId=x(1) Account=acct001 JobState=COMPLETED StartTime={T0 + i} "
                f"EndTime={T0 + i + 59} NumCPUs=8 TRES=cpu=8,gres/gpu:h100=2,gres/gpu=2 "
                f"AdminComment=slurm-quota:{uuid_for(10_000 + i)}\n")  # fmt: skip
        runner = (lambda out: (lambda argv, t: S.RunResult(0, out, "")))(line)
        t = time.perf_counter()
        C.charge_env(conn, env, runner=runner)
        times.append((time.perf_counter() - t) * 1000)
    conn.close()
    return {"jobs": jobs, "p50_ms": round(statistics.median(times), 2),
            "p99_ms": round(pct(times, 99), 2)}  # fmt: skip


def bench_importtime() -> dict:
    p = subprocess.run([sys.executable, "-X", "importtime", str(QUOTA_BIN), "charge", "--help"],
                       capture_output=True, text=True)  # fmt: skip
    rows = []
    for line in p.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m:
            rows.append((int(m.group(2)), len(m.group(3)), m.group(4)))
    top = [r for r in rows if r[1] == 1]
    total_us = sum(r[0] for r in top)
    heavy = sorted(top, reverse=True)[:6]
    walls = []
    for _ in range(10):
        t = time.perf_counter()
        subprocess.run([str(QUOTA_BIN), "charge", "--help"], capture_output=True)
        walls.append((time.perf_counter() - t) * 1000)
    return {
        "imports_total_ms": round(total_us / 1000, 1),
        "top": [(name, round(us / 1000, 1)) for us, _, name in heavy],
        "loaded_sqlite3": any(r[2] == "sqlite3" for r in rows),
        "loaded_subprocess": any(r[2] == "subprocess" for r in rows),
        "charge_help_wall_p50_ms": round(statistics.median(walls), 1),
    }


def synthetic_sacct(n: int) -> str:
    """n sacct rows in SACCT_FIELDS order (synthetic, built here): mixed CPUs, GPUs, states."""
    lines = []
    for i in range(n):
        jid = 1_000_000 + i
        start = T0 + i
        end = start + 60 + i % 3600
        gpus = "gres/gpu:h100=1,gres/gpu=1," if i % 7 == 0 else ""
        state = ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED by 1001")[i % 4]
        lines.append(
            f"{jid}|{jid}|user{i % N_USERS:05d}|acct{i % N_ACCOUNTS:03d}|main|{state}|"
            f"{1 + i % 16}|{end - start}|{start}|{end}|billing=1,cpu={1 + i % 16},{gpus}node=1|"
            f"slurm-quota:{uuid_for(i)}"
        )
    return "\n".join(lines) + "\n"


def bench_reconcile(path: Path, rows: int) -> dict:
    out = synthetic_sacct(rows)
    runner = lambda argv, t: S.RunResult(0, out if argv[0] == "sacct" else "", "")  # noqa: E731
    conn = db.connect(path)
    t = time.perf_counter()
    rep = R.reconcile(conn, since=T0 - 10, now=T0 + rows + 10_000, runner=runner, grace_s=0)
    first = time.perf_counter() - t
    t = time.perf_counter()
    rep2 = R.reconcile(conn, since=T0 - 10, now=T0 + rows + 10_000, runner=runner, grace_s=0)
    second = time.perf_counter() - t
    t = time.perf_counter()
    S.parse_sacct(out)
    parse = time.perf_counter() - t
    conn.close()
    assert rep.charged == rows and rep2.charged == 0 and rep2.already_charged == rows
    return {
        "rows": rows,
        "all_new_s": round(first, 2),
        "all_new_jobs_per_s": int(rows / first),
        "all_charged_s": round(second, 2),
        "all_charged_jobs_per_s": int(rows / second),
        "parse_only_jobs_per_s": int(rows / parse),
        "released_elements": rep.released_elements,
        "orphans_released": len(rep.orphans),
    }


def local(args) -> dict:
    engines = [e for e in args.engines.split(",") if e]
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ledger.db"
        t = time.perf_counter()
        populate(path)
        setup = time.perf_counter() - t
        result["ledger"] = {"users": N_USERS, "preallocations": N_PREALLOCS,
                            "charges": N_CHARGES, "populate_s": round(setup, 1)}  # fmt: skip
        for engine in engines:
            bindir = Path(tmp) / f"bin-{engine}"
            bindir.mkdir()
            if engine == "sqlite":
                work = Path(tmp) / "work.db"
                shutil.copyfile(path, work)
                result["charge_process"] = bench_charge_process(
                    work, args.jobs, bindir, {"SLURM_QUOTA_DB": str(work)})
                result["charge_inprocess"] = bench_charge_inprocess(work, args.jobs)
                continue
            # MariaDB: the same rows copied into a private mariadbd on this host
            # (bench/plugin_latency.py's engine); the CLI reads its 0600 configuration file.
            from plugin_latency import MariaDBEngine

            with MariaDBEngine(Path(tmp) / "mariadb") as server:
                server.load(path)
                from slurm_quota import config

                ledger = config.resolve(None, "", conf=config.load(str(server.conf)))
                result["charge_process_mariadb"] = bench_charge_process(
                    ledger, args.jobs, bindir, {"SLURM_QUOTA_CONF": str(server.conf)})
                result["charge_inprocess_mariadb"] = bench_charge_inprocess(ledger, args.jobs)
        result["importtime"] = bench_importtime()
    if args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "ledger.db"
            populate(path)
            result["reconcile_synthetic"] = bench_reconcile(path, args.rows)
    return result


def lab(args) -> dict:
    from tests.integration.lab import Lab

    lab = Lab()
    if not lab.is_up():
        lab.up()
    lab.set_jobcomp(True)
    # real scontrol response time for one finished job record
    jid = lab.sbatch(script="#!/bin/sh\ntrue\n").job_id
    lab.wait_job_end(jid)
    sc = []
    for _ in range(20):
        t = time.perf_counter()
        S.controller_job(jid, runner=_lab_runner(lab))
        sc.append((time.perf_counter() - t) * 1000)
    lab.wait_jobcomp(jid, timeout=120)
    conn = db.connect(lab.db_path, readonly=True)
    before = {r[0] for r in conn.execute("SELECT charge_key FROM charges")}
    r = lab.sbatch(f"--array=0-{args.burst - 1}", script="#!/bin/sh\ntrue\n")
    assert r.rc == 0, r
    seen: dict[str, float] = {}
    deadline = time.time() + 900
    while len(seen) < args.burst and time.time() < deadline:
        now = time.time()
        for (key,) in conn.execute("SELECT charge_key FROM charges"):
            if key not in before and key not in seen:
                seen[key] = now
        time.sleep(0.05)
    conn.close()
    ends = {}
    for row in S.sacct_window(int(time.time()) - 3600, None, runner=_lab_runner(lab)):
        run = C.run_from_sacct(row)
        if run and run.charge_key in seen:
            ends[run.charge_key] = run.end_time
    lags = [seen[k] - ends[k] for k in seen if k in ends]
    burst = {
        "elements": args.burst,
        "charged": len(seen),
        "lag_mean_s": round(statistics.mean(lags), 1) if lags else None,
        "lag_p50_s": round(statistics.median(lags), 1) if lags else None,
        "lag_max_s": round(max(lags), 1) if lags else None,
        "note": "END has 1 s resolution; lag = time the charge row appeared - END",
    }
    # reconcile on the real lab: jobcomp off, another burst, then one reconcile
    lab.set_jobcomp(False)
    try:
        r2 = lab.sbatch(f"--array=0-{args.burst - 1}", script="#!/bin/sh\ntrue\n")
        for _ in range(600):
            left = [j for j in lab.squeue() if j["state"] in ("PENDING", "RUNNING", "COMPLETING")]
            if not left:
                break
            time.sleep(0.5)
        time.sleep(2)
        t = time.perf_counter()
        p = lab.run(str(QUOTA_BIN), "reconcile", "--since", "2h", "--json",
                    "--spool", str(lab.spool_dir), check=False, timeout=600)  # fmt: skip
        wall = time.perf_counter() - t
        rep = json.loads(p.stdout)
    finally:
        lab.set_jobcomp(True)
    return {
        "scontrol_show_job_p50_ms": round(statistics.median(sc), 1),
        "scontrol_show_job_p99_ms": round(pct(sc, 99), 1),
        "burst": burst,
        "reconcile_lab": {"array_job": r2.job_id, "wall_s": round(wall, 2),
                          "sacct_rows": rep["sacct_rows"], "charged": rep["charged"],
                          "jobs_per_s": int(rep["sacct_rows"] / wall)},  # fmt: skip
    }


def _lab_runner(lab):
    def run(argv, timeout_s):
        env = dict(lab._client_env())
        env["SLURM_TIME_FORMAT"] = "%s"
        p = subprocess.run(list(argv), env=env, capture_output=True, timeout=timeout_s)
        return S.RunResult(p.returncode, p.stdout.decode(), p.stderr.decode())

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    lo = sub.add_parser("local")
    lo.add_argument("--jobs", type=int, default=200)
    lo.add_argument("--rows", type=int, default=100_000, help="reconcile rows (0: skip)")
    lo.add_argument("--engines", default="sqlite",
                    help="ledger engines of the charge figures: sqlite, mariadb or both")
    la = sub.add_parser("lab")
    la.add_argument("--burst", type=int, default=200)
    args = ap.parse_args()
    out = local(args) if args.cmd == "local" else lab(args)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    main()
