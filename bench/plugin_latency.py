"""Benchmark the job_submit plugin: decision latency, and sbatch throughput on the lab.

1. Latency: lua/job_submit.lua under the real lua5.1 + LuaDBI + SQLite (WAL), on a ledger with
   10k users and 1k accounts (finite quotas, so every check runs in full) and 1k vs 100k open
   preallocations spread over them. bench/plugin_latency_driver.lua times each
   slurm_job_submit call (monotonic clock around the call only), counts the statements
   prepared per call, and times a connection open alone. Each size is measured --runs times,
   each run on a fresh copy of the same ledger; the median and the spread are reported.
2. Throughput (--lab): sequential `sbatch --hold --uid=alice` into the project's Slurm lab,
   with our plugin vs a no-op job_submit.lua, interleaved rounds; ratio = ours / no-op. The
   jobcomp script is a no-op meanwhile (the cancelled jobs would otherwise start one charge
   process each during the next round) and is restored afterwards.
3. slurmctld's CPU (--ctld-cpu): the same held submissions, but what is measured is
   slurmctld's own CPU time (utime + stime of /proc/<pid>/stat) over each round, divided by
   the submissions: ours and the no-op interleaved, median and spread over the rounds. This
   is what the plugin costs the controller (the sbatch client's time is not in it). The lab's
   release comes from SLURM_QUOTA_LAB_RELEASE, so the same command measures 22.05, 24.11, 26.05.

    .venv/bin/python bench/plugin_latency.py [--calls 3000] [--runs 3] [--lab] [--lab-rounds 5]
    SLURM_QUOTA_LAB_RELEASE=sid .venv/bin/python bench/plugin_latency.py --no-latency --ctld-cpu
4. Where the plugin's CPU goes inside slurmctld (--ctld-profile): bench/plugin_profile.lua as
   the lab's job_submit.lua times the real module's parts with the thread CPU clock over
   --ctld-jobs held submissions; the table is per call, parts overlapping.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
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
PROFILE_PLUGIN = REPO / "bench" / "plugin_profile.lua"
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
        [(f"acct{a:04d}", 10**12, 10**12) for a in range(accounts)],
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
             f"acct{rnd.randrange(accounts):04d}", rnd.randrange(1, 5000), rnd.randrange(0, 500),
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


def load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


class Checkpointer:
    """What the charge path and the reconcile timer do on a live cluster: a PASSIVE WAL
    checkpoint from another process's connection every `every_s` seconds (the plugin never
    checkpoints: its connection has wal_autocheckpoint = 0). every_s <= 0: none."""

    def __init__(self, path: Path, every_s: float) -> None:
        import threading

        self.path, self.every_s, self.count = path, every_s, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=5)
        try:
            while not self.stop.wait(self.every_s):
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                self.count += 1
        finally:
            conn.close()

    def __enter__(self) -> Checkpointer:
        if self.every_s > 0:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()


class MariaDBEngine:
    """A private mariadbd (tests/lua/mariadbd.py) holding a copy of the SQLite ledger, copied
    fresh (slurm_quota.copyledger) for every run; the plugin reaches it through a 0600
    configuration file, over TCP on 127.0.0.1, as on a controller with its database local."""

    def __init__(self, root: Path, flush_at_commit: int = 1) -> None:
        from tests.lua.mariadbd import MariaDB

        self.flush_at_commit = flush_at_commit
        with socket_free() as port:
            pass
        self.server = MariaDB(root / "mariadb", port)
        self.conf = root / "ledger.conf"

    def __enter__(self) -> MariaDBEngine:
        self.server.start()
        self.server.write_conf(self.conf)
        # 1 (MariaDB's default): every commit is flushed to disk; 2: written, flushed once a
        # second (what the plugin's SQLite connection does with synchronous = NORMAL)
        self.server.sql(f"SET GLOBAL innodb_flush_log_at_trx_commit = {self.flush_at_commit}",
                        database=None)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()

    def load(self, sqlite_path: Path) -> None:
        """The ledger's rows, copied from the SQLite file into a freshly migrated database."""
        from slurm_quota import copyledger
        from slurm_quota.config import MariaDBLedger
        from tests.lua.mariadbd import ADMIN, ADMIN_PASSWORD, DATABASE

        self.server.create_ledger()
        src = db.connect(sqlite_path, readonly=True)
        dst = db.connect(MariaDBLedger(database=DATABASE, user=ADMIN, password=ADMIN_PASSWORD,
                                       unix_socket=str(self.server.socket)))
        try:
            copyledger.copy(src, dst, replace=True)
        finally:
            dst.close()
            src.close()

    def count_preallocations(self) -> int:
        return int(self.server.sql("SELECT COUNT(*) FROM jobs_preallocations")[0][0])


