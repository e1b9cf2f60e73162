"""`slurm-quota serve`: the read-only HTTP/JSON service (standard library only).

Owns: the listening socket (bound, or adopted from systemd socket activation on fd 3), the
routes /health, /stats, /metrics, JSON errors for every failure (never a traceback to the
client), the idle exit, the server processes, and read-only SQLite connections. It must
not write to the ledger; what it answers is built by slurm_quota.stats.

Concurrency: each server process is one thread running an event loop (QuotaHTTPServer);
`--processes` forks several on the same listening socket (serve_processes). Each server
process has a builder process (Builder, slurm_quota.serve_builder) for the whole-ledger
answers. The ReadModel is thread-safe all the same (a connection is used by one thread at a
time), for embedding.
"""

from __future__ import annotations

import collections
import contextlib
import email.utils
import fcntl
import gzip
import hashlib
import json
import logging
import mmap
import os
import queue
import re
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
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
POOL_SIZE = 2  # read-only connections kept open per process
MAX_PROCESSES = 4  # default --processes: the CPUs, at most this many
# A read never waits long for the plugin's or a charge's write lock: the client is a person.
READ_BUSY_TIMEOUT_MS = 2000
GZIP_MIN_BYTES = 4096
GZIP_ETAG_SUFFIX = "-gzip"  # the gzipped copy's entity tag: the body's, with this suffix
CONNECTION_TIMEOUT_S = 5.0  # an idle keep-alive connection is closed after this long
SEND_TIMEOUT_S = 60.0  # a client reading a 4 MB answer slowly still gets all of it
MAX_HEAD_BYTES = 65536
MAX_HEADERS = 100
LISTEN_BACKLOG = 128  # 100 clients connecting at once must not hit a 5-deep backlog
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_VERSION = re.compile(r"HTTP/\d\.\d")
_ETAG = re.compile(r'"[0-9a-f]{1,64}"')  # as finish_whole makes them
_LISTENER, _WAKE, _BUILDER = object(), object(), object()  # selector keys, not clients
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
JSON_TYPE = "application/json"
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ROUTE_PARAMS = {"/": (), "/health": (), "/stats": ("username", "account"), "/metrics": ()}
# Answers about the whole ledger, built by the builder process (slurm_quota.serve_builder).
WHOLE_LEDGER_ROUTES = {"stats": "/stats", "metrics": "/metrics"}
BUILD_TIMEOUT_S = 60.0  # a builder busy longer than this is replaced
BUILDER_RETRY_S = 5.0  # after a builder failed, answers are built in the loop until then


@dataclass(frozen=True)
class Response:
    """What a route answers: status, content type, body, extra headers."""

    status: int
    content_type: str
    body: bytes
    gzipped: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    # Entity tag of the body (a hash of its bytes, quoted), on whole-ledger answers: a client
    # sending it back in If-None-Match gets 304 while the ledger gives the same bytes.
    etag: str | None = None


@dataclass(frozen=True)
class Deferred:
    """What App.handle answers, when asked to defer, for a whole-ledger route whose cached
    answer is older than the ledger: the answer must be built (key) for ledger state seq."""

    key: str
    seq: int
    stale: Response | None = None  # a cached answer young enough to send meanwhile


def json_response(status: int, data: Any) -> Response:
    """A JSON answer."""
    body = (json.dumps(data, separators=(",", ":"), ensure_ascii=False) + "\n").encode()
    return Response(status, JSON_TYPE, body)


def error_response(status: int, error: str, message: str) -> Response:
    """A JSON error: {"error": code, "message": sentence}."""
    return json_response(status, {"error": error, "message": message})


