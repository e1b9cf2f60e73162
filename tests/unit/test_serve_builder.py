"""The builder process of `slurm-quota serve` (whole-ledger answers built outside the loop).

Real builder processes throughout; a slow one is the real builder that waits before sending
each answer it built (SLOW_BUILDER), so a build is surely in progress while the test acts.
"""

from __future__ import annotations

import gzip
import http.client
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from slurm_quota import db, serve, serve_builder, stats
from tests.web.readside import (
    EXPECTED_USERS,
    SLURM_QUOTA_BIN,
    numbers,
    seed_ledger,
    server_thread,
)

SLOW_BUILDER = """
import sys, time
from pathlib import Path
from slurm_quota import serve, serve_builder
db_path, build_log, delay = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
original = serve.App.handle
def slow(self, target, **kwargs):
    with build_log.open("a") as f:
        f.write(target + "\\n")
    answer = original(self, target, **kwargs)  # the ledger as it is now...
    time.sleep(delay)  # ...answered later
    return answer
serve.App.handle = slow
sys.exit(serve_builder.run(db_path))
"""


@pytest.fixture
def seeded(db_path):
    seed_ledger(db_path)
    return db_path


class SlowBuilder:
    """A real builder taking `delay` s more per build, and the list of builds it started."""

    def __init__(self, tmp_path: Path, db_path: Path, delay: float) -> None:
        script = tmp_path / "slow_builder.py"
        script.write_text(SLOW_BUILDER)
        self.log = tmp_path / "builds.log"
        self.log.touch()
        self.builder = serve.Builder(
            db_path, argv=[sys.executable, str(script), str(db_path), str(self.log), str(delay)]
        )

    def builds(self) -> list[str]:
        return self.log.read_text().splitlines()

    def wait_builds(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.builds()) < count:
            assert time.monotonic() < deadline, f"builds so far: {self.builds()}"
            time.sleep(0.01)


def get(url: str, target: str, timeout: float = 10.0) -> tuple[int, bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", target)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def users_of(body: bytes) -> dict[str, tuple]:
    return {r["username"]: numbers(r) for r in json.loads(body)["users"]}


def in_background(fn, *args):
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn(*args)))
    thread.start()
    return thread, result


# --- the builder builds, the loop keeps serving ------------------------------------------


def test_whole_ledger_answers_come_from_the_builder_and_equal_the_payload(seeded):
    with server_thread(seeded) as url:
        status, body = get(url, "/stats")
        assert status == 200
        conn = db.connect(seeded, readonly=True)
        try:
            expected = stats.stats_payload(conn)
        finally:
            conn.close()
        assert json.loads(body) == expected
        status, text = get(url, "/metrics")
        assert status == 200
        assert 'slurm_quota_user_open_jobs{username="alice"} 3' in text.decode().splitlines()


def test_other_clients_are_answered_while_a_whole_ledger_answer_is_built(seeded, tmp_path):
    slow = SlowBuilder(tmp_path, seeded, delay=4.0)
    with server_thread(seeded, builder=slow.builder) as url:
        thread, result = in_background(get, url, "/stats")
        slow.wait_builds(1)
        for _ in range(20):  # all answered while the build is in progress
            status, body = get(url, "/stats?username=alice")
            assert status == 200
            assert users_of(body) == {"alice": EXPECTED_USERS["alice"]}
            assert get(url, "/health")[0] == 200
        assert thread.is_alive()  # the whole-ledger client still waits for its answer
        thread.join(timeout=10)
        status, body = result["value"]
        assert status == 200
        assert users_of(body) == EXPECTED_USERS


def test_requests_arriving_during_a_build_share_it(seeded, tmp_path):
    slow = SlowBuilder(tmp_path, seeded, delay=0.5)
    with server_thread(seeded, builder=slow.builder) as url:
        with ThreadPoolExecutor(max_workers=20) as pool:
            answers = list(pool.map(lambda _i: get(url, "/metrics"), range(20)))
        assert {status for status, _ in answers} == {200}
        assert len({body for _, body in answers}) == 1
        assert slow.builds() == ["/metrics"]
        assert get(url, "/metrics") == answers[0]  # cached: the ledger did not change
        assert slow.builds() == ["/metrics"]