@contextlib.contextmanager
def socket_free():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield port


def latency_run(ledger: Path, users_file: Path, calls: int, plugin: Path = PLUGIN,
                checkpoint_s: float = 1.0, mariadb: MariaDBEngine | None = None) -> dict:
    """One driver run on a fresh copy of ledger (in SQLite, or copied into MariaDB);
    p50/p99/mean/max (µs), prepares, open cost."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.db"
        shutil.copyfile(ledger, path)
        env = dict(os.environ, SLURM_QUOTA_DB=str(path))
        if mariadb is not None:
            mariadb.load(path)
            env.pop("SLURM_QUOTA_DB")
            env["SLURM_QUOTA_CONF"] = str(mariadb.conf)
            checkpoint_s = 0.0  # no WAL
        load_before = load()
        with Checkpointer(path, checkpoint_s) as ckpt:
            proc = subprocess.run(
                ["lua5.1", str(DRIVER), str(plugin), str(users_file), str(calls), "200"],
                capture_output=True, text=True, env=env, check=True,
            )
        if proc.stderr.strip():
            raise SystemExit(f"plugin logged errors:\n{proc.stderr[-2000:]}")
        times, opens, rcs, prepares = [], [], set(), None
        for line in proc.stdout.splitlines():
            if line.startswith("OPEN "):
                opens.append(float(line.split()[1]))
            elif line.startswith("PREPARES "):
                prepares = float(line.split()[1])
            else:
                us, rc = line.split()
                times.append(float(us))
                rcs.add(int(rc))
        if mariadb is not None:
            final = mariadb.count_preallocations()
        else:
            conn = sqlite3.connect(str(path))
            final = conn.execute("SELECT COUNT(*) FROM jobs_preallocations").fetchone()[0]
            conn.close()
    return {
        "final_preallocations": final, "calls": len(times),
        "p50_us": statistics.median(times), "p99_us": pct(times, 99),
        "mean_us": statistics.fmean(times), "max_us": max(times), "rcs": sorted(rcs),
        "prepares_per_call": prepares, "open_p50_us": statistics.median(opens),
        "load_before": load_before, "checkpoints": ckpt.count,
    }


def latency(preallocs: int, calls: int, runs: int, users: int, accounts: int,
            plugin: Path = PLUGIN, checkpoint_s: float = 1.0,
            mariadb: MariaDBEngine | None = None) -> dict:
    """`runs` driver runs on one ledger (copied fresh for each); every run and the medians."""
    with tempfile.TemporaryDirectory() as tmp:
        ledger = build_ledger(Path(tmp) / "ledger.db", users, accounts, preallocs)
        users_file = Path(tmp) / "users.txt"
        rnd = random.Random(2)
        users_file.write_text("".join(
            f"user{u:05d} acct{rnd.randrange(accounts):04d}\n" for u in range(users)))
        all_runs = [latency_run(ledger, users_file, calls, plugin, checkpoint_s, mariadb)
                    for _ in range(runs)]
    out: dict = {"preallocations": preallocs, "users": users, "accounts": accounts,
                 "runs": all_runs}
    for key in ("p50_us", "p99_us", "mean_us", "max_us", "open_p50_us"):
        values = [r[key] for r in all_runs]
        out[key] = statistics.median(values)
        out[key.replace("_us", "_spread_us")] = (min(values), max(values))
    out["prepares_per_call"] = all_runs[-1]["prepares_per_call"]
    return out


@contextlib.contextmanager
def bench_lab():
    """The lab (brought up when not running, and then down at the end) with the jobcomp
    script a no-op meanwhile (the cancelled jobs would otherwise start one charge process
    each during the next round); the project's plugin and jobcomp are restored after."""
    from tests.integration.lab import Lab

    lab = Lab()
    started = False
    if not lab.is_up():
        lab.up()
        started = True
    jobcomp_was = lab.jobcomp_enabled()
    lab.set_jobcomp(False)
    try:
        lab.cancel_all()
        yield lab
        lab.install_plugin(PLUGIN)
    finally:
        lab.set_jobcomp(jobcomp_was)
        if started:
            lab.down()


