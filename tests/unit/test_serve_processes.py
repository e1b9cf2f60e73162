"""`slurm-quota serve --processes N`: forked server processes on one socket, supervised.

Real processes throughout; the process tree is read from /proc. Every process started here
(the serve parent, and its children should the parent fail to stop them) is stopped by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from slurm_quota import db, serve
from tests.unit.test_serve_process import _activated
from tests.web.readside import EXPECTED_USERS, SLURM_QUOTA_BIN, numbers, seed_ledger

_LISTEN_LINE = re.compile(r"on http://127\.0\.0\.1:(\d+)/")


class Log:
    """The lines a process writes to stderr, collected by a thread as they come."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._collect, args=(stream,), daemon=True)
        self._thread.start()

    def _collect(self, stream) -> None:
        for line in stream:
            self.lines.append(line)

    def text(self) -> str:
        self._thread.join(timeout=5)  # the process has ended: all of it is in
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 10) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = re.search(pattern, line)
                if match:
                    return match
            time.sleep(0.02)
        raise AssertionError(f"no log line matching {pattern!r} in {self.lines!r}")


def children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is pid, from /proc/*/stat."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            found.append(int(entry))
    return sorted(found)


def descendants(pid: int) -> list[int]:
    """Live children of pid, their children, and so on."""
    found = children(pid)
    for child in list(found):
        found += descendants(child)
    return sorted(found)


def builders_of(pid: int) -> list[int]:
    """The builder processes (python -m slurm_quota.serve_builder) among pid's children."""
    found = []
    for child in children(pid):
        with contextlib.suppress(OSError):
            if b"slurm_quota.serve_builder" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_children(pid: int, count: int, *, not_in: tuple[int, ...] = ()) -> list[int]:
    """The children of pid once there are `count` of them, none of them in not_in."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = children(pid)
        if len(found) == count and not set(found) & set(not_in):
            return found
        time.sleep(0.02)
    raise AssertionError(f"process {pid} has children {children(pid)}, wanted {count}")


def stop(proc: subprocess.Popen, known_children: list[int]) -> None:
    """Stop the serve process and any child it left behind (by pid)."""
    known = set(known_children) | set(descendants(proc.pid))
    if proc.poll() is None:
        for pid in known:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)  # a stopped child would ignore SIGTERM
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for pid in known:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def kept_alive_after_health(url: str) -> Iterator[socket.socket]:
    """A connection that got its 200 to GET /health (HTTP/1.1: the server keeps it open)."""
    port = int(url.rsplit(":", 1)[1].strip("/"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        assert client.recv(65536).startswith(b"HTTP/1.1 200 OK")
        yield client


@contextlib.contextmanager
def serving(db_path: Path, *args: str) -> Iterator[tuple[subprocess.Popen, str, Log, list]]:
    """`slurm-quota serve --port 0 ARGS`; yields (process, base URL, its log, pids to clean)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    proc = subprocess.Popen(
        [SLURM_QUOTA_BIN, "--db", str(db_path), "serve", "--port", "0", *args],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    seen: list[int] = []
    try:
        assert proc.stderr is not None
        log = Log(proc.stderr)
        match = log.wait_for(_LISTEN_LINE.pattern)
        yield proc, f"http://127.0.0.1:{match.group(1)}/", log, seen
    finally:
        stop(proc, seen)


def get_json(url: str) -> tuple[int, dict]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, json.loads(resp.read())


def assert_alice(url: str) -> None:
    status, body = get_json(url + "stats?username=alice")
    assert status == 200
    assert [numbers(r) for r in body["users"]] == [EXPECTED_USERS["alice"]]


@pytest.fixture
def seeded(db_path):
    seed_ledger(db_path)
    return db_path


# --- the process tree ------------------------------------------------------------------


def test_processes_2_forks_exactly_two_server_children(seeded):
    with serving(seeded, "--processes", "2", "--idle-timeout", "0") as (proc, url, log, seen):
        seen += wait_children(proc.pid, 2)
        assert_alice(url)
        assert children(proc.pid) == sorted(seen)
        assert log.lines[0].rstrip().endswith(", 2 processes")
        for server in list(seen):  # each server process has its own builder process
            builders = wait_children(server, 1)
            assert builders == builders_of(server)
            seen += builders


def test_processes_1_serves_in_the_process_itself_with_one_builder(seeded):
    with serving(seeded, "--processes", "1", "--idle-timeout", "0") as (proc, url, log, seen):
        assert_alice(url)
        assert get_json(url + "stats")[0] == 200  # built by the builder
        seen += children(proc.pid)
        assert seen == builders_of(proc.pid) and len(seen) == 1
        assert log.lines[0].rstrip().endswith(", 1 process")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert [pid for pid in seen if alive(pid)] == []


def test_each_of_two_processes_answers_while_the_other_is_stopped(seeded):
    with serving(seeded, "--processes", "2", "--idle-timeout", "0") as (proc, url, _log, seen):
        seen += wait_children(proc.pid, 2)
        for frozen in seen:
            os.kill(frozen, signal.SIGSTOP)  # only the other one can accept and answer
            try:
                for _ in range(3):
                    assert_alice(url)
            finally:
                os.kill(frozen, signal.SIGCONT)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_to_the_parent_stops_every_child_and_exits_0(seeded, sig):
    with serving(seeded, "--processes", "2", "--idle-timeout", "0") as (proc, url, log, seen):
        seen += wait_children(proc.pid, 2)
        assert_alice(url)
        with urllib.request.urlopen(url + "metrics", timeout=10) as resp:  # a builder at work
            assert resp.status == 200 and b"slurm_quota_user_consumed_minutes" in resp.read()
        for server in list(seen):
            seen += wait_children(server, 1)
        assert len(seen) == 4
        proc.send_signal(sig)
        assert proc.wait(timeout=15) == 0
        assert [pid for pid in seen if alive(pid)] == []  # builders included
        assert "did not stop" not in log.text()
        assert "Traceback" not in log.text()


def test_a_stop_does_not_wait_for_idle_keep_alive_clients(seeded):
    with serving(seeded, "--processes", "2", "--idle-timeout", "0") as (proc, url, log, seen):
        seen += wait_children(proc.pid, 2)
        with kept_alive_after_health(url) as client:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
            assert client.recv(65536) == b""  # closed by its server process on the way out
        assert "did not stop" not in log.text()
        assert [pid for pid in seen if alive(pid)] == []


def test_max_stale_reaches_every_server_process(seeded):
    with serving(seeded, "--processes", "2", "--max-stale", "600") as (proc, url, log, seen):
        seen += wait_children(proc.pid, 2)
        log.wait_for(r"may be sent up to 600 s old")

        def dave_alone(frozen: int) -> int:
            """dave's consumed minutes in /stats, answered by the process other than frozen."""
            os.kill(frozen, signal.SIGSTOP)
            try:
                return get_json(url + "stats")[1]["users"][3]["total_consumed_cpu_minutes"]
            finally:
                os.kill(frozen, signal.SIGCONT)

        assert [dave_alone(frozen) for frozen in seen] == [0, 0]  # each one has it cached
        conn = db.connect(seeded)
        conn.execute("UPDATE users SET total_consumed_cpu_minutes = 9 WHERE username = 'dave'")
        conn.close()
        assert [dave_alone(frozen) for frozen in seen] == [0, 0]  # each sends its copy at once


# --- supervision -----------------------------------------------------------------------


def test_a_killed_server_process_is_replaced(seeded):
    with serving(seeded, "--processes", "2", "--idle-timeout", "0") as (proc, url, log, seen):
        first = wait_children(proc.pid, 2)
        seen += first
        victim, survivor = first
        (orphan,) = wait_children(victim, 1)  # the victim's builder
        seen.append(orphan)
        os.kill(victim, signal.SIGKILL)
        now = wait_children(proc.pid, 2, not_in=(victim,))
        seen += now
        assert survivor in now
        (replacement,) = set(now) - {survivor}
        log.wait_for(rf"server process {victim} ended \(wait status \d+\); starting another")
        os.kill(survivor, signal.SIGSTOP)  # so the replacement is the one answering
        try:
            assert_alice(url)
        finally:
            os.kill(survivor, signal.SIGCONT)
        assert alive(replacement)
        assert proc.poll() is None
        deadline = time.monotonic() + 10
        while alive(orphan):  # its input closed with its server process: it ends by itself
            assert time.monotonic() < deadline, "the builder of a killed server lives on"
            time.sleep(0.02)


def test_five_deaths_within_ten_seconds_stop_the_service_with_exit_75(seeded):
    with serving(seeded, "--processes", "2", "--idle-timeout", "0") as (proc, _url, log, seen):
        kills = 0
        victims: set[int] = set()
        deadline = time.monotonic() + 30
        while proc.poll() is None and kills < 10:
            assert time.monotonic() < deadline
            current = [pid for pid in children(proc.pid) if pid not in victims]
            if len(current) < 2:  # the replacement is not there yet
                time.sleep(0.02)
                continue
            seen += current
            victims.add(current[0])
            os.kill(current[0], signal.SIGKILL)
            kills += 1
        assert proc.wait(timeout=15) == 75
        assert kills == 5
        text = log.text()
        assert "keep failing (5 within 10 s)" in text
        assert "Traceback" not in text
        assert [pid for pid in seen if alive(pid)] == []


def test_a_stop_while_a_server_process_starts_does_not_wait_for_the_grace_period(
    seeded, tmp_path
):
    # The race is made certain: each server process, while starting, has the parent stopped
    # and takes 1 s to finish starting. The grace period is cut to 2 s to keep this short.
    script = tmp_path / "starting_stop.py"
    script.write_text(
        "import logging, os, signal, sys, time\n"
        "from slurm_quota import serve\n"
        "logging.basicConfig(stream=sys.stderr, level=logging.INFO, format='%(message)s')\n"
        "serve._stop_children.__defaults__ = (2.0,)\n"
        "original = serve.QuotaHTTPServer.__init__\n"
        "def starting(self, *args, **kwargs):\n"
        "    original(self, *args, **kwargs)\n"
        "    os.kill(os.getppid(), signal.SIGTERM)\n"
        "    time.sleep(1.0)\n"
        "serve.QuotaHTTPServer.__init__ = starting\n"
        "sock = serve.listen_socket('127.0.0.1', 0)\n"
        "serve.serve_processes(sock, sys.argv[1], processes=1, idle_timeout_s=0)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(script), str(seeded)], stderr=subprocess.PIPE, text=True
    )
    seen: list[int] = []
    try:
        seen += wait_children(proc.pid, 1)
        _out, err = proc.communicate(timeout=20)
    finally:
        stop(proc, seen)
    assert proc.returncode == 0
    assert "signal 15: stopping" in err
    assert "did not stop in" not in err


def test_default_processes_is_one_per_cpu_at_most_four(monkeypatch):
    results = {}
    for cpus in (None, 1, 3, 4, 16):
        monkeypatch.setattr(serve.os, "cpu_count", lambda cpus=cpus: cpus)
        results[cpus] = serve.default_processes()
    assert results == {None: 1, 1: 1, 3: 3, 4: 4, 16: 4}


@pytest.mark.parametrize("value", ["0", "65", "two"])
def test_processes_out_of_range_is_a_usage_error(db_path, value):
    proc = subprocess.run(
        [SLURM_QUOTA_BIN, "--db", str(db_path), "serve", "--port", "0", "--processes", value],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2
    assert "Invalid value for '--processes'" in proc.stderr
    assert "serving" not in proc.stderr
    assert "Traceback" not in proc.stderr


# --- idle exit -------------------------------------------------------------------------


def test_idle_timeout_with_two_processes_exits_0_and_leaves_no_child(seeded):
    with serving(seeded, "--processes", "2", "--idle-timeout", "1") as (proc, url, log, seen):
        seen += wait_children(proc.pid, 2)
        assert_alice(url)
        assert proc.wait(timeout=15) == 0
        text = log.text()
        assert "no request for 1 s: exiting" in text
        assert "did not stop" not in text  # the children stopped when asked, not killed
        assert [pid for pid in seen if alive(pid)] == []


def test_an_open_connection_to_any_process_holds_off_the_idle_exit(seeded):
    with serving(seeded, "--processes", "2", "--idle-timeout", "1") as (proc, url, _log, seen):
        seen += wait_children(proc.pid, 2)
        with kept_alive_after_health(url):
            # Kept open (HTTP/1.1) for 2.5 s: past the idle timeout, within the server's
            # keep-alive timeout (5 s).
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(timeout=2.5)
        assert proc.wait(timeout=15) == 0


def test_the_idle_exit_still_comes_after_a_process_with_a_connection_was_killed(seeded):
    with serving(seeded, "--processes", "2", "--idle-timeout", "1") as (proc, url, log, seen):
        first = wait_children(proc.pid, 2)
        seen += first
        with kept_alive_after_health(url):
            for pid in first:  # whichever holds the connection dies with it open
                os.kill(pid, signal.SIGKILL)
            seen += wait_children(proc.pid, 2, not_in=tuple(first))
        # No connection is open anywhere now: the idle exit comes about 1 s later.
        assert proc.wait(timeout=6) == 0


# --- socket activation -----------------------------------------------------------------


def test_socket_activation_with_two_processes_serves_on_the_passed_fd(seeded, listener):
    port = listener.getsockname()[1]
    # --host is an address this machine cannot bind: serving at all proves fd 3 was adopted.
    proc = _activated(
        seeded, listener, "self", "--host", "192.0.2.1", "--port", "9", "--idle-timeout", "0",
        "--processes", "2",
    )
    seen: list[int] = []
    try:
        seen += wait_children(proc.pid, 2)
        for _ in range(4):
            assert_alice(f"http://127.0.0.1:{port}/")
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=20)
    finally:
        stop(proc, seen)
    assert proc.returncode == 0
    assert "systemd socket (fd 3)" in err
    assert ", 2 processes" in err
    assert [pid for pid in seen if alive(pid)] == []
    # The socket stays "systemd's" (ours): the next client is still accepted.
    socket.create_connection(listener.getsockname(), timeout=5).close()