def test_a_request_after_a_write_waits_for_a_build_that_holds_the_write(seeded, tmp_path):
    slow = SlowBuilder(tmp_path, seeded, delay=0.8)
    with server_thread(seeded, builder=slow.builder) as url:
        first, first_result = in_background(get, url, "/stats")
        slow.wait_builds(1)
        time.sleep(0.2)  # the first build has read the ledger: its answer lacks the write
        writer = db.connect(seeded)
        writer.execute("UPDATE users SET total_consumed_cpu_minutes = 4321 WHERE username='dave'")
        writer.close()
        status, body = get(url, "/stats")  # arrives after the write, during the first build
        assert status == 200
        assert users_of(body)["dave"][0] == 4321
        first.join(timeout=10)
        assert first_result["value"][0] == 200
        assert users_of(first_result["value"][1])["dave"][0] == 0
        assert slow.builds() == ["/stats", "/stats"]


def test_a_pipelined_request_behind_a_waiting_one_is_answered_after_it(seeded, tmp_path):
    slow = SlowBuilder(tmp_path, seeded, delay=0.3)
    with server_thread(seeded, builder=slow.builder) as url:
        port = urlsplit(url).port
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(
                b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n"
                b"HEAD /stats HTTP/1.1\r\nHost: t\r\n\r\n"
                b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
            )
            data = b""
            while chunk := client.recv(65536):
                data += chunk
        assert re.findall(rb"HTTP/1\.1 \d+ [A-Za-z ]+\r\n", data) == [b"HTTP/1.1 200 OK\r\n"] * 3
        assert data.index(b"slurm_quota_user_consumed_minutes") < data.index(b'"status":"ok"')
        assert slow.builds() == ["/metrics", "/stats"]


def test_a_client_leaving_while_its_answer_is_built_harms_nobody(seeded, tmp_path):
    slow = SlowBuilder(tmp_path, seeded, delay=0.5)
    with server_thread(seeded, builder=slow.builder) as url:
        port = urlsplit(url).port
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"GET /stats HTTP/1.1\r\nHost: t\r\n\r\n")
            slow.wait_builds(1)
        status, body = get(url, "/stats")  # the build in progress serves this one
        assert status == 200
        assert users_of(body) == EXPECTED_USERS
        assert slow.builds() == ["/stats"]


def test_a_missing_ledger_is_a_503_from_the_builder_and_not_kept(tmp_path):
    path = tmp_path / "later.db"
    with server_thread(path) as url:
        status, body = get(url, "/stats")
        assert status == 503
        assert json.loads(body)["error"] == "unavailable"
        db.migrate(path)
        seed_ledger(path)
        status, body = get(url, "/stats")
        assert status == 200
        assert users_of(body) == EXPECTED_USERS


# --- --max-stale ------------------------------------------------------------------------


def set_dave(db_path: Path, minutes: int) -> None:
    writer = db.connect(db_path)
    writer.execute("UPDATE users SET total_consumed_cpu_minutes = ? WHERE username = 'dave'",
                   (minutes,))
    writer.close()


def test_max_stale_sends_a_recent_answer_at_once_and_builds_a_fresh_one(seeded, tmp_path):
    slow = SlowBuilder(tmp_path, seeded, delay=2.0)
    with server_thread(seeded, builder=slow.builder, max_stale_s=30) as url:
        assert users_of(get(url, "/stats")[1])["dave"][0] == 0  # nothing cached: waits
        set_dave(seeded, 111)
        started = time.monotonic()
        status, body = get(url, "/stats")
        assert time.monotonic() - started < 1.5  # not the 2 s of a build
        assert status == 200 and users_of(body)["dave"][0] == 0  # the recent copy
        slow.wait_builds(2)  # ...and a fresh one is on its way
        deadline = time.monotonic() + 10
        while users_of(get(url, "/stats")[1])["dave"][0] != 111:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert slow.builds() == ["/stats", "/stats"]  # one refresh, not one per request


def test_max_stale_is_a_bound_older_answers_are_not_sent(seeded, tmp_path):
    slow = SlowBuilder(tmp_path, seeded, delay=0.3)
    with server_thread(seeded, builder=slow.builder, max_stale_s=0.5) as url:
        assert users_of(get(url, "/stats")[1])["dave"][0] == 0
        time.sleep(1.0)  # the copy is now older than 0.5 s
        set_dave(seeded, 222)
        assert users_of(get(url, "/stats")[1])["dave"][0] == 222  # waited for a build


