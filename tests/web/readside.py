"""Shared by the read-side tests: a seeded ledger with known answers, and live servers.

The numbers in EXPECTED_* are worked out by hand from SEED_SQL (not computed by the code
under test): total_preallocated = Σ amount × array_size, job_count = Σ array_size.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import threading
import urllib.parse
import wsgiref.util
import wsgiref.validate
from collections.abc import Iterator
from pathlib import Path

from slurm_quota import db
from slurm_quota.app import Settings, create_app

SLURM_QUOTA_BIN = str(Path(sys.executable).with_name("slurm-quota"))
SLURM_QUOTA_WEB_BIN = str(Path(sys.executable).with_name("slurm-quota-web"))

# The seed system's /stats keys, typed from SEED-SYSTEM.md (independent of slurm_quota.stats).
SEED_USER_KEYS = [
    "username", "total_consumed_cpu_minutes", "total_preallocated_cpu_minutes",
    "quota_cpu_minutes", "total_consumed_gpu_minutes", "total_preallocated_gpu_minutes",
    "quota_gpu_minutes", "last_updated", "job_count",
]
SEED_ACCOUNT_KEYS = ["account", *SEED_USER_KEYS[1:]]

SEED_SQL = """
-- (column lists: migration 0003 appends the reserved_* totals to users and accounts)
INSERT INTO users (username, total_consumed_cpu_minutes, quota_cpu_minutes,
                   total_consumed_gpu_minutes, quota_gpu_minutes, last_updated) VALUES
    ('alice', 1200, 5000, 30, 100, '2024-05-01 10:00:00'),
    ('bob', 9000, 10000, 0, -1, '2024-05-02 11:00:00'),
    ('carol', 0, -1, 0, -1, '2024-05-03 12:00:00'),
    ('dave', 0, 0, 0, 0, '2024-05-04 13:00:00');
INSERT INTO accounts (account, total_consumed_cpu_minutes, quota_cpu_minutes,
                      total_consumed_gpu_minutes, quota_gpu_minutes, last_updated) VALUES
    ('hpc', 10200, 100000, 30, 1000, '2024-05-01 10:00:00'),
    ('phys', 0, 50, 0, 0, '2024-05-01 10:00:00'),
    ('bio', 500, -1, 0, -1, '2024-05-01 10:00:00');
-- alice: an array of 2 elements in hpc, one job in phys
INSERT INTO jobs_preallocations (job_uuid, username, account, preallocated_cpu_minutes,
    preallocated_gpu_minutes, array_size, created_at) VALUES
    ('u1', 'alice', 'hpc', 100, 10, 2, '2024-05-01 10:00:00');
INSERT INTO jobs_preallocations (job_uuid, username, account, preallocated_cpu_minutes,
    preallocated_gpu_minutes, array_size, created_at) VALUES
    ('u2', 'alice', 'phys', 50, 0, 1, '2024-05-01 10:00:00');
-- bob: a seed row with NULL GPU minutes, and one with NULL array_size (= 1 element)
INSERT INTO jobs_preallocations (job_uuid, username, account, preallocated_cpu_minutes,
    preallocated_gpu_minutes, array_size, created_at) VALUES
    ('u3', 'bob', 'hpc', 300, NULL, 1, '2024-05-01 10:00:00');
INSERT INTO jobs_preallocations (job_uuid, username, account, preallocated_cpu_minutes,
    preallocated_gpu_minutes, array_size, created_at) VALUES
    ('u4', 'bob', 'hpc', 7, 0, NULL, '2024-05-01 10:00:00');
-- carol: no open job, one charged run in bio (so bio is one of her accounts)
INSERT INTO charges (charge_key, job_id, username, account, start_time, end_time, elapsed_s,
                     cpus, cpu_minutes, gpu_minutes, source, cpu_s)