def submit_held(lab, jobs: int) -> None:
    for _ in range(jobs):
        res = lab.sbatch("--hold", "--time=10", "-n", "2", script="#!/bin/sh\ntrue\n")
        assert res.rc == 0, res.stderr


def interleaved_rounds(lab, rounds: int, plugin: Path, measure) -> dict[str, list[float]]:
    """`rounds` x (our plugin, the no-op): install, check from a warm-up job's AdminComment
    that it is the one loaded, then measure(); returns name -> measure() of every round."""
    noop = Path(tempfile.mkdtemp()) / "noop.lua"
    noop.write_text(NOOP_PLUGIN)
    out: dict[str, list[float]] = {"ours": [], "noop": []}
    for _ in range(rounds):
        for name, path in (("ours", plugin), ("noop", noop)):
            lab.install_plugin(path)
            time.sleep(1.1)  # slurmctld reloads on an mtime newer in whole seconds
            warm = lab.sbatch("--hold", "--wrap=true", script="")
            assert warm.rc == 0, warm.stderr
            ac = lab.run("scontrol", "-o", "show", "job", str(warm.job_id)).stdout
            marker = "slurm-quota:" if name == "ours" else "AdminComment=noop"
            assert marker in ac, f"{name} plugin not active: {ac}"
            out[name].append(measure())
            lab.cancel_all()
    return out


def lab_throughput(jobs: int, rounds: int, plugin: Path = PLUGIN) -> dict:
    """Sequential held sbatch per second on the lab: our plugin vs a no-op plugin."""
    loads: list[str] = []
    with bench_lab() as lab:

        def rate() -> float:
            loads.append(load())
            t0 = time.monotonic()
            submit_held(lab, jobs)
            return jobs / (time.monotonic() - t0)

        rates = interleaved_rounds(lab, rounds, plugin, rate)
    ours, noop_rate = statistics.median(rates["ours"]), statistics.median(rates["noop"])
    pair_ratios = [o / n for o, n in zip(rates["ours"], rates["noop"])]
    return {"jobs_per_round": jobs, "rounds": rounds, "ours_per_s": ours,
            "noop_per_s": noop_rate, "ratio": ours / noop_rate,
            "pair_ratios": pair_ratios, "all": rates, "load_before_rounds": loads}


