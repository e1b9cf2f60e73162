"""Benchmark of the read side: `slurm-quota serve` under 100 concurrent clients.

Builds a ledger of 10k users, 1k accounts, 100k open preallocations (and 50k charges), starts
`slurm-quota serve` on a loopback port, and loads each route with 100 concurrent clients, one
TCP connection per request as `slurm-quota stats` does, gzip offered: in a closed loop with
the asyncio client (Python, bounded number of requests) and with wrk (C, for a duration, when
installed: `apt-get install wrk`), then in an open loop at a fixed rate. Prints p50/p99/max
latency, requests/s and the CPU time per request of the server processes and of the client
(both share this machine's CPUs), and the wall time of `slurm-quota --help`. Loopback only.

Then the live ledger (--phases live): the ledger changes --writes-per-s times a second (a
preallocation inserted or deleted, as submits and completions do) while an open loop sends
per-user requests at --live-rate and /stats and /metrics at --whole-rate each; every
whole-ledger answer must then be rebuilt. Once per --live-max-stale value (`serve
--max-stale`); per-route latency.

Then the floor (--phases floor, with wrk and nginx installed): the gzipped /stats and /metrics
bytes that serve sends are also served by nginx as static files (one worker process, as serve
is one process), and wrk loads serve and nginx in turn, --floor-rounds times: what this machine
allows for answers of that size, whatever the server.

    .venv/bin/python bench/serve.py [--threads N] [--client both|python|wrk] [--markdown]
        [--phases static,live,floor] [--live-max-stale 0,5] [--floor-rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import random
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from slurm_quota import db

ROOT = Path(__file__).resolve().parent.parent
SLURM_QUOTA = str(Path(sys.executable).parent / "slurm-quota")
SIZES: list[int] = []  # bytes of each answer (headers + body, gzip when offered)


# Column lists, not positional VALUES: migration 0003 appends columns to users and accounts.
_OWNER_COLUMNS = (
    "total_consumed_cpu_minutes, quota_cpu_minutes, total_consumed_gpu_minutes, "
    "quota_gpu_minutes, last_updated"
)


def build_ledger(path: Path, users: int, accounts: int, preallocs: int, charges: int) -> None:
    """A migrated ledger with the given number of rows (deterministic)."""
    rnd = random.Random(42)
    db.migrate(path)
    conn = db.connect(path)
    with db.write_transaction(conn):
        conn.executemany(
            f"INSERT INTO users (username, {_OWNER_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, '2024-05-01 10:00:00')",
            [
                (f"user{i:05d}", rnd.randrange(0, 10**6), rnd.choice([-1, 10**6, 2 * 10**6]),
                 rnd.randrange(0, 10**4), rnd.choice([-1, 10**4]))
                for i in range(users)
            ],
        )
        conn.executemany(
            f"INSERT INTO accounts (account, {_OWNER_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, '2024-05-01 10:00:00')",
            [
                (f"acct{i:04d}", rnd.randrange(0, 10**8), rnd.choice([-1, 10**8]),
                 rnd.randrange(0, 10**6), rnd.choice([-1, 10**6]))
                for i in range(accounts)
            ],
        )
        conn.executemany(
            "INSERT INTO jobs_preallocations VALUES (?, ?, ?, ?, ?, ?, '2024-05-01 10:00:00')",
            [
                (f"uuid-{i}", f"user{rnd.randrange(users):05d}",
                 f"acct{rnd.randrange(accounts):04d}", rnd.randrange(1, 5000),
                 rnd.choice([0, 0, 60, 240]), rnd.choice([1, 1, 1, 10]))
                for i in range(preallocs)
            ],
        )
        conn.executemany(
            "INSERT INTO charges (charge_key, job_id, username, account, start_time, end_time,"
            " elapsed_s, cpus, cpu_minutes, gpu_minutes, source)"
            " VALUES (?, ?, ?, ?, 0, 60, 60, 1, 1, 0, 'bench')",
            [
                (f"{i}:0", i, f"user{rnd.randrange(users):05d}",
                 f"acct{rnd.randrange(accounts):04d}")
                for i in range(charges)
            ],
        )
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def start_server(
    db_path: Path, threads: int | None, extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, int]:
    """`slurm-quota serve --port 0`; return the process and the port it logged."""
    extra = (*extra, *([] if threads is None else ["--threads", str(threads)]))
    proc = subprocess.Popen(
        [SLURM_QUOTA, "--db", str(db_path), "serve", "--port", "0", "--idle-timeout", "0",
         *extra],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    m = re.search(r" on http://127\.0\.0\.1:(\d+)/", line)
    if not m:
        proc.kill()
        raise SystemExit(f"serve did not start: {line!r}")
    # Drained, so a server that logs a lot never blocks on a full pipe.
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    return proc, int(m.group(1))


def server_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of the serve process (and of any child processes)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for p in [str(pid), *children]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def own_cpu_s(who: int = resource.RUSAGE_SELF) -> float:
    """CPU seconds of this process (RUSAGE_SELF) or of its waited-for children."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