class ReadModel:
    """Pooled read-only connections to the ledger and the cache of whole-ledger answers.

    Whole-ledger answers (/stats without a filter, /metrics) cost 0.1-0.2 s at 10k users, so
    they are kept until the ledger changes. The change probe is exact and cheap: `PRAGMA
    data_version` on a dedicated connection changes whenever any other connection (the
    plugin, a charge, an admin) commits; the file's inode catches a replaced file. Each
    change seen bumps a sequence number (observe()); a cached answer is current while it was
    built at the latest one.

    max_stale_s > 0 (`serve --max-stale`) lets a server send a cached whole-ledger answer
    built at most that long ago while a fresh one is built (recent()).
    """

    def __init__(
        self, db_path: str | os.PathLike[str], pool_size: int = POOL_SIZE,
        max_stale_s: float = 0.0,
    ) -> None:
        self.db_path = Path(db_path)
        self.max_stale_s = max_stale_s
        self._pool: queue.LifoQueue[Any] = queue.LifoQueue(maxsize=pool_size)
        self._generation = 0  # bumped when the file is replaced: older connections are dropped
        self._inode: int | None = None
        self._probe: Any = None
        self._probe_lock = threading.Lock()
        self._seen: tuple[int, int] | None = None  # the last (inode, data_version) seen
        self._seq = 0  # bumped whenever _seen changes (observe())
        # key -> (seq it was built at, answer, time.monotonic() its build began)
        self._cache: dict[str, tuple[int, Response, float]] = {}
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

    def observe(self) -> int:
        """The sequence number of the ledger state now: it grows whenever (inode,
        data_version) differs from the last one seen, i.e. as soon as anybody committed or
        replaced the file."""
        inode = self._check_file()
        with self._probe_lock:
            if self._probe is None:
                self._probe = self._open()
            try:
                version = (inode, db.data_version(self._probe))
            except SlurmQuotaError:
                self._probe.close()
                self._probe = None
                raise
            if version != self._seen:
                self._seen = version
                self._seq += 1
            return self._seq

    def current(self, key: str, seq: int) -> Response | None:
        """The cached answer for key if it was built at ledger state seq, else None."""
        entry = self._cache.get(key)
        return entry[1] if entry is not None and entry[0] == seq else None

    def store(self, key: str, seq: int, response: Response, built_at: float) -> None:
        """Keep an answer built at ledger state seq (or later) from the ledger as it was at
        built_at (time.monotonic()), unless a newer one is kept."""
        entry = self._cache.get(key)
        if entry is None or entry[0] <= seq:
            self._cache[key] = (seq, response, built_at)

    def recent(self, key: str) -> Response | None:
        """The cached answer for key if built at most max_stale_s ago (whatever changed)."""
        entry = self._cache.get(key)
        if entry is None or time.monotonic() - entry[2] > self.max_stale_s:
            return None
        return entry[1]

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
        seq = self.observe()
        entry = self._cache.get(key)
        if entry is not None and entry[0] == seq:
            return entry[1]
        lock = self._cache_locks[key]
        if not lock.acquire(blocking=entry is None):
            assert entry is not None
            return entry[1]
        try:
            seq = self.observe()  # before the build: the answer holds at least this state
            built_at = time.monotonic()
            response = self.current(key, seq)
            if response is not None:
                return response
            response = build()
            if response.status != 200:
                return response
            response = finish_whole(response)
            self.store(key, seq, response, built_at)
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


def finish_whole(response: Response) -> Response:
    """A whole-ledger answer as it is kept and sent: with its gzipped copy (when worth it)
    and its entity tag. The tag hashes the bytes, so every server process and builder gives
    the same tag for the same ledger state, and a client keeps its copy across them."""
    digest = hashlib.blake2b(response.body, digest_size=12).hexdigest()
    gzipped = None
    if len(response.body) >= GZIP_MIN_BYTES:
        gzipped = gzip.compress(response.body, compresslevel=5, mtime=0)
    return Response(
        response.status, response.content_type, response.body, gzipped, response.headers,
        f'"{digest}"',
    )


def etag_matches(if_none_match: str, etag: str) -> bool:
    """Whether an If-None-Match header names etag (RFC 9110 13.1.2: weak comparison, `*`
    matches any). The gzipped copy's tag (etag with -gzip) names the same bytes."""
    value = if_none_match.strip()
    if value == "*":
        return True
    opaque = etag.strip('"')
    for tag in value.split(","):
        tag = tag.strip()
        if tag.startswith("W/"):
            tag = tag[2:]
        tag = tag.strip('"')
        if tag.endswith(GZIP_ETAG_SUFFIX):
            tag = tag[: -len(GZIP_ETAG_SUFFIX)]
        if tag == opaque:
            return True
    return False


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

    def handle(self, raw_path: str, *, defer: bool = False) -> Response | Deferred:
        """Answer a GET of raw_path; every failure becomes a JSON error.

        defer: a whole-ledger route whose cached answer is older than the ledger is not
        built here but answered Deferred (the server has it built by its builder process).
        """
        try:
            url = urlsplit(raw_path)
            path = url.path.rstrip("/") or "/"
            if path not in ROUTE_PARAMS:
                return error_response(404, "not_found", f"No route {url.path}.")
            params = parse_query(path, url.query)
            if path == "/stats":
                username, account = params.get("username"), params.get("account")
                if username is not None and account is not None:
                    raise InvalidInput("Give either username or account, not both.")
                if username is None and account is None:
                    return self._whole_ledger("stats", defer)
                return self._stats(username, account)
            if path == "/metrics":
                return self._whole_ledger("metrics", defer)
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

    def _whole_ledger(self, key: str, defer: bool) -> Response | Deferred:
        build = self.whole_stats if key == "stats" else self.metrics
        if not defer:
            return self.model.cached(key, build)
        seq = self.model.observe()
        return self.model.current(key, seq) or Deferred(key, seq, self.model.recent(key))

    def whole_stats(self) -> Response:
        """GET /stats without a selector: every user and every account."""
        with self.model.connection() as conn:
            return Response(200, JSON_TYPE, stats.whole_stats_json(conn))

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


