"""`slurm-quota serve`'s HTTP/1.1 connection handling: keep-alive, pipelining, timeouts,
answers the socket does not take at once, heads too large, bodies (server in a thread).

Routes and JSON errors are tested in test_serve.py; here the connection is the subject.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from slurm_quota import db, serve
from tests.web.readside import EXPECTED_USERS, numbers, seed_ledger, server_thread

BIG_USERS = 4000  # /stats is then about 1.4 MB uncompressed


@pytest.fixture
def base_url(db_path):
    seed_ledger(db_path)
    with server_thread(db_path) as url:
        yield url


@pytest.fixture
def big_ledger(db_path) -> Path:
    """The seeded ledger plus BIG_USERS users: /stats is larger than 1 MB."""
    seed_ledger(db_path)
    conn = db.connect(db_path)
    with db.write_transaction(conn):
        conn.executemany(
            "INSERT INTO users (username) VALUES (?)",
            [(f"user{i:05d}",) for i in range(BIG_USERS)],
        )
    conn.close()
    return db_path


@contextlib.contextmanager
def small_send_buffer_server(db_path: Path) -> Iterator[str]:
    """The real server on a listening socket whose connections have a 4 KB send buffer.

    Linux lets loopback send buffers grow to 4 MB, so without this a 1.4 MB answer is taken
    by the first send and the path "finish the answer when the socket is writable" is never
    taken. Accepted sockets inherit SO_SNDBUF from the listener.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    with server_thread(db_path, inherited=listener) as url:
        yield url


class RawClient:
    """A client on a plain socket: send any bytes, read answers one by one."""

    def __init__(self, base_url: str, *, rcvbuf: int | None = None, timeout: float = 10) -> None:
        parts = urlsplit(base_url)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect(), so the advertised window is small too
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((parts.hostname, parts.port))
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, size: int = 65536) -> None:
        chunk = self.sock.recv(size)
        if not chunk:
            raise EOFError(f"the server closed the connection; unread: {self.buffer[:200]!r}")
        self.buffer += chunk

    def answer(self, *, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        """The next answer: (status, headers with lower-case names, body)."""
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].startswith("HTTP/1.1 "), lines[0]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.lower()] = value.strip()
        length = 0 if head_only else int(headers["content-length"])
        while len(self.buffer) < length:
            self._fill()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(lines[0].split()[1]), headers, body

    def closed_by_server(self, wait_s: float = 3.0) -> bool:
        """True when the server closes the connection with nothing more sent within wait_s.

        wait_s is below serve.CONNECTION_TIMEOUT_S (5 s): a connection the server meant to
        keep is not mistaken for one it closed on purpose.
        """
        if self.buffer:
            return False
        self.sock.settimeout(wait_s)
        try:
            return self.sock.recv(65536) == b""
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def still_open(self) -> bool:
        """True when the server has neither closed nor sent anything (does not wait)."""
        timeout = self.sock.gettimeout()
        self.sock.setblocking(False)  # with a timeout set, recv() would wait for data
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(timeout)
        return False


@contextlib.contextmanager
def raw_client(base_url: str, **kwargs) -> Iterator[RawClient]:
    client = RawClient(base_url, **kwargs)
    try:
        yield client
    finally:
        client.close()


def get(path: str, *headers: str, version: str = "HTTP/1.1", method: str = "GET") -> bytes:
    """The bytes of one request."""
    return "\r\n".join([f"{method} {path} {version}", "Host: test", *headers, "", ""]).encode()


def health_of(body: bytes) -> dict:
    data = json.loads(body)
    assert data == {"status": "ok", "schema_version": db.latest_version()}
    return data


def user_numbers(body: bytes) -> dict:
    return {r["username"]: numbers(r) for r in json.loads(body)["users"]}


# --- keep-alive ------------------------------------------------------------------------


def test_http11_requests_reuse_one_connection(base_url):
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("GET", "/health")
        first = conn.getresponse()
        assert first.getheader("Connection") is None
        health_of(first.read())
        sock = conn.sock
        assert sock is not None  # http.client drops its socket when told to close
        conn.request("GET", "/stats?username=alice")
        second = conn.getresponse()
        body = second.read()
        # The same socket object: http.client reconnects (new socket) only after a close.
        assert conn.sock is sock
    finally:
        conn.close()
    assert second.status == 200
    assert user_numbers(body) == {"alice": EXPECTED_USERS["alice"]}


def test_http10_without_keep_alive_is_answered_then_closed(base_url):
    with raw_client(base_url) as client:
        client.send(get("/health", version="HTTP/1.0") + get("/health", version="HTTP/1.0"))
        status, headers, body = client.answer()
        assert status == 200
        assert headers["connection"] == "close"
        health_of(body)
        assert client.closed_by_server()


