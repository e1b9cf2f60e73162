"""`slurm-quota serve` as a real process: socket activation, idle exit, signals, bind errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest

from tests.web.readside import SLURM_QUOTA_BIN, seed_ledger, serve_process


def _get(url: str) -> tuple[int, dict]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, json.loads(resp.read())


_WRAPPER = """
import os, sys
fd, listen_pid, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
if fd != 3:
    os.dup2(fd, 3)  # dup2 leaves fd 3 inheritable, as systemd passes it
    os.close(fd)
os.environ.update(
    LISTEN_PID=str(os.getpid()) if listen_pid == "self" else listen_pid,
    LISTEN_FDS="1",
    LISTEN_FDNAMES="slurm-quota.socket",
)
os.execv(argv[0], argv)
"""


def _activated(db_path, listener: socket.socket, listen_pid: str, *serve_args: str):
    """Start serve with `listener` on fd 3 and LISTEN_FDS=1, as systemd does.

    A tiny wrapper moves the socket to fd 3, sets LISTEN_PID to its own pid ("self") or the
    given one, and execs slurm-quota, which therefore runs with that very pid.
    """
    n = listener.fileno()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    return subprocess.Popen(
        [sys.executable, "-c", _WRAPPER, str(n), listen_pid,
         SLURM_QUOTA_BIN, "--db", str(db_path), "serve", "--no-slurm-roles", *serve_args],
        pass_fds=(n,),
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_socket_activation_serves_on_the_passed_fd(db_path, listener):
    seed_ledger(db_path)
    port = listener.getsockname()[1]
    # --host is an address this machine cannot bind: serving at all proves fd 3 was adopted.
    proc = _activated(
        db_path, listener, "self", "--host", "192.0.2.1", "--port", "9", "--idle-timeout", "0"
    )
    try:
        status, body = _get(f"http://127.0.0.1:{port}/stats?username=alice")
        assert status == 200
        assert [r["username"] for r in body["users"]] == ["alice"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert "systemd socket (fd 3)" in err


def test_listen_pid_of_another_process_is_ignored(db_path, listener):
    proc = _activated(db_path, listener, "1", "--host", "192.0.2.1", "--port", "9")
    _out, err = proc.communicate(timeout=30)
    # Not ours: serve tries to bind --host/--port itself, which fails here.
    assert proc.returncode == 75
    assert "Cannot listen on 192.0.2.1:9" in err


def test_socket_activated_server_exits_when_idle_and_systemd_keeps_the_socket(db_path, listener):
    seed_ledger(db_path)
    proc = _activated(db_path, listener, "self", "--idle-timeout", "1")
    port = listener.getsockname()[1]
    assert _get(f"http://127.0.0.1:{port}/health")[0] == 200
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "no request for 1 s: exiting" in err
    # The listening socket belongs to "systemd" (us) and still accepts the next client.
    client = socket.create_connection(listener.getsockname(), timeout=5)
    client.close()


def test_idle_timeout_exits_with_status_0(db_path):
    with serve_process(db_path, "--idle-timeout", "1") as (proc, url):
        assert _get(url + "health")[1]["status"] == "ok"
        assert proc.wait(timeout=30) == 0


def test_idle_timeout_zero_keeps_serving(db_path):
    with serve_process(db_path, "--idle-timeout", "0") as (proc, url):
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=2.5)
        assert _get(url + "health")[0] == 200


def test_sigterm_stops_the_server_cleanly(db_path):
    with serve_process(db_path, "--idle-timeout", "0") as (proc, url):
        assert _get(url + "health")[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


def test_port_in_use_is_a_temporary_failure(db_path, listener):
    port = listener.getsockname()[1]
    proc = subprocess.run(
        [SLURM_QUOTA_BIN, "--db", str(db_path), "serve", "--port", str(port)],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 75
    assert f"Cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_starts_without_the_database_and_answers_503(tmp_path):
    missing = tmp_path / "later.db"
    with serve_process(missing, "--idle-timeout", "0") as (_proc, url):
        try:
            urllib.request.urlopen(url + "stats", timeout=10)
        except urllib.error.HTTPError as err:
            assert err.code == 503
            assert json.loads(err.read())["error"] == "unavailable"
        else:
            pytest.fail("expected HTTP 503")