class Builder:
    """The server side of a builder process (slurm_quota.serve_builder): start it, ask it for
    a whole-ledger answer, read its answers without blocking the loop, stop it.

    The loop waits on fileno() and calls read() when it is readable.
    """

    PIPE_BYTES = 1 << 20  # a 4 MB answer in 4-5 reads instead of 70

    def __init__(
        self, db_path: str | os.PathLike[str], argv: list[str] | None = None
    ) -> None:
        self.argv = argv or [sys.executable, "-m", "slurm_quota.serve_builder", str(db_path)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.asked: collections.deque[str] = collections.deque()  # keys not yet answered
        self.busy_since = 0.0  # time.monotonic() of the oldest unanswered request
        self._buffer = bytearray()
        self._header: dict[str, Any] | None = None

    def start(self) -> None:
        """Start the builder process (ServiceUnavailable when it cannot be)."""
        try:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
                close_fds=True,
            )
        except OSError as err:
            raise ServiceUnavailable(f"Cannot start the builder process: {err}.") from err
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(self.proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, self.PIPE_BYTES)

    def fileno(self) -> int:
        """The end of the pipe the builder's answers arrive on."""
        assert self.proc is not None and self.proc.stdout is not None
        return self.proc.stdout.fileno()

    def ask(self, key: str) -> None:
        """Ask for the answer of key (OSError when the builder is gone)."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(key.encode() + b"\n")  # a few bytes into an empty pipe
        if not self.asked:
            self.busy_since = time.monotonic()
        self.asked.append(key)

    def read(self) -> list[tuple[str, Response]]:
        """The answers complete so far; EOFError when the builder broke protocol, or ended
        with nothing complete left to hand over.

        What arrived before the end is parsed first: a builder that wrote a bad header and
        exited is reported for the header, and answers it finished before exiting are kept.
        The end of file stays readable, so the next call reports it.
        """
        assert self.proc is not None and self.proc.stdout is not None
        ended = False
        while True:
            try:
                chunk = os.read(self.proc.stdout.fileno(), self.PIPE_BYTES)
            except (BlockingIOError, InterruptedError):
                break
            if not chunk:
                ended = True
                break
            self._buffer += chunk
        done = self._complete_answers()
        if ended and not done:
            raise EOFError("the builder process ended")
        return done

    def _complete_answers(self) -> list[tuple[str, Response]]:
        """Parse the buffered bytes into the answers they complete (EOFError on bad protocol)."""
        done = []
        while True:
            if self._header is None:
                end = self._buffer.find(b"\n")
                if end < 0:
                    break
                try:
                    header = json.loads(self._buffer[:end])
                    key = header["key"]
                except (ValueError, KeyError, TypeError) as err:
                    raise EOFError(f"the builder sent a malformed header: {err}") from err
                if not self.asked or key != self.asked[0]:
                    raise EOFError(f"the builder answered {key!r} unasked")
                try:
                    int(header["body"]), int(header["gzip"]), int(header["status"])
                    str(header["type"])
                    etag = header.get("etag")
                    if etag is not None and not _ETAG.fullmatch(str(etag)):
                        raise ValueError(f"etag {str(etag)[:40]!r}")
                except (ValueError, KeyError, TypeError) as err:
                    raise EOFError(f"the builder sent a malformed header: {err}") from err
                self._header = header
                del self._buffer[: end + 1]
            header = self._header
            size, zsize = int(header["body"]), int(header["gzip"])
            if len(self._buffer) < size + max(zsize, 0):
                break
            body = bytes(self._buffer[:size])
            gzipped = bytes(self._buffer[size : size + zsize]) if zsize >= 0 else None
            del self._buffer[: size + max(zsize, 0)]
            response = Response(
                int(header["status"]), str(header["type"]), body, gzipped,
                etag=header.get("etag"),
            )
            done.append((self.asked.popleft(), response))
            self._header = None
            self.busy_since = time.monotonic()
        return done

    def stop(self, grace_s: float = 2.0) -> None:
        """End the builder process: close its input, wait up to grace_s, then kill it."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        for pipe in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                pipe.close()  # type: ignore[union-attr]
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self.asked.clear()
        self._buffer.clear()
        self._header = None


