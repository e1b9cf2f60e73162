"""Benchmark of the read side: `slurm-quota serve` under 100 concurrent clients.

Builds a ledger of 10k users, 1k accounts, 100k open preallocations (and 50k charges), starts
`slurm-quota serve` on a loopback port, and sends a bounded number of requests per route with
100 concurrent clients (asyncio, one TCP connection per request as `slurm-quota stats` does).
Prints p50/p99/max latency and requests/s per route, and the wall time of
`slurm-quota --help`. Loopback only; nothing leaves the machine.

    .venv/bin/python bench/serve.py [--requests 2000] [--concurrency 100] [--markdown]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
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


def start_server(db_path: Path) -> tuple[subprocess.Popen, int]:
    """`slurm-quota serve --port 0`; return the process and the port it logged."""
    proc = subprocess.Popen(
        [SLURM_QUOTA, "--db", str(db_path), "serve", "--port", "0", "--idle-timeout", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    if not m:
        proc.kill()
        raise SystemExit(f"serve did not start: {line!r}")
    return proc, int(m.group(1))


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
    parser.add_argument("--requests", type=int, default=2000, help="per route")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument(
        "--rate", type=float, default=200.0,
        help="open-loop phase: requests/s shared by the clients (0 = skip)",
    )
    parser.add_argument("--help-runs", type=int, default=20)
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()

    rnd = random.Random(7)
    with tempfile.TemporaryDirectory() as tmp:
        db_path = Path(tmp) / "bench.db"
        t = time.perf_counter()
        build_ledger(db_path, args.users, args.accounts, args.preallocs, args.charges)
        print(f"ledger built in {time.perf_counter() - t:.1f} s: {args.users} users, "
              f"{args.accounts} accounts, {args.preallocs} preallocations, {args.charges} charges, "
              f"{os.path.getsize(db_path) / 1e6:.1f} MB", file=sys.stderr)
        proc, port = start_server(db_path)
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
        results = []
        sizes: dict[str, float] = {}
        try:
            for name, make in routes.items():
                asyncio.run(_run(port, [make() for _ in range(50)], 10))  # warm-up
                SIZES.clear()
                lat, wall, errors = asyncio.run(
                    _run(port, [make() for _ in range(args.requests)], args.concurrency)
                )
                sizes[name] = statistics.mean(SIZES)
                results.append((f"{name}, closed loop", len(lat), errors,
                                percentile(lat, 50) * 1e3, percentile(lat, 99) * 1e3,
                                max(lat) * 1e3, len(lat) / wall))
                if args.rate > 0:
                    lat, wall, errors = asyncio.run(_paced(
                        port, [make() for _ in range(args.requests)], args.concurrency,
                        args.rate,
                    ))
                    results.append((f"{name}, {args.rate:g} req/s", len(lat), errors,
                                    percentile(lat, 50) * 1e3, percentile(lat, 99) * 1e3,
                                    max(lat) * 1e3, len(lat) / wall))
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    med, worst = help_wall_time(args.help_runs)
    if args.markdown:
        print("| route, load | requests | errors | p50 ms | p99 ms | max ms | req/s |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, n, err, p50, p99, mx, rps in results:
            print(f"| `{name}` | {n} | {err} | {p50:.1f} | {p99:.1f} | {mx:.1f} | {rps:.0f} |")
        print("\nMean answer size (gzip offered, as requests and Prometheus do): " + ", ".join(
            f"`{name}` {size / 1e3:.1f} kB" for name, size in sizes.items()) + ".")
        print(f"\n`slurm-quota --help`: median {med * 1e3:.0f} ms, max {worst * 1e3:.0f} ms "
              f"over {args.help_runs} runs.")
    else:
        for name, n, err, p50, p99, mx, rps in results:
            print(f"{name:42s} n={n} errors={err} p50={p50:.1f}ms p99={p99:.1f}ms "
                  f"max={mx:.1f}ms {rps:.0f} req/s")
        for name, size in sizes.items():
            print(f"{name}: mean answer {size / 1e3:.1f} kB")
        print(f"slurm-quota --help: median {med * 1e3:.0f} ms, max {worst * 1e3:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