def test_http10_with_keep_alive_header_is_kept_open(base_url):
    with raw_client(base_url) as client:
        client.send(get("/health", "Connection: keep-alive", version="HTTP/1.0"))
        status, headers, body = client.answer()
        assert (status, headers["connection"]) == (200, "keep-alive")
        health_of(body)
        client.send(get("/stats?username=bob", "Connection: keep-alive", version="HTTP/1.0"))
        status, headers, body = client.answer()
        assert (status, headers["connection"]) == (200, "keep-alive")
        assert user_numbers(body) == {"bob": EXPECTED_USERS["bob"]}


def test_http11_connection_close_is_answered_then_closed(base_url):
    with raw_client(base_url) as client:
        client.send(get("/stats?username=carol", "Connection: close") + get("/health"))
        status, headers, body = client.answer()
        assert (status, headers["connection"]) == (200, "close")
        assert user_numbers(body) == {"carol": EXPECTED_USERS["carol"]}
        assert client.closed_by_server()


# --- pipelining ------------------------------------------------------------------------


def test_pipelined_requests_are_answered_in_order(base_url):
    with raw_client(base_url) as client:
        client.send(
            get("/stats?username=bob") + get("/health") + get("/stats?username=alice")
            + get("/stats?account=phys", "Connection: close")
        )
        answers = [client.answer() for _ in range(4)]
        assert client.closed_by_server()
    assert [status for status, _h, _b in answers] == [200, 200, 200, 200]
    assert user_numbers(answers[0][2]) == {"bob": EXPECTED_USERS["bob"]}
    health_of(answers[1][2])
    assert user_numbers(answers[2][2]) == {"alice": EXPECTED_USERS["alice"]}
    assert [r["account"] for r in json.loads(answers[3][2])["accounts"]] == ["phys"]


def test_head_on_a_kept_connection_sends_no_body_before_the_next_answer(base_url):
    with raw_client(base_url) as client:
        client.send(get("/stats?username=alice", method="HEAD") + get("/health"))
        status, headers, _ = client.answer(head_only=True)
        assert status == 200
        assert int(headers["content-length"]) > 0
        # Were the HEAD's body sent, these bytes would be JSON, not the next status line.
        status, _headers, body = client.answer()
        assert status == 200
        health_of(body)


def test_a_malformed_request_in_a_pipeline_gets_400_and_ends_the_connection(base_url):
    with raw_client(base_url) as client:
        client.send(get("/health") + b"NONSENSE\r\n\r\n" + get("/health"))
        assert client.answer()[0] == 200
        status, headers, body = client.answer()
        assert (status, headers["connection"]) == (400, "close")
        assert json.loads(body)["error"] == "bad_request"
        assert client.closed_by_server()  # the third request is not answered


def test_a_request_pipelined_behind_a_large_answer_is_answered_after_it(big_ledger):
    with small_send_buffer_server(big_ledger) as url, raw_client(url, rcvbuf=4096) as client:
        client.send(get("/stats") + get("/stats?username=dave"))
        status, _headers, body = client.answer()
        assert status == 200
        assert len(body) > 1_000_000
        assert len(json.loads(body)["users"]) == BIG_USERS + len(EXPECTED_USERS)
        status, _headers, body = client.answer()
        assert status == 200
        assert user_numbers(body) == {"dave": EXPECTED_USERS["dave"]}
        assert client.still_open()


# --- timeouts and a loop that is never blocked ------------------------------------------


def test_an_idle_keep_alive_connection_is_closed_after_the_connection_timeout(
    db_path, monkeypatch
):
    monkeypatch.setattr(serve, "CONNECTION_TIMEOUT_S", 0.3)
    seed_ledger(db_path)
    with server_thread(db_path) as url, raw_client(url) as client:
        client.send(get("/health"))
        assert client.answer()[0] == 200
        assert client.closed_by_server()  # within the client's 10 s, not never


def test_a_partial_request_head_then_silence_is_closed_after_the_timeout(db_path, monkeypatch):
    monkeypatch.setattr(serve, "CONNECTION_TIMEOUT_S", 0.3)
    with server_thread(db_path) as url, raw_client(url) as client:
        client.send(b"GET /health HTTP/1.1\r\nHost: te")
        assert client.closed_by_server()


def test_other_clients_are_served_while_a_request_head_is_incomplete(base_url):
    with raw_client(base_url) as slow:
        slow.send(b"GET /stats?username=alice HTTP/1.1\r\nHo")
        for user in ("bob", "carol", "dave"):
            with raw_client(base_url) as other:
                other.send(get(f"/stats?username={user}"))
                status, _headers, body = other.answer()
                assert status == 200
                assert user_numbers(body) == {user: EXPECTED_USERS[user]}
        assert slow.still_open()  # neither answered nor dropped meanwhile
        slow.send(b"st: test\r\n\r\n")
        status, _headers, body = slow.answer()
    assert status == 200
    assert user_numbers(body) == {"alice": EXPECTED_USERS["alice"]}


