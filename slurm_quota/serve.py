"""`slurm-quota serve`: the read-only HTTP/JSON service (standard library only).

Owns: the listening socket (bound, or adopted from systemd socket activation on fd 3), the
routes /health, /stats, /metrics, JSON errors for every failure (never a traceback to the
client), the idle exit, and a pool of read-only SQLite connections. It must not write to the
ledger; what it answers is built by slurm_quota.stats.

Threads: one per connection, reused (a pool that grows with demand). SQLite connections
are never used by two threads at once: a request takes one from the pool and gives it back.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import queue
import signal
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from slurm_quota import __version__, db, stats
from slurm_quota.errors import (
    DatabaseMissing,
    DatabaseUnavailable,
    InvalidInput,
    SchemaError,
    ServiceUnavailable,
    SlurmQuotaError,
)

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9911
DEFAULT_IDLE_TIMEOUT_S = 600.0
POOL_SIZE = 8
# A read never waits long for the plugin's or a charge's write lock: the client is a person.
READ_BUSY_TIMEOUT_MS = 2000
GZIP_MIN_BYTES = 4096
CONNECTION_TIMEOUT_S = 5.0  # an idle keep-alive connection holds a worker this long
JSON_TYPE = "application/json"
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ROUTE_PARAMS = {"/": (), "/health": (), "/stats": ("username", "account"), "/metrics": ()}


@dataclass(frozen=True)
class Response:
    """What a route answers: status, content type, body, extra headers."""

    status: int
    content_type: str
    body: bytes
    gzipped: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()


def json_response(status: int, data: Any) -> Response:
    """A JSON answer."""
    body = (json.dumps(data, separators=(",", ":"), ensure_ascii=False) + "\n").encode()
    return Response(status, JSON_TYPE, body)


def error_response(status: int, error: str, message: str) -> Response:
    """A JSON error: {"error": code, "message": sentence}."""
    return json_response(status, {"error": error, "message": message})


class ReadModel:
    """Pooled read-only connections to the ledger and the cache of whole-ledger answers.

    Whole-ledger answers (/stats without a filter, /metrics) cost 0.1-0.3 s at 10k users, so
    they are kept until the ledger changes. The change probe is exact and cheap: `PRAGMA
    data_version` on a dedicated connection changes whenever any other connection (the
    plugin, a charge, an admin) commits; the file's inode catches a replaced file.
    """

    def __init__(self, db_path: str | os.PathLike[str], pool_size: int = POOL_SIZE) -> None:
        self.db_path = Path(db_path)
        self._pool: queue.LifoQueue[Any] = queue.LifoQueue(maxsize=pool_size)
        self._generation = 0  # bumped when the file is replaced: older connections are dropped
        self._inode: int | None = None
        self._probe: Any = None
        self._probe_lock = threading.Lock()
        self._cache: dict[str, tuple[tuple[int, int], Response]] = {}
        self._cache_locks = {"stats": threading.Lock(), "metrics": threading.Lock()}

    def _open(self) -> Any:
        return db.connect(self.db_path, readonly=True, busy_timeout_ms=READ_BUSY_TIMEOUT_MS)

    def _check_file(self) -> int:
        try:
            inode = os.stat(self.db_path).st_ino
        except OSError as err:
            raise DatabaseMissing(f"The database {self.db_path} does not exist.") from err
        if self._inode is not None and inode != self._inode:
            log.info("the database %s was replaced: reopening", self.db_path)
            self._generation += 1
            self.close()
        self._inode = inode
        return inode

    def version(self) -> tuple[int, int]:
        """(inode, data_version): differs as soon as anybody committed or replaced the file."""
        inode = self._check_file()
        with self._probe_lock:
            if self._probe is None:
                self._probe = self._open()
            try:
                return inode, db.data_version(self._probe)
            except SlurmQuotaError:
                self._probe.close()
                self._probe = None
                raise

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        """A read-only connection used by this thread alone until the block ends."""
        self._check_file()
        generation = self._generation
        try:
            conn = self._pool.get_nowait()
        except queue.Empty:
            conn = self._open()
        ok = False
        try:
            yield conn
            ok = True
        finally:
            if ok and not conn.in_transaction and generation == self._generation:
                try:
                    self._pool.put_nowait(conn)
                except queue.Full:
                    conn.close()
            else:
                conn.close()

    def cached(self, key: str, build: Callable[[], Response]) -> Response:
        """The answer for key, rebuilt once per ledger change.

        One request rebuilds; requests arriving meanwhile get the previous answer rather than
        queue behind it (the rebuilding request itself, e.g. a client that just wrote, gets
        the new one).
        """
        version = self.version()
        entry = self._cache.get(key)
        if entry is not None and entry[0] == version:
            return entry[1]
        lock = self._cache_locks[key]
        if not lock.acquire(blocking=entry is None):
            assert entry is not None
            return entry[1]
        try:
            entry = self._cache.get(key)
            version = self.version()
            if entry is not None and entry[0] == version:
                return entry[1]
            response = build()
            if response.status != 200:
                return response
            response = _with_gzip(response)
            self._cache[key] = (version, response)
            return response
        finally:
            lock.release()

    def close(self) -> None:
        """Close every pooled connection and the change probe."""
        while True:
            try:
                self._pool.get_nowait().close()
            except queue.Empty:
                break
        with self._probe_lock:
            if self._probe is not None:
                self._probe.close()
                self._probe = None


def _with_gzip(response: Response) -> Response:
    if len(response.body) < GZIP_MIN_BYTES:
        return response
    return Response(
        response.status,
        response.content_type,
        response.body,
        gzip.compress(response.body, compresslevel=5, mtime=0),
        response.headers,
    )


def parse_query(path: str, query: str) -> dict[str, str]:
    """Query parameters of a route: known names only, each once, non-empty; else InvalidInput.

    Unknown names are refused rather than ignored: `/stats?user=alice` must not silently
    answer with every user.
    """
    allowed = ROUTE_PARAMS[path]
    try:
        pairs = parse_qs(
            query, keep_blank_values=True, strict_parsing=bool(query), errors="strict",
            max_num_fields=8,
        )
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidInput(f"Malformed query string: {err}.") from err
    params: dict[str, str] = {}
    for name, values in pairs.items():
        if name not in allowed:
            known = ", ".join(allowed) if allowed else "none"
            raise InvalidInput(f"Unknown query parameter {name!r} for {path} (accepted: {known}).")
        if len(values) != 1:
            raise InvalidInput(f"Query parameter {name!r} is given {len(values)} times.")
        if not values[0].strip():
            raise InvalidInput(f"Query parameter {name!r} is empty.")
        if len(values[0]) > 256:
            raise InvalidInput(f"Query parameter {name!r} is longer than 256 characters.")
        params[name] = values[0]
    return params


class App:
    """The routes, independent of the socket handling (tests call it directly too)."""

    def __init__(self, model: ReadModel) -> None:
        self.model = model

    def handle(self, raw_path: str) -> Response:
        """Answer a GET of raw_path; every failure becomes a JSON error."""
        try:
            url = urlsplit(raw_path)
            path = url.path.rstrip("/") or "/"
            if path not in ROUTE_PARAMS:
                return error_response(404, "not_found", f"No route {url.path}.")
            params = parse_query(path, url.query)
            if path == "/stats":
                return self.stats(params.get("username"), params.get("account"))
            if path == "/metrics":
                return self.model.cached("metrics", self.metrics)
            if path == "/health":
                return self.health()
            return json_response(
                200,
                {"service": "slurm-quota", "version": __version__,
                 "routes": ["/health", "/stats", "/metrics"]},
            )
        except InvalidInput as err:
            return error_response(400, "bad_request", str(err))
        except (DatabaseMissing, DatabaseUnavailable, SchemaError) as err:
            log.warning("database unavailable: %s", err)
            return error_response(503, "unavailable", str(err))
        except SlurmQuotaError as err:
            log.error("request %s failed: %s", raw_path, err)
            return error_response(500, "internal", str(err))
        except Exception:  # a bug: log it for the admin, never show a traceback to clients
            log.exception("request %s failed", raw_path)
            return error_response(500, "internal", "Internal error; see the service log.")

    def stats(self, username: str | None, account: str | None) -> Response:
        """GET /stats[?username=|?account=]."""
        if username is not None and account is not None:
            raise InvalidInput("Give either username or account, not both.")
        if username is None and account is None:
            return self.model.cached("stats", lambda: self._stats(None, None))
        return self._stats(username, account)

    def _stats(self, username: str | None, account: str | None) -> Response:
        with self.model.connection() as conn:
            payload = stats.stats_payload(conn, username=username, account=account)
        return json_response(200, payload)

    def metrics(self) -> Response:
        """GET /metrics (Prometheus text format 0.0.4)."""
        with self.model.connection() as conn:
            text = stats.metrics_text(conn, db_path=self.model.db_path)
        return Response(200, METRICS_TYPE, text.encode())

    def health(self) -> Response:
        """GET /health: ok when the ledger is readable with the expected schema."""
        with self.model.connection() as conn:
            version = db.ping(conn)
        return json_response(200, {"status": "ok", "schema_version": version})


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 handler: GET and HEAD only, JSON errors, quiet unless asked to log."""

    server: QuotaHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = f"slurm-quota/{__version__}"
    sys_version = ""
    timeout = CONNECTION_TIMEOUT_S
    error_content_type = JSON_TYPE
    # Nobody speaks HTTP/0.9 (no status line, no headers): answer broken request lines with
    # a proper HTTP/1.0 status and a JSON body.
    default_request_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self._answer(self.server.app.handle(self.path), head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(self.server.app.handle(self.path), head=True)

    def _not_allowed(self) -> None:
        self.close_connection = True  # the request body, if any, is not read
        response = error_response(
            405, "method_not_allowed", f"Method {self.command} is not allowed; use GET."
        )
        self._answer(response, head=False, extra=(("Allow", "GET, HEAD"),))

    def __getattr__(self, name: str) -> Any:
        # http.server answers 501 for a method without a do_X: every method but GET and
        # HEAD is refused alike, with 405 and an Allow header.
        if name.startswith("do_"):
            return self._not_allowed
        raise AttributeError(name)

    def version_string(self) -> str:
        return self.server_version

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol errors found by http.server (bad request line, 501...) as JSON."""
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "Error"
        error = phrase.lower().replace(" ", "_").replace("-", "_")
        self._answer(error_response(code, error, message or phrase), head=False)

    def _answer(
        self, response: Response, *, head: bool, extra: tuple[tuple[str, str], ...] = ()
    ) -> None:
        body = response.body
        encoding = None
        headers = getattr(self, "headers", None)  # absent when the request line was bad
        accepts = headers.get("Accept-Encoding", "") if headers is not None else ""
        if response.gzipped is not None and "gzip" in accepts:
            body, encoding = response.gzipped, "gzip"
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if response.gzipped is not None:
            self.send_header("Vary", "Accept-Encoding")
        if encoding:
            self.send_header("Content-Encoding", encoding)
        for name, value in (*response.headers, *extra):
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (base signature)
        if self.server.log_requests:
            log.info("%s %s", self.address_string(), format % args)


class QuotaHTTPServer(HTTPServer):
    """HTTP server with a growing pool of reused worker threads and an idle clock.

    Like ThreadingHTTPServer (one thread per connection), except that threads are reused:
    starting a thread costs about 0.2 ms here, a third of a whole /health answer. The pool
    grows to the peak number of simultaneous connections, at most MAX_WORKERS.
    """

    request_queue_size = 128  # 100 clients connecting at once must not hit a 5-deep backlog
    MAX_WORKERS = 128

    def __init__(self, address: tuple[str, int], app: App, *, bind: bool = True) -> None:
        self.app = app
        self.log_requests = False
        self._active = 0
        self._last_activity = time.monotonic()
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[Any, Any]] = queue.SimpleQueue()
        self._idle_workers = 0
        self._workers = 0
        super().__init__(address, Handler, bind_and_activate=bind)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can wait on DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self._active += 1
            if self._idle_workers:
                self._idle_workers -= 1
                spawn = False
            else:
                spawn = self._workers < self.MAX_WORKERS
                self._workers += int(spawn)
        self._jobs.put((request, client_address))
        if spawn:
            threading.Thread(target=self._work, name="slurm-quota-worker", daemon=True).start()

    def _work(self) -> None:
        while True:
            request, client_address = self._jobs.get()
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)
                with self._lock:
                    self._active -= 1
                    self._idle_workers += 1
                    self._last_activity = time.monotonic()

    def idle_for(self) -> float:
        """Seconds since the last connection ended; 0 while one is being served."""
        with self._lock:
            if self._active:
                return 0.0
            return time.monotonic() - self._last_activity

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s failed", client_address, exc_info=True)


class QuotaHTTPServer6(QuotaHTTPServer):
    """The same server on an IPv6 address (--host ::1)."""

    address_family = socket.AF_INET6


def systemd_socket(env: dict[str, str] | None = None) -> socket.socket | None:
    """The listening socket passed by systemd (fd 3) when LISTEN_PID is us, else None."""
    env = os.environ if env is None else env
    try:
        pid = int(env.get("LISTEN_PID", ""))
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return None
    if pid != os.getpid() or count < 1:
        return None
    if count > 1:
        log.warning("systemd passed %d sockets; serving the first (fd 3) only", count)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # children must not think the sockets are theirs
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    sock.set_inheritable(False)
    return sock


def make_server(
    db_path: str | os.PathLike[str],
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    log_requests: bool = False,
    inherited: socket.socket | None = None,
) -> QuotaHTTPServer:
    """Build the server on the inherited socket, or bound to host:port."""
    app = App(ReadModel(db_path))
    if inherited is not None:
        server = QuotaHTTPServer((host, port), app, bind=False)
        server.socket.close()
        server.socket = inherited
        server.server_address = inherited.getsockname()
    else:
        cls = QuotaHTTPServer6 if ":" in host else QuotaHTTPServer
        try:
            server = cls((host, port), app)
        except OSError as err:
            raise ServiceUnavailable(f"Cannot listen on {host}:{port}: {err}.") from err
    server.log_requests = log_requests
    return server


def serve(
    db_path: str | os.PathLike[str],
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
    log_requests: bool = False,
) -> None:
    """Serve until SIGTERM/SIGINT or idle_timeout_s without a connection (0 = never)."""
    inherited = systemd_socket()
    server = make_server(
        db_path, host=host, port=port, log_requests=log_requests, inherited=inherited
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    address = server.server_address
    origin = "systemd socket (fd 3)" if inherited is not None else "bound"
    log.info(
        "slurm-quota %s serving %s on http://%s:%s/ (%s), idle timeout %s",
        __version__, db_path, address[0], address[1], origin,
        f"{idle_timeout_s:g} s" if idle_timeout_s else "off",
    )
    if not Path(db_path).exists():
        log.warning("the database %s does not exist yet: answering 503", db_path)
    server.timeout = 0.25 if not idle_timeout_s else min(0.25, idle_timeout_s / 4)
    try:
        while not stop.is_set():
            server.handle_request()
            if idle_timeout_s and server.idle_for() >= idle_timeout_s:
                log.info("no request for %g s: exiting", idle_timeout_s)
                break
    finally:
        server.server_close()
        server.app.model.close()