def test_without_max_stale_a_request_after_a_write_never_gets_the_old_answer(seeded):
    with server_thread(seeded) as url:
        for minutes in range(1, 30):
            set_dave(seeded, minutes)
            assert users_of(get(url, "/stats")[1])["dave"][0] == minutes


def test_serve_max_stale_option(seeded):
    from tests.web.readside import serve_process

    with serve_process(seeded, "--max-stale", "600", "--processes", "1") as (_proc, url):
        assert users_of(get(url, "/stats")[1])["dave"][0] == 0
        set_dave(seeded, 5)
        assert users_of(get(url, "/stats")[1])["dave"][0] == 0  # the copy, sent at once
    bad = subprocess.run(
        [SLURM_QUOTA_BIN, "--db", str(seeded), "serve", "--max-stale", "-1"],
        capture_output=True, text=True, timeout=30,
    )
    assert bad.returncode == 2
    assert "--max-stale" in bad.stderr


# --- a builder that fails ----------------------------------------------------------------


def test_a_killed_builder_is_replaced_and_waiting_clients_still_get_their_answer(
    seeded, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(serve, "BUILDER_RETRY_S", 0.3)
    slow = SlowBuilder(tmp_path, seeded, delay=2.0)
    with server_thread(seeded, builder=slow.builder) as url:
        thread, result = in_background(get, url, "/stats")
        slow.wait_builds(1)
        first = slow.builder.proc
        assert first is not None
        first.kill()
        thread.join(timeout=10)
        status, body = result["value"]
        assert status == 200  # built in the server process instead
        assert users_of(body) == EXPECTED_USERS
        assert "the builder process failed (the builder process ended)" in caplog.text
        deadline = time.monotonic() + 10
        while slow.builder.proc is None or slow.builder.proc is first:
            assert time.monotonic() < deadline, "no new builder"
            time.sleep(0.05)
        writer = db.connect(seeded)
        writer.execute("UPDATE users SET quota_cpu_minutes = 7 WHERE username = 'carol'")
        writer.close()
        assert users_of(get(url, "/stats")[1])["carol"][2] == 7
        assert slow.builds() == ["/stats", "/stats"]  # the new builder built it


# A builder whose etag would smuggle a header line into the answers.
ETAG_WITH_A_HEADER = (
    "import json, sys\n"
    "sys.stdin.readline()\n"
    "print(json.dumps({'key': 'stats', 'status': 200, 'type': 'x', 'body': 0, 'gzip': -1,"
    " 'etag': '\"a\\r\\nX-Injected: 1\"'}), flush=True)\n"
)


@pytest.mark.parametrize(
    "script, why",
    [
        ("import sys\nsys.stdin.readline()\nprint('not json', flush=True)\n", "malformed header"),
        ("import sys\nsys.stdin.readline()\nprint('{\"key\": \"metrics\"}', flush=True)\n",
         "answered 'metrics' unasked"),
        ("import sys\nsys.exit(3)\n", "ended"),
        (ETAG_WITH_A_HEADER, "malformed header: etag"),
    ],
    ids=["garbage", "unasked", "exits", "header-in-etag"],
)
def test_a_builder_breaking_the_protocol_is_dropped_and_the_answer_built_here(
    seeded, tmp_path, caplog, script, why
):
    path = tmp_path / "bad_builder.py"
    path.write_text(script)
    bad = serve.Builder(seeded, argv=[sys.executable, str(path)])
    with server_thread(seeded, builder=bad) as url:
        status, body = get(url, "/stats")
        assert status == 200
        assert users_of(body) == EXPECTED_USERS
        assert get(url, "/health")[0] == 200
    assert why in caplog.text


# The builder below has written and exited before read() runs: end of file and the bytes
# before it arrive in one read. What it wrote decides the outcome, not the exit.
ONE_ANSWER_THEN_EXIT = (
    "import json, sys\n"
    "sys.stdin.readline()\n"
    "sys.stdout.write(json.dumps({'key': 'stats', 'status': 200, 'type': 'application/json',"
    " 'body': 2, 'gzip': -1, 'etag': '\"ab\"'}) + '\\n{}')\n"
)


def exited_builder(tmp_path: Path, seeded: Path, script: str) -> serve.Builder:
    """A real builder process, asked for /stats, that has finished writing and exited."""
    path = tmp_path / "exiting_builder.py"
    path.write_text(script)
    builder = serve.Builder(seeded, argv=[sys.executable, str(path)])
    builder.start()
    builder.ask("stats")
    assert builder.proc is not None
    builder.proc.stdin.close()  # type: ignore[union-attr]
    assert builder.proc.wait(timeout=30) is not None
    return builder


@pytest.mark.parametrize(
    "script, why",
    [
        ("import sys\nsys.stdin.readline()\nprint('{\"key\": \"metrics\"}')\n",
         "the builder answered 'metrics' unasked"),
        ("import sys\nsys.stdin.readline()\nprint('not json')\n",
         "the builder sent a malformed header"),
        ("import sys\nsys.stdin.readline()\nsys.stdout.write('{\"key\": \"st')\n",
         "the builder process ended"),
        ("import sys\nsys.exit(3)\n", "the builder process ended"),
    ],
    ids=["unasked", "garbage", "half-a-header", "nothing"],
)
def test_what_an_exited_builder_wrote_is_judged_before_its_exit(tmp_path, seeded, script, why):
    builder = exited_builder(tmp_path, seeded, script)
    try:
        with pytest.raises(EOFError) as raised:
            builder.read()
        assert str(raised.value).startswith(why)
    finally:
        builder.stop()


def test_an_answer_finished_before_the_builder_exited_is_kept(tmp_path, seeded):
    builder = exited_builder(tmp_path, seeded, ONE_ANSWER_THEN_EXIT)
    try:
        [(key, response)] = builder.read()
        assert (key, response.status, response.body, response.etag) == ("stats", 200, b"{}", '"ab"')
        assert not builder.asked
        with pytest.raises(EOFError, match="the builder process ended"):
            builder.read()  # the end of file is reported on the next read
    finally:
        builder.stop()


def test_a_builder_that_cannot_start_leaves_the_answers_to_the_server(seeded, caplog):
    missing = serve.Builder(seeded, argv=["/nonexistent/python3", "-m", "x"])
    with server_thread(seeded, builder=missing) as url:
        status, body = get(url, "/stats")
        assert status == 200
        assert users_of(body) == EXPECTED_USERS
    assert "Cannot start the builder process" in caplog.text


def test_a_builder_silent_past_the_build_timeout_is_replaced(
    seeded, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(serve, "BUILD_TIMEOUT_S", 0.5)
    path = tmp_path / "hung_builder.py"
    path.write_text("import sys, time\nsys.stdin.readline()\ntime.sleep(600)\n")
    hung = serve.Builder(seeded, argv=[sys.executable, str(path)])
    with server_thread(seeded, builder=hung) as url:
        started = time.monotonic()
        status, body = get(url, "/metrics")
        assert status == 200
        assert time.monotonic() - started < 5.0
        assert b"slurm_quota_schema_version" in body
    assert "no answer in 0.5 s" in caplog.text


# --- the builder process on its own --------------------------------------------------------


def test_builder_run_frames_each_answer_after_a_header(seeded):
    conn = db.connect(seeded)  # answers over GZIP_MIN_BYTES, so both copies are sent
    conn.executemany(
        "INSERT INTO users (username) VALUES (?)", [(f"user{i:03d}",) for i in range(200)]
    )
    conn.close()
    out = io.BytesIO()
    assert serve_builder.run(str(seeded), io.BytesIO(b"stats\nmetrics\n"), out) == 0
    data = out.getvalue()
    for key in ("stats", "metrics"):
        end = data.index(b"\n")
        header = json.loads(data[:end])
        assert header["key"] == key and header["status"] == 200
        body = data[end + 1 : end + 1 + header["body"]]
        gzipped = data[end + 1 + header["body"] : end + 1 + header["body"] + header["gzip"]]
        assert len(gzipped) == header["gzip"] > 0
        assert gzip.decompress(gzipped) == body
        data = data[end + 1 + header["body"] + header["gzip"] :]
        if key == "stats":
            assert {u: users_of(body)[u] for u in EXPECTED_USERS} == EXPECTED_USERS
            assert header["type"] == "application/json"
    assert data == b""


def test_builder_run_refuses_an_unknown_request(seeded, caplog):
    out = io.BytesIO()
    assert serve_builder.run(str(seeded), io.BytesIO(b"health\n"), out) == 2
    assert out.getvalue() == b""
    assert "unknown request 'health'" in caplog.text


def test_builder_main_usage(capsys):
    assert serve_builder.main([]) == 2
    assert "usage:" in capsys.readouterr().err