_WRK_SCRIPT = """
local targets = {%s}
local i = 0
request = function()
  i = i %% #targets + 1
  return wrk.format("GET", targets[i])
end
"""
_WRK_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def _wrk_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(m.group(1)) * _WRK_MS[m.group(2)]


def run_wrk(
    port: int, targets: list[str], connections: int, seconds: float, tmp: Path,
    headers: tuple[str, ...] = (),
) -> dict[str, float]:
    """wrk (C, one thread) with `connections` connections in a closed loop, one TCP connection
    per request, cycling through targets; p50/p99/max ms, requests/s, errors, client CPU."""
    script = tmp / "targets.lua"
    script.write_text(_WRK_SCRIPT % ",".join(f'"{t}"' for t in targets))
    before = own_cpu_s(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(script),
         "-H", "Connection: close", "-H", "Accept-Encoding: gzip",
         *(arg for header in headers for arg in ("-H", header)),
         f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True,
    ).stdout
    client_cpu = own_cpu_s(resource.RUSAGE_CHILDREN) - before
    latency = re.search(r"^\s+Latency\s+\S+\s+\S+\s+(\S+)", out, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    total = re.search(r"(\d+) requests in ([\d.]+)s", out)
    if not (latency and p50 and p99 and total):
        raise SystemExit(f"cannot read wrk's output:\n{out}")
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    errors += sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    n, wall = int(total.group(1)), float(total.group(2))
    return {"n": n, "errors": errors, "p50": _wrk_ms(p50.group(1)),
            "p99": _wrk_ms(p99.group(1)), "max": _wrk_ms(latency.group(1)), "rps": n / wall,
            "client_cpu_s": client_cpu}


async def _one(port: int, target: str) -> tuple[float, int, int]:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept-Encoding: gzip\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    await writer.drain()
    data = await reader.read()
    writer.close()
    elapsed = time.perf_counter() - started
    status = int(data[9:12]) if data[:5] == b"HTTP/" else 0
    return elapsed, status, len(data)


async def _run(port: int, targets: list[str], concurrency: int) -> tuple[list[float], float, int]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for t in targets:
        queue.put_nowait(t)
    latencies: list[float] = []
    errors = 0

    async def worker() -> None:
        nonlocal errors
        while not queue.empty():
            target = queue.get_nowait()
            elapsed, status, size = await _one(port, target)
            SIZES.append(size)
            latencies.append(elapsed)
            if status != 200:
                errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started, errors


async def _paced(
    port: int, targets: list[str], clients: int, rate: float
) -> tuple[list[float], float, int]:
    """Open loop: `clients` clients sharing `rate` requests/s, each request at its scheduled
    time whatever the server's speed; latency counts from the scheduled time (no
    coordinated omission)."""
    latencies: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.2
    period = clients / rate  # each client's interval

    async def client(c: int) -> None:
        nonlocal errors
        mine = targets[c::clients]
        for k, target in enumerate(mine):
            due = start + (c / clients) * period + k * period
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            _e, status, _size = await _one(port, target)
            latencies.append(loop.time() - due)
            if status != 200:
                errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    return latencies, time.perf_counter() - t0, errors


def write_ledger(path: str, per_s: float, users: int, accounts: int, stop_file: str) -> None:
    """Commit per_s changes a second until stop_file exists: a preallocation inserted, then
    the oldest one this writer inserted deleted (the triggers update the reserved totals)."""
    import sqlite3

    rnd = random.Random(99)
    conn = sqlite3.connect(path, isolation_level=None, timeout=5)
    conn.execute("PRAGMA busy_timeout = 5000")
    mine: list[str] = []
    start, k = time.monotonic(), 0
    while not os.path.exists(stop_file):
        k += 1
        delay = start + k / per_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if k % 2 and len(mine) < 50:
            uuid = f"live-{os.getpid()}-{k}"  # a later writer must not meet this one's rows
            conn.execute(
                "INSERT INTO jobs_preallocations VALUES (?, ?, ?, ?, 0, 1, '2024-05-01 10:00:00')",
                (uuid, f"user{rnd.randrange(users):05d}", f"acct{rnd.randrange(accounts):04d}",
                 rnd.randrange(1, 5000)),
            )
            mine.append(uuid)
        elif mine:
            conn.execute("DELETE FROM jobs_preallocations WHERE job_uuid = ?", (mine.pop(0),))
    conn.close()


async def _paced_mix(
    port: int, schedule: list[tuple[float, str, str]]
) -> tuple[dict[str, list[float]], dict[str, int], float]:
    """Open loop: each (due s, label, target) sent at its due time (its own connection);
    latency from the due time, per label; errors per label."""
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.2
    latencies: dict[str, list[float]] = {}
    errors: dict[str, int] = {}

    async def one(due: float, label: str, target: str) -> None:
        delay = start + due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        _e, status, _size = await _one(port, target)
        latencies.setdefault(label, []).append(loop.time() - start - due)
        errors[label] = errors.get(label, 0) + (status != 200)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(*item) for item in schedule))
    return latencies, errors, time.perf_counter() - t0


