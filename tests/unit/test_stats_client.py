"""`slurm-quota stats`: HTTP mode, local mode, selectors, and the client's error paths."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from slurm_quota.cli import main
from tests.web.readside import EXPECTED_USERS, numbers, seed_ledger, server_thread


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("SLURM_QUOTA_DB", "SLURM_QUOTA_URL", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def seeded(db_path):
    seed_ledger(db_path)
    return db_path


@pytest.fixture
def url(seeded):
    with server_thread(seeded) as base:
        yield base


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@contextlib.contextmanager
def fake_service(status: int, body: bytes, content_type: str = "application/json"):
    """A stand-in for the service that answers every GET with status and body."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there any more
    return port


# --- HTTP mode -------------------------------------------------------------------------


def test_http_mode_prints_the_user_and_their_accounts(capsys, url):
    code, out, err = run(capsys, "stats", "alice", "--url", url)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    alice = next(line for line in lines if line.startswith("alice "))
    assert alice.split()[2:5] == ["1200", "250(3)", "5000"]
    assert [line.split()[0] for line in lines if line.startswith(("hpc ", "phys "))] == [
        "hpc", "phys",
    ]
    assert "\x1b[" not in out  # not a terminal: no colour


def test_http_mode_reads_slurm_quota_url(capsys, url, monkeypatch):
    monkeypatch.setenv("SLURM_QUOTA_URL", url.rstrip("/"))  # with or without the slash
    code, out, _ = run(capsys, "stats", "--account", "hpc")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()[3:]] == ["hpc"]
    assert "USER " not in out


def test_json_prints_the_service_payload(capsys, url):
    code, out, _ = run(capsys, "stats", "--all", "--json", "--url", url)
    assert code == 0
    payload = json.loads(out)
    assert {r["username"]: numbers(r) for r in payload["users"]} == EXPECTED_USERS


def test_without_selector_shows_the_calling_user(capsys, seeded, monkeypatch):
    import pwd

    me = pwd.getpwuid(__import__("os").getuid()).pw_name
    from slurm_quota import db

    conn = db.connect(seeded)
    conn.execute(
        "INSERT INTO users (username, total_consumed_cpu_minutes) VALUES (?, 4242)", (me,)
    )
    conn.close()
    with server_thread(seeded) as base:
        code, out, _ = run(capsys, "stats", "--url", base)
    assert code == 0
    mine = [line for line in out.splitlines() if line.startswith(f"{me} ")]
    assert len(mine) == 1 and mine[0].split()[2] == "4242"
    assert "alice" not in out


def test_unknown_user_says_no_data_found(capsys, url):
    code, out, _ = run(capsys, "stats", "--user", "zed", "--url", url)
    assert (code, out) == (0, "No data found for user: zed\n")
    code, out, _ = run(capsys, "stats", "--account", "nope", "--url", url)
    assert (code, out) == (0, "No data found for account: nope\n")


def test_color_always_and_never(capsys, url, monkeypatch):
    assert "\x1b[32m" in run(capsys, "stats", "alice", "--url", url, "--color", "always")[1]
    assert "\x1b[" not in run(capsys, "stats", "alice", "--url", url, "--color", "never")[1]


# --- selectors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["alice", "--account", "hpc"],
        ["alice", "--user", "bob"],
        ["--user", "alice", "--account", "hpc"],
        ["--all", "--account", "hpc"],
        ["alice", "--all"],
        ["--user", ""],
    ],
)
def test_conflicting_selectors_are_a_usage_error(capsys, args):
    code, out, err = run(capsys, "stats", *args, "--url", f"http://127.0.0.1:{closed_port()}/")
    assert code == 2
    assert out == ""
    assert "Error" in err


# --- error paths -----------------------------------------------------------------------


def test_service_down_is_exit_75_naming_the_url(capsys):
    port = closed_port()
    code, out, err = run(capsys, "stats", "alice", "--url", f"http://127.0.0.1:{port}/")
    assert code == 75
    assert out == ""
    assert f"http://127.0.0.1:{port}/stats" in err
    assert "did not answer" in err
    assert "Traceback" not in err