def test_a_slow_reader_of_a_large_answer_gets_all_of_it_while_others_are_served(
    big_ledger, monkeypatch
):
    # Pauses longer than the keep-alive timeout: an answer being sent is not "idle".
    monkeypatch.setattr(serve, "CONNECTION_TIMEOUT_S", 0.3)
    with small_send_buffer_server(big_ledger) as url, raw_client(url, rcvbuf=4096) as slow:
        slow.send(get("/stats"))
        with raw_client(url) as other:
            other.send(get("/health"))
            health_of(other.answer()[2])
        while b"\r\n\r\n" not in slow.buffer:
            slow._fill(4096)
        while len(slow.buffer) < 100_000:
            slow._fill(4096)
        time.sleep(1.0)
        with raw_client(url) as other:  # served while the slow answer is half sent
            other.send(get("/stats?username=bob"))
            assert user_numbers(other.answer()[2]) == {"bob": EXPECTED_USERS["bob"]}
        status, headers, body = slow.answer()
        assert slow.still_open()  # kept alive once the answer is complete
    assert status == 200
    assert "content-encoding" not in headers
    assert int(headers["content-length"]) == len(body) > 1_000_000
    users = json.loads(body)["users"]
    assert len(users) == BIG_USERS + len(EXPECTED_USERS)
    assert users[-1]["username"] == f"user{BIG_USERS - 1:05d}"


def test_a_client_that_stops_reading_is_dropped_after_the_send_timeout(big_ledger, monkeypatch):
    monkeypatch.setattr(serve, "SEND_TIMEOUT_S", 0.3)
    with small_send_buffer_server(big_ledger) as url, raw_client(url, rcvbuf=4096) as stuck:
        stuck.send(get("/stats"))
        time.sleep(1.5)  # the server gives up on the answer meanwhile
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := stuck.sock.recv(65536):
                received += chunk
        with raw_client(url) as other:
            other.send(get("/health"))
            health_of(other.answer()[2])
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    length = int(next(
        line.split(b":")[1] for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    ))
    assert length > 1_000_000
    assert 0 < len(body) < length


# --- requests that end the connection -------------------------------------------------


@pytest.mark.parametrize("with_body", [True, False], ids=["with_body", "without_body"])
def test_a_post_gets_405_and_the_connection_is_closed(base_url, with_body):
    # A body is never read: it must not be taken for the next request; without a body,
    # the next request is pipelined and must not be answered either.
    follower = get("/health")
    length = len(follower) if with_body else 0
    with raw_client(base_url) as client:
        client.send(get("/stats", f"Content-Length: {length}", method="POST") + follower)
        status, headers, body = client.answer()
        assert status == 405
        assert headers["connection"] == "close"
        assert json.loads(body)["error"] == "method_not_allowed"
        assert client.closed_by_server()


def test_a_get_with_a_body_is_answered_then_the_connection_is_closed(base_url):
    with raw_client(base_url) as client:
        # The body is never read: it must not be taken for the next request.
        body = get("/stats?username=alice")
        client.send(get("/health", f"Content-Length: {len(body)}") + body)
        status, headers, body = client.answer()
        assert (status, headers["connection"]) == (200, "close")
        health_of(body)
        assert client.closed_by_server()


def test_http_2_request_line_gets_505_and_the_connection_is_closed(base_url):
    with raw_client(base_url) as client:
        client.send(get("/health", version="HTTP/2.0"))
        status, headers, body = client.answer()
        assert (status, headers["connection"]) == (505, "close")
        assert json.loads(body)["error"] == "http_version_not_supported"
        assert client.closed_by_server()


def test_an_unfinished_head_longer_than_the_limit_gets_431_and_is_closed(base_url):
    with raw_client(base_url) as client:
        client.send(b"GET /health HTTP/1.1\r\nX-Pad: " + b"a" * (serve.MAX_HEAD_BYTES + 10))
        status, headers, body = client.answer()
        assert (status, headers["connection"]) == (431, "close")
        assert json.loads(body)["error"] == "request_header_fields_too_large"
        assert client.closed_by_server()


def test_a_complete_head_longer_than_the_limit_gets_431(base_url):
    pads = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(70))
    head = b"GET /health HTTP/1.1\r\nHost: test\r\n" + pads
    assert serve.MAX_HEAD_BYTES < len(head) < 2 * serve.MAX_HEAD_BYTES
    with raw_client(base_url) as client:
        # Most of it first, so the server has read it before the rest and the end arrive.
        client.send(head[: serve.MAX_HEAD_BYTES - 1000])
        time.sleep(0.2)
        client.send(head[serve.MAX_HEAD_BYTES - 1000:] + b"\r\n")
        status, _headers, _body = client.answer()
    assert status == 431


# --- the loop itself -------------------------------------------------------------------


def test_a_shutdown_requested_before_the_loop_starts_is_not_lost(db_path):
    server = serve.make_server(db_path, port=0)
    server.shutdown()  # what the signal handler does when SIGTERM comes early
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    thread.join(timeout=1)
    stopped = not thread.is_alive()
    if not stopped:
        server.shutdown()
        thread.join(timeout=10)
    server.server_close()
    server.app.model.close()
    assert stopped