def ctld_cpu_s(pid: int) -> float:
    """utime + stime of a process in seconds (/proc/<pid>/stat, clock ticks)."""
    data = Path(f"/proc/{pid}/stat").read_text()
    fields = data[data.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def lab_ctld_cpu(jobs: int, rounds: int, plugin: Path = PLUGIN) -> dict:
    """slurmctld CPU ms per held submission, our plugin vs a no-op, interleaved rounds."""
    loads: list[str] = []
    with bench_lab() as lab:
        version = lab.slurm_version()

        def cpu_ms() -> float:
            time.sleep(2)  # let the previous round's cancellations settle
            pid = lab.daemon_pids()["slurmctld"]
            loads.append(load())
            before = ctld_cpu_s(pid)
            submit_held(lab, jobs)
            return (ctld_cpu_s(pid) - before) * 1000 / jobs

        per_sub = interleaved_rounds(lab, rounds, plugin, cpu_ms)
    ours, noop_ms = statistics.median(per_sub["ours"]), statistics.median(per_sub["noop"])
    return {"slurm": version, "release": lab.release, "jobs_per_round": jobs, "rounds": rounds,
            "ours_ms": ours, "noop_ms": noop_ms, "added_ms": ours - noop_ms,
            "noop_over_ours": noop_ms / ours, "all": per_sub, "load_before_rounds": loads}


def lab_ctld_profile(jobs: int) -> dict:
    """Per-call thread CPU (us) of the plugin's parts inside slurmctld (plugin_profile.lua)."""
    with bench_lab() as lab:
        version = lab.slurm_version()
        out = lab.log_dir / "plugin-profile.tsv"
        out.unlink(missing_ok=True)
        lab.install_plugin(PROFILE_PLUGIN, module=REPO / "lua" / "slurm_quota.lua")
        time.sleep(1.1)
        submit_held(lab, jobs)
        lab.cancel_all()
        parts = {}
        for line in out.read_text().splitlines():
            name, us, hits = line.split("\t")
            parts[name] = {"us_per_call": float(us), "calls": int(hits)}
    return {"slurm": version, "release": lab.release, "submissions": jobs, "parts": parts}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=3, help="latency runs per ledger size")
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--accounts", type=int, default=1_000)
    ap.add_argument("--plugin", type=Path, default=PLUGIN, help="the job_submit.lua to measure")
    ap.add_argument("--checkpoint-every", type=float, default=1.0, metavar="S",
                    help="a PASSIVE checkpoint from another connection every S s (0: none)")
    ap.add_argument("--no-latency", action="store_true", help="only the lab throughput")
    ap.add_argument("--lab", action="store_true", help="also measure sbatch throughput")
    ap.add_argument("--lab-jobs", type=int, default=100)
    ap.add_argument("--lab-rounds", type=int, default=5)
    ap.add_argument("--ctld-cpu", action="store_true",
                    help="slurmctld CPU per submission, ours vs no-op, on the lab")
    ap.add_argument("--ctld-jobs", type=int, default=200)
    ap.add_argument("--ctld-rounds", type=int, default=4)
    ap.add_argument("--ctld-profile", action="store_true",
                    help="thread CPU of the plugin's parts inside slurmctld, on the lab")
    ap.add_argument("--engines", default="sqlite",
                    help="ledger engines to measure the latency on, side by side: "
                         "sqlite, mariadb or sqlite,mariadb (a private mariadbd)")
    ap.add_argument("--mariadb-flush", type=int, default=1, choices=(0, 1, 2),
                    help="innodb_flush_log_at_trx_commit of the benchmark's mariadbd")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result: dict = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, "
                   f"{platform.platform()}, SQLite {sqlite3.sqlite_version}",
        "load_start": load(),
    }
    engines = [e for e in args.engines.split(",") if e]
    if not args.no_latency:
        for engine in engines:
            prefix = "" if engine == "sqlite" else f"{engine}_"
            with contextlib.ExitStack() as stack:
                mariadb = None
                if engine == "mariadb":
                    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
                    mariadb = stack.enter_context(MariaDBEngine(tmp, args.mariadb_flush))
                for key, size in (("small", 1_000), ("large", 100_000)):
                    result[prefix + key] = latency(
                        size, args.calls, args.runs, args.users, args.accounts, args.plugin,
                        args.checkpoint_every, mariadb)
                    result[prefix + key]["engine"] = engine + (
                        f" (innodb_flush_log_at_trx_commit={args.mariadb_flush})"
                        if engine == "mariadb" else "")
            result[prefix + "ratio_p99"] = (result[prefix + "large"]["p99_us"]
                                            / result[prefix + "small"]["p99_us"])
            result[prefix + "ratio_p50"] = (result[prefix + "large"]["p50_us"]
                                            / result[prefix + "small"]["p50_us"])
    if args.lab:
        result["lab"] = lab_throughput(args.lab_jobs, args.lab_rounds, args.plugin)
    if args.ctld_cpu:
        result["ctld"] = lab_ctld_cpu(args.ctld_jobs, args.ctld_rounds, args.plugin)
    if args.ctld_profile:
        result["profile"] = lab_ctld_profile(args.ctld_jobs)
    result["load_end"] = load()
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"machine: {result['machine']}; load average at start {result['load_start']}")
    for key in ("small", "large", "mariadb_small", "mariadb_large"):
        if key not in result:
            continue
        r = result[key]
        print(f"{r['engine']}: {r['preallocations']:>7} open preallocations, {r['users']} "
              f"users, {r['accounts']} accounts:")
        for i, run in enumerate(r["runs"], 1):
            print(f"  run {i}: p50 {run['p50_us'] / 1000:.3f} ms, p99 {run['p99_us'] / 1000:.3f} "
                  f"ms, mean {run['mean_us'] / 1000:.3f} ms, max {run['max_us'] / 1000:.3f} ms "
                  f"over {run['calls']} calls; {run['prepares_per_call']:.2f} prepares/call; "
                  f"open {run['open_p50_us'] / 1000:.3f} ms; {run['checkpoints']} checkpoints "
                  f"by another connection; load {run['load_before']}")
        lo50, hi50 = r["p50_spread_us"]
        lo99, hi99 = r["p99_spread_us"]
        print(f"  median: p50 {r['p50_us'] / 1000:.3f} ms ({lo50 / 1000:.3f}-{hi50 / 1000:.3f}), "
              f"p99 {r['p99_us'] / 1000:.3f} ms ({lo99 / 1000:.3f}-{hi99 / 1000:.3f})")
    for prefix in ("", "mariadb_"):
        if prefix + "ratio_p99" in result:
            print(f"{prefix or 'sqlite_'}100k/1k ratio of the medians: p99 "
                  f"{result[prefix + 'ratio_p99']:.2f}, p50 {result[prefix + 'ratio_p50']:.2f}")
    if "lab" in result:
        lab = result["lab"]
        print("lab sbatch/s per round: ours " + ", ".join(f"{x:.1f}" for x in lab["all"]["ours"])
              + "; no-op " + ", ".join(f"{x:.1f}" for x in lab["all"]["noop"]))
        print("lab per-round ratios: " + ", ".join(f"{x:.3f}" for x in lab["pair_ratios"]))
        print(f"lab sbatch: ours {lab['ours_per_s']:.1f}/s, no-op {lab['noop_per_s']:.1f}/s, "
              f"ratio {lab['ratio']:.3f} (medians of {lab['rounds']} rounds x "
              f"{lab['jobs_per_round']} jobs); loads {', '.join(lab['load_before_rounds'])}")
    if "ctld" in result:
        c = result["ctld"]
        print(f"slurmctld CPU per submission, Slurm {c['slurm']} ({c['release']}), "
              f"{c['rounds']} rounds x {c['jobs_per_round']} held sbatch:")
        for name in ("ours", "noop"):
            vals = ", ".join(f"{v:.3f}" for v in c["all"][name])
            print(f"  {name}: median {c[name + '_ms']:.3f} ms (rounds: {vals})")
        print(f"  added by the plugin: {c['added_ms']:.3f} ms; no-op/ours "
              f"{c['noop_over_ours']:.3f}; loads {', '.join(c['load_before_rounds'])}")
    if "profile" in result:
        prof = result["profile"]
        print(f"plugin parts inside slurmctld, Slurm {prof['slurm']} ({prof['release']}), "
              f"{prof['submissions']} held sbatch (thread CPU per call, parts overlap):")
        for name, v in sorted(prof["parts"].items(), key=lambda kv: -kv[1]["us_per_call"]):
            print(f"  {name:32} {v['us_per_call']:8.1f} us  ({v['calls']} timed)")
    print(f"load average at end {result['load_end']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