def live_phase(
    db_path: Path, args: argparse.Namespace, max_stale: float, tmp: Path
) -> list[dict[str, float | str]]:
    """Per-route latency while the ledger changes (see the module doc)."""
    import multiprocessing

    rnd = random.Random(11)
    schedule: list[tuple[float, str, str]] = []
    for i in range(int(args.live_rate * args.live_seconds)):
        due = i / args.live_rate
        if rnd.random() < 0.9:
            target = f"/stats?username=user{rnd.randrange(args.users):05d}"
            schedule.append((due, "/stats?username=", target))
        else:
            target = f"/stats?account=acct{rnd.randrange(args.accounts):04d}"
            schedule.append((due, "/stats?account=", target))
    for route in ("/stats", "/metrics"):
        offset = rnd.random() / args.whole_rate
        for i in range(int(args.whole_rate * args.live_seconds)):
            schedule.append((offset + i / args.whole_rate, route, route))
    schedule.sort()
    stale = ("--max-stale", f"{max_stale:g}") if max_stale else ()  # 0 is the default
    proc, port = start_server(db_path, args.threads, stale)
    stop_file = tmp / f"stop-writer-{max_stale:g}"
    writer = multiprocessing.Process(
        target=write_ledger,
        args=(str(db_path), args.writes_per_s, args.users, args.accounts, str(stop_file)),
    )
    try:
        asyncio.run(_run(port, ["/stats", "/metrics"] * 20, 10))  # warm-up, ledger unchanged
        writer.start()
        srv0 = server_cpu_s(proc.pid)
        latencies, errors, wall = asyncio.run(_paced_mix(port, schedule))
        server_s = server_cpu_s(proc.pid) - srv0
    finally:
        stop_file.touch()
        if writer.pid is not None:
            writer.join(timeout=10)
        proc.terminate()
        proc.wait(timeout=10)
    if writer.exitcode != 0:
        raise SystemExit(f"the ledger writer failed (exit {writer.exitcode}): this live run "
                         "is void")
    rows: list[dict[str, float | str]] = []
    for label in ("/stats?username=", "/stats?account=", "/stats", "/metrics"):
        lat = latencies.get(label, [])
        if not lat:
            continue
        rows.append({
            "label": f"`{label}`, live ledger, --max-stale {max_stale:g}", "n": len(lat),
            "errors": errors[label], "p50": percentile(lat, 50) * 1e3,
            "p99": percentile(lat, 99) * 1e3, "max": max(lat) * 1e3, "rps": len(lat) / wall,
        })
    print(f"live ledger, --max-stale {max_stale:g}: server CPU {server_s:.1f} s "
          f"(builders not counted) over {wall:.1f} s", file=sys.stderr)
    return rows