class BadRequest(Exception):
    """A request that cannot be answered normally: status, error code, message."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message


@dataclass(frozen=True)
class Request:
    """A parsed request head: method, target, version, headers (lower-case names)."""

    method: str
    target: str
    version: str
    headers: dict[str, str]

    @property
    def keep_alive(self) -> bool:
        """Whether the client wants the connection kept (HTTP/1.1 default; 1.0 asks)."""
        tokens = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.1":
            return "close" not in tokens
        return "keep-alive" in tokens

    @property
    def has_body(self) -> bool:
        """A body we do not read follows: the connection cannot be reused after it."""
        length = self.headers.get("content-length", "0").strip()
        return "transfer-encoding" in self.headers or length not in ("", "0")


class Connection:
    """One client connection: socket, peer, bytes read but not parsed, answer not yet sent."""

    __slots__ = (
        "sock", "peer", "buffer", "last_activity", "pending", "keep", "writing", "waiting",
    )

    def __init__(self, sock: socket.socket, peer: Any) -> None:
        self.sock, self.peer, self.buffer = sock, peer, b""
        self.last_activity = time.monotonic()
        # What the socket has not taken yet of an answer: [head, body] or their rests.
        self.pending: list[memoryview] | None = None
        self.keep = False  # whether to read another request once `pending` is sent
        self.writing = False  # waiting in the selector for the socket to be writable
        self.waiting = False  # its answer is being built by the builder process


def parse_head(head: bytes) -> Request:
    """Parse a request line and header lines (without the blank line); BadRequest if broken."""
    lines = head.decode("latin-1").split("\n")
    parts = lines[0].rstrip("\r").split(" ")
    if len(parts) != 3 or not all(parts):
        raise BadRequest(400, "bad_request", "Malformed request line.")
    method, target, version = parts
    if not _VERSION.fullmatch(version):
        raise BadRequest(400, "bad_request", f"Malformed HTTP version {version[:20]!r}.")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise BadRequest(505, "http_version_not_supported", f"{version} is not supported.")
    if len(lines) > MAX_HEADERS + 1:
        raise BadRequest(431, "request_header_fields_too_large", "Too many header fields.")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.rstrip("\r").partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(400, "bad_request", "Malformed header field.")
        headers[name.lower()] = value.strip()
    if not (target.startswith("/") or target.startswith(("http://", "https://"))):
        raise BadRequest(400, "bad_request", "The request target must be a path.")
    return Request(method, target, version, headers)


class QuotaHTTPServer:
    """HTTP/1.1 server in one process and one thread: an event loop over non-blocking sockets.

    One selector (epoll) waits on the listening socket and on every connection. Bytes are
    read as they come; once a request head is complete it is answered on the spot, and an
    answer the socket does not take at once is finished when the socket is writable again.
    So a slow or silent client costs a file descriptor, never a thread, and 1 000 idle
    keep-alive connections cost nothing but memory.

    One thread on purpose: answers are short Python work under the GIL. Measured on 2 CPUs
    with 100 concurrent clients, http.server's thread per connection answered /health 2-3
    times fewer per second, and a dispatcher handing requests to 1-16 worker threads 1.4-2.4
    times fewer, than answering in the loop itself: every hand-over of the GIL costs more than
    a short answer. Parallelism comes from processes sharing the listening socket instead
    (serve_processes). Answers that take long to build, the whole-ledger ones (0.1-0.2 s at
    10k users), are built by a builder process (slurm_quota.serve_builder) when one is given:
    the client waits for it, the others are served meanwhile. Every whole-ledger answer
    holds at least the ledger as it was when its request arrived. Without a builder (or
    while a failed one waits to be replaced), they are built in the loop. A per-client
    answer waiting for a locked database (at most READ_BUSY_TIMEOUT_MS) still holds up the
    loop.
    """

    MAX_CONNECTIONS = 1024  # past this, new clients wait in the listen backlog

    def __init__(
        self, sock: socket.socket, app: App, *, log_requests: bool = False,
        builder: Builder | None = None,
    ) -> None:
        self.socket = sock
        self.server_address = sock.getsockname()
        self.app = app
        self.log_requests = log_requests
        # Called as on_activity(open connections, last activity) whenever either changes.
        self.on_activity: Callable[[int, float], None] | None = None
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        for end in (self._wake_r, self._wake_w):
            end.setblocking(False)
        self._connections: set[Connection] = set()
        self._last_activity = time.monotonic()
        self._next_expiry = 0.0
        self._stop = False
        self._stopped = threading.Event()
        self._stopped.set()
        self._accepting = False
        self._date = (0, "")
        sock.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._listen(True)
        self.builder: Builder | None = None  # None: whole-ledger answers built in the loop
        self._spare_builder: Builder | None = None  # failed: started again after a while
        self._builder_failed_at = 0.0
        # key -> [(connection, request, keep, ledger state the answer must hold)]
        self._waiters: dict[str, list[tuple[Connection, Request, bool, int]]] = {}
        # key -> (ledger state the build in progress holds, time.monotonic() it was asked)
        self._building: dict[str, tuple[int, float]] = {}
        if builder is not None:
            self._start_builder(builder)

    # --- the loop --------------------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.25, idle_timeout_s: float = 0.0) -> bool:
        """Serve until shutdown() (returns False) or idle_timeout_s without a connection
        (returns True; 0 = never). A shutdown() that came before is not lost: the loop
        returns at once."""
        self._stopped.clear()
        try:
            while not self._stop:
                for key, events in self._selector.select(poll_interval):
                    if key.data is _LISTENER:
                        self._accept()
                    elif key.data is _WAKE:
                        self._drain_wake()
                    elif key.data is _BUILDER:
                        self._builder_readable()
                    elif events & selectors.EVENT_WRITE:
                        self._write(key.data)
                    else:
                        self._read(key.data)
                self._expire()
                if idle_timeout_s and self.idle_for() >= idle_timeout_s:
                    return True
            return False
        finally:
            self._stop = False  # a later serve_forever serves again
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop serve_forever; from another thread, wait until it has (as socketserver)."""
        self._stop = True
        self.wake()
        if threading.current_thread() is not threading.main_thread() or self._stopped.is_set():
            self._stopped.wait()

    def wake(self) -> None:
        """Interrupt the loop's wait (safe from a signal handler and from other threads)."""
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _drain_wake(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass

    def _listen(self, on: bool) -> None:
        if on and not self._accepting:
            self._selector.register(self.socket, selectors.EVENT_READ, _LISTENER)
        elif not on and self._accepting:
            self._selector.unregister(self.socket)
        self._accepting = on

    def _accept(self) -> None:
        # One connection per wake-up: the listener stays ready while more wait, and sibling
        # processes polling the same socket take their share instead of this process
        # taking 50 clients at once while another one idles.
        try:
            sock, peer = self.socket.accept()
        except (BlockingIOError, InterruptedError):  # a sibling process took it
            return
        except OSError as err:  # EMFILE, ECONNABORTED...: keep serving the others
            log.warning("accept failed: %s", err)
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Connection(sock, peer)
        self._connections.add(conn)
        self._selector.register(sock, selectors.EVENT_READ, conn)
        if len(self._connections) >= self.MAX_CONNECTIONS:
            self._listen(False)
        self._report()

    def _close(self, conn: Connection) -> None:
        if conn not in self._connections:
            return
        self._connections.discard(conn)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        with contextlib.suppress(OSError):
            conn.sock.close()
        self._last_activity = time.monotonic()
        if not self._accepting and len(self._connections) < self.MAX_CONNECTIONS:
            self._listen(True)
        self._report()

    def _report(self) -> None:
        if self.on_activity is not None:
            self.on_activity(len(self._connections), self._last_activity)

    def _expire(self) -> None:
        """Close connections silent for too long (checked twice a second at most)."""
        now = time.monotonic()
        if now < self._next_expiry:
            return
        self._next_expiry = now + 0.5
        for conn in list(self._connections):
            busy = conn.pending is not None or conn.waiting
            limit = SEND_TIMEOUT_S if busy else CONNECTION_TIMEOUT_S
            if now - conn.last_activity > limit:
                self._close(conn)
        builder = self.builder
        if builder is not None and builder.asked and now - builder.busy_since > BUILD_TIMEOUT_S:
            self._builder_failed(f"no answer in {BUILD_TIMEOUT_S:g} s")
        spare = self._spare_builder
        if spare is not None and now - self._builder_failed_at >= BUILDER_RETRY_S:
            self._spare_builder = None
            self._start_builder(spare)

    def idle_for(self) -> float:
        """Seconds since the last connection ended; 0 while one is open."""
        open_connections, last_activity = self.activity()
        return 0.0 if open_connections else time.monotonic() - last_activity

    def activity(self) -> tuple[int, float]:
        """(open connections, time.monotonic() when the last one ended)."""
        return len(self._connections), self._last_activity

    def server_close(self) -> None:
        """Close every connection, the listening socket and the builder process."""
        for conn in list(self._connections):
            self._close(conn)
        if self.builder is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(self.builder.fileno())
            self.builder.stop()
        self._selector.close()
        for sock in (self.socket, self._wake_r, self._wake_w):
            sock.close()

    # --- requests and answers --------------------------------------------------------

    def _read(self, conn: Connection) -> None:
        try:
            chunk = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset by the peer
            self._close(conn)
            return
        if not chunk:  # the client closed (between requests, or giving up on one)
            self._close(conn)
            return
        conn.buffer += chunk
        conn.last_activity = time.monotonic()
        self._answer_buffered(conn)

    def _answer_buffered(self, conn: Connection) -> None:
        """Answer every complete request in the buffer, in order (HTTP pipelining)."""
        while conn.pending is None and not conn.waiting and conn in self._connections:
            match = _HEAD_END.search(conn.buffer)
            if match is None:
                if len(conn.buffer) > MAX_HEAD_BYTES:
                    self._send(conn, None, error_response(
                        431, "request_header_fields_too_large",
                        f"The request head is longer than {MAX_HEAD_BYTES} bytes.",
                    ))
                return
            if match.start() > MAX_HEAD_BYTES:  # the end came in the read that passed it
                self._send(conn, None, error_response(
                    431, "request_header_fields_too_large",
                    f"The request head is longer than {MAX_HEAD_BYTES} bytes.",
                ))
                return
            head, conn.buffer = conn.buffer[: match.start()], conn.buffer[match.end():]
            try:
                request = parse_head(head)
            except BadRequest as err:
                self._send(conn, None, error_response(err.status, err.error, err.message))
                return
            keep = request.keep_alive and not request.has_body  # a body is never read
            if request.method in ("GET", "HEAD"):
                response = self.app.handle(request.target, defer=self.builder is not None)
                if isinstance(response, Deferred):
                    if response.stale is None:
                        self._wait_for_build(conn, request, keep, response)
                        return
                    if response.key not in self._building:  # fresher for the next clients
                        self._ask(response.key, response.seq)
                    response = response.stale
            else:
                keep = False
                response = error_response(
                    405, "method_not_allowed",
                    f"Method {request.method[:20]} is not allowed; use GET.",
                )
            self._send(conn, request, response, keep=keep)

    def _send(
        self, conn: Connection, request: Request | None, response: Response, *, keep: bool = False
    ) -> None:
        """Send an answer; what the socket does not take now is sent when it is writable."""
        body, tag, status = response.body, response.etag, response.status
        etag = tag  # of the representation sent: the gzipped copy's ends in -gzip
        zipped = (
            response.gzipped is not None and request is not None
            and "gzip" in request.headers.get("accept-encoding", "")
        )
        if zipped and response.gzipped is not None:
            body = response.gzipped
            if tag is not None:
                etag = tag[:-1] + GZIP_ETAG_SUFFIX + '"'
        if (
            tag is not None and status == 200 and request is not None
            and etag_matches(request.headers.get("if-none-match", ""), tag)
        ):
            status, body = 304, b""  # the client's copy holds these very bytes
        lines = [
            f"HTTP/1.1 {status} {_phrase(status)}",
            f"Server: slurm-quota/{__version__}",
            f"Date: {self._http_date()}",
        ]
        if status != 304:
            lines.append(f"Content-Type: {response.content_type}")
        if response.gzipped is not None:
            lines.append("Vary: Accept-Encoding")
            if zipped and status != 304:
                lines.append("Content-Encoding: gzip")
        if status != 304:
            lines.append(f"Content-Length: {len(body)}")
        if etag is not None:
            lines.append(f"ETag: {etag}")
            lines.append("Cache-Control: no-cache")  # may be kept, if checked with us first
        else:
            lines.append("Cache-Control: no-store")
        if response.status == 405:
            lines.append("Allow: GET, HEAD")
        lines.extend(f"{name}: {value}" for name, value in response.headers)
        if not keep:
            lines.append("Connection: close")
        elif request is not None and request.version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if self.log_requests:
            what = "-" if request is None else f"{request.method} {request.target[:200]}"
            log.info("%s \"%s\" %d %d", conn.peer[0], what, status, len(body))
        conn.pending = [memoryview(head)]
        if body and (request is None or request.method != "HEAD"):
            # Sent from the cached bytes with the head in one sendmsg: no copy of a 0.4 MB
            # whole-ledger answer per request.
            conn.pending.append(memoryview(body))
        conn.keep = keep
        self._write(conn)

    def _write(self, conn: Connection) -> None:
        assert conn.pending is not None
        try:
            sent = conn.sock.sendmsg(conn.pending)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:  # the client went away
            self._close(conn)
            return
        conn.last_activity = time.monotonic()
        pending = conn.pending
        while sent:
            if sent >= len(pending[0]):
                sent -= len(pending.pop(0))
            else:
                pending[0], sent = pending[0][sent:], 0
        if pending:
            if not conn.writing:
                conn.writing = True
                self._selector.modify(conn.sock, selectors.EVENT_WRITE, conn)
            return
        conn.pending = None
        if not conn.keep:
            self._close(conn)
            return
        if conn.writing:
            conn.writing = False
            self._selector.modify(conn.sock, selectors.EVENT_READ, conn)
            self._answer_buffered(conn)  # requests pipelined behind the one just finished

    # --- whole-ledger answers built by the builder process ------------------------------

    def _start_builder(self, builder: Builder) -> None:
        try:
            builder.start()
        except ServiceUnavailable as err:
            log.error("%s Whole-ledger answers are built in the server process for %g s.",
                      err, BUILDER_RETRY_S)
            self._spare_builder, self._builder_failed_at = builder, time.monotonic()
            return
        self.builder = builder
        self._selector.register(builder.fileno(), selectors.EVENT_READ, _BUILDER)

    def _wait_for_build(
        self, conn: Connection, request: Request, keep: bool, deferred: Deferred
    ) -> None:
        conn.waiting = True
        self._waiters.setdefault(deferred.key, []).append((conn, request, keep, deferred.seq))
        if deferred.key not in self._building:
            self._ask(deferred.key, deferred.seq)

    def _ask(self, key: str, seq: int) -> None:
        assert self.builder is not None
        try:
            self.builder.ask(key)
        except OSError as err:
            self._builder_failed(f"cannot send it a request: {err}")
            return
        self._building[key] = (seq, time.monotonic())

    def _builder_readable(self) -> None:
        assert self.builder is not None
        try:
            answers = self.builder.read()
        except EOFError as err:
            self._builder_failed(str(err))
            return
        for key, response in answers:
            if key not in self._building:  # the builder failed meanwhile: answered already
                continue
            seq, asked_at = self._building.pop(key)
            if response.status == 200:
                self.app.model.store(key, seq, response, asked_at)
            waiters = self._waiters.pop(key, [])
            later = [w for w in waiters if w[3] > seq]  # they saw a change after the ask
            for conn, request, keep, _seq in waiters:
                if _seq <= seq:
                    self._answer_waiting(conn, request, keep, response)
            if later:
                self._waiters.setdefault(key, []).extend(later)
                if self.builder is not None and key not in self._building:
                    self._ask(key, max(w[3] for w in later))

    def _answer_waiting(
        self, conn: Connection, request: Request, keep: bool, response: Response
    ) -> None:
        conn.waiting = False
        if conn not in self._connections:  # the client left, or timed out, meanwhile
            return
        self._send(conn, request, response, keep=keep)
        if conn.pending is None and conn in self._connections:
            self._answer_buffered(conn)  # requests pipelined behind it

    def _builder_failed(self, why: str) -> None:
        """Drop a failed builder (started again BUILDER_RETRY_S later); build what clients
        are waiting for here, now."""
        log.error("the builder process failed (%s): whole-ledger answers are built in the "
                  "server process for %g s", why, BUILDER_RETRY_S)
        builder, self.builder = self.builder, None
        if builder is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(builder.fileno())
            builder.stop(grace_s=0.0)  # failed: not worth holding up the loop for
            self._spare_builder = builder
        self._builder_failed_at = time.monotonic()
        self._building.clear()
        waiters, self._waiters = self._waiters, {}
        for entries in waiters.values():
            for conn, request, keep, _seq in entries:
                response = self.app.handle(request.target)
                assert not isinstance(response, Deferred)
                self._answer_waiting(conn, request, keep, response)

    def _http_date(self) -> str:
        now = int(time.time())
        if self._date[0] != now:  # one formatting per second, not per request
            self._date = (now, email.utils.formatdate(now, usegmt=True))
        return self._date[1]


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


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


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port and listening; ServiceUnavailable if it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as err:
        sock.close()
        raise ServiceUnavailable(f"Cannot listen on {host}:{port}: {err}.") from err
    return sock


def make_server(
    db_path: str | os.PathLike[str],
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    log_requests: bool = False,
    inherited: socket.socket | None = None,
    builder: bool | Builder = True,
    max_stale_s: float = 0.0,
) -> QuotaHTTPServer:
    """A one-process server on the inherited socket, or bound to host:port; with a builder
    process for the whole-ledger answers (the given one, or the standard one if True)."""
    sock = inherited if inherited is not None else listen_socket(host, port)
    if builder is True:
        builder = Builder(db_path)
    return QuotaHTTPServer(
        sock, App(ReadModel(db_path, max_stale_s=max_stale_s)), log_requests=log_requests,
        builder=builder or None,
    )


def default_processes() -> int:
    """Server processes when --processes is not given: one per CPU, at most MAX_PROCESSES."""
    return max(1, min(os.cpu_count() or 1, MAX_PROCESSES))


class ActivityBoard:
    """Shared memory where each server process posts (open connections, last activity).

    The parent of forked server processes reads it to know when all of them have been idle.
    An anonymous mmap made before fork() is shared with the children (MAP_SHARED), and
    time.monotonic() is the same clock in every process.
    """

    _SLOT = struct.Struct("=qd")

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._map = mmap.mmap(-1, self._SLOT.size * slots)
        now = time.monotonic()
        for slot in range(slots):
            self.post(slot, 0, now)

    def post(self, slot: int, open_connections: int, last_activity: float) -> None:
        """Record one process's state (called by that process)."""
        self._SLOT.pack_into(self._map, slot * self._SLOT.size, open_connections, last_activity)

    def idle_for(self) -> float:
        """Seconds since the last connection of any process ended; 0 while one is open."""
        latest = 0.0
        for slot in range(self.slots):
            open_connections, last_activity = self._SLOT.unpack_from(
                self._map, slot * self._SLOT.size
            )
            if open_connections:
                return 0.0
            latest = max(latest, last_activity)
        return time.monotonic() - latest


def _run_child(
    sock: socket.socket, db_path: str | os.PathLike[str], slot: int, board: ActivityBoard,
    log_requests: bool, max_stale_s: float,
) -> None:
    """Body of a forked server process: serve on the shared socket until SIGTERM/SIGINT."""
    server = QuotaHTTPServer(
        sock, App(ReadModel(db_path, max_stale_s=max_stale_s)), log_requests=log_requests,
        builder=Builder(db_path),
    )
    server.on_activity = lambda n, t: board.post(slot, n, t)
    server.on_activity(*server.activity())

    def on_signal(_signum: int, _frame: Any) -> None:
        server.shutdown()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        server.app.model.close()


def serve_processes(
    sock: socket.socket,
    db_path: str | os.PathLike[str],
    *,
    processes: int,
    idle_timeout_s: float,
    log_requests: bool = False,
    poll_s: float = 0.25,
    max_stale_s: float = 0.0,
) -> None:
    """Fork `processes` servers on one listening socket and supervise them.

    Returns after SIGTERM/SIGINT or when every process has been idle for idle_timeout_s
    (0 = never), once all children have stopped. A child that dies is replaced; children
    dying over and over (5 within 10 s) stop the service with ServiceUnavailable.
    """
    board = ActivityBoard(processes)
    children: dict[int, int] = {}  # pid -> slot
    deaths: collections.deque[float] = collections.deque(maxlen=5)
    stopping = []

    def spawn(slot: int) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)  # until the child's handlers
        try:
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    _run_child(sock, db_path, slot, board, log_requests, max_stale_s)
                except BaseException:
                    log.exception("server process %d failed", os.getpid())
                    code = 1
                finally:
                    os._exit(code)  # never run the parent's cleanup in a child
            children[pid] = slot
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        stopping.append(signum)

    for sig in _STOP_SIGNALS:
        signal.signal(sig, on_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # blocked by serve()
    try:
        for slot in range(processes):
            spawn(slot)
        while not stopping:
            time.sleep(poll_s)
            for pid, status in _reap(children):
                slot = children.pop(pid)
                # A process killed with connections open never reported them closed.
                board.post(slot, 0, time.monotonic())
                if stopping:
                    continue
                deaths.append(time.monotonic())
                log.error("server process %d ended (wait status %d); starting another", pid,
                          status)
                if len(deaths) == deaths.maxlen and deaths[-1] - deaths[0] < 10.0:
                    raise ServiceUnavailable(
                        "The server processes keep failing (5 within 10 s); see the log above."
                    )
                spawn(slot)
            if idle_timeout_s and board.idle_for() >= idle_timeout_s:
                log.info("no request for %g s: exiting", idle_timeout_s)
                break
    finally:
        _stop_children(children)


def _reap(children: dict[int, int]) -> list[tuple[int, int]]:
    ended = []
    for pid in list(children):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            ended.append((pid, status))
    return ended


def _stop_children(children: dict[int, int], grace_s: float = 10.0) -> None:
    """SIGTERM every child, wait up to grace_s for all, SIGKILL those left."""
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while children and time.monotonic() < deadline:
        for pid, _status in _reap(children):
            children.pop(pid)
        if children:
            time.sleep(0.02)
    for pid in list(children):
        log.warning("server process %d did not stop in %g s: killing it", pid, grace_s)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        children.pop(pid)


def serve(
    db_path: str | os.PathLike[str],
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
    log_requests: bool = False,
    processes: int | None = None,
    max_stale_s: float = 0.0,
) -> None:
    """Serve until SIGTERM/SIGINT or idle_timeout_s without a connection (0 = never).

    processes > 1 forks that many servers sharing the socket (default_processes() if None).
    max_stale_s > 0: a whole-ledger answer built at most that long ago may be sent while a
    fresh one is built (0: every answer holds every change made before its request).
    """
    processes = default_processes() if processes is None else processes
    # Held from here until the handlers are in place (then delivered, not lost): a SIGTERM
    # right after the start line must stop the service cleanly, not kill it.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        inherited = systemd_socket()
        sock = inherited if inherited is not None else listen_socket(host, port)
        address = sock.getsockname()
        origin = "systemd socket (fd 3)" if inherited is not None else "bound"
        log.info(
            "slurm-quota %s serving %s on http://%s:%s/ (%s), idle timeout %s, %d process%s",
            __version__, db_path, address[0], address[1], origin,
            f"{idle_timeout_s:g} s" if idle_timeout_s else "off", processes,
            "" if processes == 1 else "es",
        )
        if max_stale_s:
            log.info("whole-ledger answers may be sent up to %g s old while fresh ones are "
                     "built (--max-stale)", max_stale_s)
        if not Path(db_path).exists():
            log.warning("the database %s does not exist yet: answering 503", db_path)
        if processes > 1:
            try:
                serve_processes(
                    sock, db_path, processes=processes, idle_timeout_s=idle_timeout_s,
                    log_requests=log_requests, max_stale_s=max_stale_s,
                )
            finally:
                sock.close()
        else:
            _serve_here(
                sock, db_path, idle_timeout_s=idle_timeout_s, log_requests=log_requests,
                max_stale_s=max_stale_s,
            )
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def _serve_here(
    sock: socket.socket, db_path: str | os.PathLike[str], *, idle_timeout_s: float,
    log_requests: bool, max_stale_s: float = 0.0,
) -> None:
    """The one-process service: this process is the server (and starts a builder process)."""
    server = QuotaHTTPServer(
        sock, App(ReadModel(db_path, max_stale_s=max_stale_s)), log_requests=log_requests,
        builder=Builder(db_path),
    )

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        server.shutdown()

    for sig in _STOP_SIGNALS:
        signal.signal(sig, on_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    poll = 0.25 if not idle_timeout_s else min(0.25, idle_timeout_s / 4)
    try:
        if server.serve_forever(poll_interval=poll, idle_timeout_s=idle_timeout_s):
            log.info("no request for %g s: exiting", idle_timeout_s)
    finally:
        server.server_close()
        server.app.model.close()