def test_answer_that_is_not_json_is_exit_1(capsys):
    with fake_service(200, b"<html>hello</html>", "text/html") as base:
        code, out, err = run(capsys, "stats", "alice", "--url", base)
    assert (code, out) == (1, "")
    assert "not slurm-quota statistics" in err


def test_json_of_another_shape_is_exit_1(capsys):
    body = json.dumps({"users": [{"username": "x"}], "accounts": []}).encode()
    with fake_service(200, body) as base:
        code, _, err = run(capsys, "stats", "alice", "--url", base)
    assert code == 1
    assert "lacks total_consumed_cpu_minutes" in err


def test_server_error_500_is_exit_1(capsys):
    body = json.dumps({"error": "internal", "message": "Internal error; see the service log."})
    with fake_service(500, body.encode()) as base:
        code, _, err = run(capsys, "stats", "alice", "--url", base)
    assert code == 1
    assert "HTTP 500" in err and "Internal error" in err


def test_service_unavailable_503_is_exit_75(capsys):
    body = json.dumps({"error": "unavailable", "message": "The database x is locked."})
    with fake_service(503, body.encode()) as base:
        code, _, err = run(capsys, "stats", "alice", "--url", base)
    assert code == 75
    assert "The database x is locked." in err


def test_wrong_address_404_is_exit_1(capsys):
    with fake_service(404, b"{}") as base:
        code, _, err = run(capsys, "stats", "alice", "--url", base)
    assert code == 1
    assert "HTTP 404" in err


def test_bad_url_is_a_usage_error(capsys):
    code, _, err = run(capsys, "stats", "alice", "--url", "ftp://example/")
    assert code == 2
    assert "SLURM_QUOTA_URL" in err


# --- local mode ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "selector",
    [["alice"], ["--user", "carol"], ["--account", "hpc"], ["--all"], ["--all", "--hours"],
     ["--user", "zed"]],
)
def test_local_and_http_modes_print_the_same_tables(capsys, seeded, url, selector):
    http = run(capsys, "stats", *selector, "--url", url, "--color", "always")
    local = run(capsys, "--db", str(seeded), "stats", *selector, "--color", "always")
    assert http[0] == local[0] == 0
    assert http[1] == local[1]
    assert http[1].strip()
    if selector[-1] not in ("zed", "carol"):  # carol and bio are unlimited: no bars
        assert "\x1b[" in http[1]


def test_local_and_http_json_are_equal(capsys, seeded, url):
    http = run(capsys, "stats", "--all", "--json", "--url", url)
    local = run(capsys, "--db", str(seeded), "stats", "--all", "--json")
    assert json.loads(http[1]) == json.loads(local[1])


def test_slurm_quota_db_in_the_environment_means_local_mode(capsys, seeded, monkeypatch):
    monkeypatch.setenv("SLURM_QUOTA_DB", str(seeded))
    monkeypatch.setenv("SLURM_QUOTA_URL", f"http://127.0.0.1:{closed_port()}/")  # unused
    code, out, _ = run(capsys, "stats", "bob")
    assert code == 0
    assert next(line for line in out.splitlines() if line.startswith("bob ")).split()[3] == (
        "307(2)"
    )


def test_explicit_url_wins_over_the_database_setting(capsys, seeded, url, monkeypatch):
    monkeypatch.setenv("SLURM_QUOTA_DB", "/nonexistent/ledger.db")
    code, out, _ = run(capsys, "stats", "bob", "--url", url)
    assert code == 0
    assert "bob " in out


def test_local_with_url_is_a_usage_error(capsys, seeded, url):
    code, _, err = run(capsys, "stats", "--local", "--url", url, "alice")
    assert code == 2
    assert "--local" in err


def test_local_mode_on_a_missing_database_is_an_error(capsys, tmp_path):
    code, out, err = run(capsys, "--db", str(tmp_path / "none.db"), "stats", "--all")
    assert code == 1
    assert "does not exist" in err