VALUES ('77:1714557600', 77, 'carol', 'bio', 1714557600, 1714557660, 60, 1, 1, 0, 'test', 60);
"""

# name: (consumed cpu, prealloc cpu, quota cpu, consumed gpu, prealloc gpu, quota gpu, jobs)
EXPECTED_USERS = {
    "alice": (1200, 250, 5000, 30, 20, 100, 3),
    "bob": (9000, 307, 10000, 0, 0, -1, 2),
    "carol": (0, 0, -1, 0, 0, -1, 0),
    "dave": (0, 0, 0, 0, 0, 0, 0),
}
EXPECTED_ACCOUNTS = {
    "bio": (500, 0, -1, 0, 0, -1, 0),
    "hpc": (10200, 507, 100000, 30, 20, 1000, 4),
    "phys": (0, 50, 50, 0, 0, 0, 1),
}
ACCOUNTS_OF = {"alice": ["hpc", "phys"], "bob": ["hpc"], "carol": ["bio"], "dave": []}


def seed_ledger(path: Path) -> None:
    """Insert SEED_SQL into the migrated ledger at path."""
    conn = db.connect(path)
    try:
        conn.executescript("BEGIN;" + SEED_SQL + "COMMIT;")
    finally:
        conn.close()


def numbers(row: dict) -> tuple:
    """The EXPECTED_* tuple of a /stats row."""
    return (
        row["total_consumed_cpu_minutes"], row["total_preallocated_cpu_minutes"],
        row["quota_cpu_minutes"], row["total_consumed_gpu_minutes"],
        row["total_preallocated_gpu_minutes"], row["quota_gpu_minutes"], row["job_count"],
    )


def wsgi_request(
    app, method: str, target: str, headers: dict | None = None, script_name: str = ""
) -> tuple[int, dict, bytes]:
    """One request to a WSGI application in this process, through wsgiref's validator (so a
    breach of the WSGI protocol fails the test): (status, lower-case headers, body)."""
    path, _, query = target.partition("?")
    environ = {
        "REQUEST_METHOD": method, "PATH_INFO": urllib.parse.unquote(path),
        "QUERY_STRING": query, "SCRIPT_NAME": script_name, "wsgi.input": io.BytesIO(),
    }
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    wsgiref.util.setup_testing_defaults(environ)
    seen = {}

    def start_response(status, response_headers, exc_info=None):
        seen["status"], seen["headers"] = status, response_headers
        return lambda _data: None

    answer = wsgiref.validate.validator(app)(environ, start_response)
    try:
        body = b"".join(answer)
    finally:
        answer.close()
    headers_seen = {k.lower(): v for k, v in seen["headers"]}
    return int(seen["status"].split()[0]), headers_seen, body


def local_app(db_path: Path, max_stale_s: float = 0.0):
    """The application `serve` runs, over the ledger at db_path, to call in this process."""
    return create_app(Settings(db_path=Path(db_path), max_stale_s=max_stale_s))


@contextlib.contextmanager
def server_thread(db_path: Path) -> Iterator[str]:
    """The real service (`slurm-quota serve`, never idle) on a free loopback port; yields its
    base URL."""
    with serve_process(db_path, "--idle-timeout", "0") as (_proc, url):
        yield url


_LISTEN_LINE = re.compile(r"on http://127\.0\.0\.1:(\d+)/")


@contextlib.contextmanager
def serve_process(db_path: Path, *extra: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """`slurm-quota --db DB serve --port 0 ...` as a real process; yields (process, base URL)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    proc = subprocess.Popen(
        # No Slurm here: the service shows everything and takes no writes (the lab's tests
        # run it with Slurm's roles and PrivateData).
        [SLURM_QUOTA_BIN, "--db", str(db_path), "serve", "--port", "0", "--no-slurm-roles",
         *extra],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        m = _LISTEN_LINE.search(line)
        assert m, f"serve did not start: {line!r}"
        # Drain stderr so a chatty server can never block on a full pipe.
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        yield proc, f"http://127.0.0.1:{m.group(1)}/"
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)