_NGINX_CONF = """\
worker_processes %(workers)d;
daemon off;
%(user)s
pid %(dir)s/nginx.pid;
error_log %(dir)s/error.log;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path %(dir)s/tmp;
    proxy_temp_path %(dir)s/tmp;
    fastcgi_temp_path %(dir)s/tmp;
    uwsgi_temp_path %(dir)s/tmp;
    scgi_temp_path %(dir)s/tmp;
    keepalive_timeout 0;
    server {
        listen 127.0.0.1:%(port)d;
        root %(dir)s/html;
        gzip_static on;
        default_type application/octet-stream;
    }
}
"""


def _etag(port: int, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}") as answer:
        answer.read()
        return str(answer.headers["ETag"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def floor_phase(
    db_path: Path, args: argparse.Namespace, tmp: Path
) -> list[dict[str, float | str]]:
    """The same whole-ledger bytes sent by `slurm-quota serve` and by nginx (C, a static
    file, as many worker processes as serve has), wrk alternating between the two: what this
    machine's loopback and CPUs allow for answers of that size, whatever the server."""
    import urllib.request

    workers = 1  # serve is one process (waitress: one loop, worker threads)
    site = tmp / "nginx"
    (site / "html").mkdir(parents=True)
    (site / "tmp").mkdir()
    os.chmod(tmp, 0o755)  # nginx workers run as another user when started by root
    proc, port = start_server(db_path, args.threads)
    try:
        for name in ("stats", "metrics"):
            asyncio.run(_run(port, [f"/{name}"] * 200, 20))  # every server process has built it
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/{name}", headers={"Accept-Encoding": "gzip"}
            )
            with urllib.request.urlopen(req) as answer:
                if answer.headers.get("Content-Encoding") != "gzip":
                    raise SystemExit(f"/{name} was not sent gzipped")
                zipped = answer.read()
            (site / "html" / f"{name}.gz").write_bytes(zipped)
            (site / "html" / name).write_bytes(gzip.decompress(zipped))
        ng_port = _free_port()
        user = "user nobody nogroup;" if os.geteuid() == 0 else ""
        conf = site / "nginx.conf"
        conf.write_text(_NGINX_CONF % {"workers": workers, "user": user, "dir": site,
                                       "port": ng_port})
        nginx = subprocess.Popen(["nginx", "-c", str(conf)], stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", ng_port)) == 0:
                        break
                time.sleep(0.05)
            else:
                raise SystemExit("nginx did not start: " + (site / "error.log").read_text())
            rows: list[dict[str, float | str]] = []
            for round_ in range(1, args.floor_rounds + 1):
                for name in ("stats", "metrics"):
                    for who, server, p in (("slurm-quota serve", proc, port),
                                           ("nginx, static file", nginx, ng_port)):
                        srv0 = server_cpu_s(server.pid)
                        row = run_wrk(p, [f"/{name}"], args.concurrency, args.wrk_seconds, tmp)
                        row.update(label=f"/{name}, closed loop, wrk, {who} (round {round_})",
                                   server_cpu_s=server_cpu_s(server.pid) - srv0)
                        rows.append(row)
        finally:
            nginx.terminate()
            nginx.wait(timeout=10)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return rows


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(p / 100.0 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def help_wall_time(runs: int) -> tuple[float, float]:
    """Median and max wall time of `slurm-quota --help` over runs."""
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([SLURM_QUOTA, "--help"], stdout=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times), max(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--accounts", type=int, default=1_000)
    parser.add_argument("--preallocs", type=int, default=100_000)
    parser.add_argument("--charges", type=int, default=50_000)
    parser.add_argument("--requests", type=int, default=2000, help="per route (Python client)")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument(
        "--threads", type=int, default=None,
        help="`serve --threads` (default: serve's own default)",
    )
    parser.add_argument(
        "--client", choices=("both", "python", "wrk"), default="both",
        help="load generator for the closed loop: the asyncio client, wrk (C), or both",
    )
    parser.add_argument("--wrk-seconds", type=float, default=8.0, help="per route")
    parser.add_argument(
        "--rate", type=float, default=200.0,
        help="open-loop phase: requests/s shared by the clients (0 = skip)",
    )
    parser.add_argument("--help-runs", type=int, default=20)
    parser.add_argument(
        "--phases", default="static,live,floor",
        help="comma-separated: static (each route alone, unchanged ledger), live (mixed "
        "routes while the ledger changes), floor (the whole-ledger answers' bytes from serve "
        "and from nginx, alternately, with wrk; needs wrk and nginx)",
    )
    parser.add_argument("--floor-rounds", type=int, default=2,
                        help="floor phase: rounds of serve then nginx per route")
    parser.add_argument("--writes-per-s", type=float, default=10.0, help="live phase")
    parser.add_argument("--live-rate", type=float, default=300.0,
                        help="live phase: per-user requests/s")
    parser.add_argument("--whole-rate", type=float, default=2.0,
                        help="live phase: /stats and /metrics requests/s, each")
    parser.add_argument("--live-seconds", type=float, default=20.0)
    parser.add_argument("--live-max-stale", default="0,5",
                        help="live phase: one run per `serve --max-stale` value")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    clients = ["python", "wrk"] if args.client == "both" else [args.client]
    if "wrk" in clients and shutil.which("wrk") is None:
        if args.client == "wrk":
            raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")
        print("wrk is not installed (apt-get install wrk): Python client only", file=sys.stderr)
        clients.remove("wrk")

    phases = set(args.phases.split(","))
    if "floor" in phases and not (shutil.which("nginx") and "wrk" in clients):
        print("floor phase skipped: it needs wrk and nginx (apt-get install wrk nginx-light)",
              file=sys.stderr)
        phases.discard("floor")

    rnd = random.Random(7)
    results = []
    sizes: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        db_path = Path(tmp) / "bench.db"
        t = time.perf_counter()
        build_ledger(db_path, args.users, args.accounts, args.preallocs, args.charges)
        print(f"ledger built in {time.perf_counter() - t:.1f} s: {args.users} users, "
              f"{args.accounts} accounts, {args.preallocs} preallocations, {args.charges} charges, "
              f"{os.path.getsize(db_path) / 1e6:.1f} MB", file=sys.stderr)
        proc, port = start_server(db_path, args.threads)
        routes = {
            "/stats?username=<random>": lambda: (
                f"/stats?username=user{rnd.randrange(args.users):05d}"
            ),
            "/stats?account=<random>": lambda: (
                f"/stats?account=acct{rnd.randrange(args.accounts):04d}"
            ),
            "/stats (all)": lambda: "/stats",
            "/metrics": lambda: "/metrics",
            "/health": lambda: "/health",
        }

        def record(label: str, row: dict[str, float], server_s: float) -> None:
            row.update(label=label, server_cpu_s=server_s)
            results.append(row)

        try:
            for name, make in routes.items() if "static" in phases else ():
                # Warm-up: every server process has built its whole-ledger answers.
                asyncio.run(_run(port, [make() for _ in range(200)], 20))
                if "python" in clients:
                    SIZES.clear()
                    cpu0, srv0 = own_cpu_s(), server_cpu_s(proc.pid)
                    lat, wall, errors = asyncio.run(
                        _run(port, [make() for _ in range(args.requests)], args.concurrency)
                    )
                    sizes[name] = statistics.mean(SIZES)
                    record(f"{name}, closed loop, Python client", {
                        "n": len(lat), "errors": errors, "p50": percentile(lat, 50) * 1e3,
                        "p99": percentile(lat, 99) * 1e3, "max": max(lat) * 1e3,
                        "rps": len(lat) / wall, "client_cpu_s": own_cpu_s() - cpu0,
                    }, server_cpu_s(proc.pid) - srv0)
                if "wrk" in clients:
                    srv0 = server_cpu_s(proc.pid)
                    row = run_wrk(port, [make() for _ in range(2000)], args.concurrency,
                                  args.wrk_seconds, Path(tmp))
                    record(f"{name}, closed loop, wrk", row, server_cpu_s(proc.pid) - srv0)
                if "wrk" in clients and name == "/stats (all)":
                    # A client that kept its copy (the dashboard) asks whether it changed.
                    tag = _etag(port, "/stats")
                    srv0 = server_cpu_s(proc.pid)
                    row = run_wrk(port, ["/stats"], args.concurrency, args.wrk_seconds,
                                  Path(tmp), headers=(f"If-None-Match: {tag}",))
                    record("/stats (all) unchanged, If-None-Match (304), closed loop, wrk",
                           row, server_cpu_s(proc.pid) - srv0)
                if args.rate > 0:
                    cpu0, srv0 = own_cpu_s(), server_cpu_s(proc.pid)
                    lat, wall, errors = asyncio.run(_paced(
                        port, [make() for _ in range(args.requests)], args.concurrency,
                        args.rate,
                    ))
                    record(f"{name}, {args.rate:g} req/s", {
                        "n": len(lat), "errors": errors, "p50": percentile(lat, 50) * 1e3,
                        "p99": percentile(lat, 99) * 1e3, "max": max(lat) * 1e3,
                        "rps": len(lat) / wall, "client_cpu_s": own_cpu_s() - cpu0,
                    }, server_cpu_s(proc.pid) - srv0)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
        if "live" in phases:
            for value in args.live_max_stale.split(","):
                for row in live_phase(db_path, args, float(value), Path(tmp)):
                    results.append(row)
        if "floor" in phases:
            results.extend(floor_phase(db_path, args, Path(tmp)))
    med, worst = help_wall_time(args.help_runs)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    if args.markdown:
        print("| route, load | requests | errors | p50 ms | p99 ms | max ms | req/s "
              "| server CPU µs/req | client CPU µs/req |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            label = r["label"] if str(r["label"]).startswith("`") else f"`{r['label']}`"
            cpu = (
                f"{r['server_cpu_s'] / r['n'] * 1e6:.0f} | {r['client_cpu_s'] / r['n'] * 1e6:.0f}"
                if "server_cpu_s" in r else "– | –"
            )
            print(f"| {label} | {r['n']} | {r['errors']} | {r['p50']:.1f} | "
                  f"{r['p99']:.1f} | {r['max']:.1f} | {r['rps']:.0f} | {cpu} |")
        if sizes:
            print("\nMean answer size (gzip offered, as requests and Prometheus do): "
                  + ", ".join(f"`{name}` {size / 1e3:.1f} kB" for name, size in sizes.items())
                  + ".")
        print(f"\n`slurm-quota --help`: median {med * 1e3:.0f} ms, max {worst * 1e3:.0f} ms "
              f"over {args.help_runs} runs. Load average at the end: {load}.")
    else:
        for r in results:
            cpu = (
                f" server {r['server_cpu_s'] / r['n'] * 1e6:.0f} us/req "
                f"client {r['client_cpu_s'] / r['n'] * 1e6:.0f} us/req"
                if "server_cpu_s" in r else ""
            )
            print(f"{r['label']:50s} n={r['n']} errors={r['errors']} p50={r['p50']:.1f}ms "
                  f"p99={r['p99']:.1f}ms max={r['max']:.1f}ms {r['rps']:.0f} req/s{cpu}")
        for name, size in sizes.items():
            print(f"{name}: mean answer {size / 1e3:.1f} kB")
        print(f"slurm-quota --help: median {med * 1e3:.0f} ms, max {worst * 1e3:.0f} ms")
        print(f"load average at the end: {load}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
