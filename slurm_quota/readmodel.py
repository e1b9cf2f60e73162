"""What the service answers from the ledger: pooled read-only connections, the answers about
the whole ledger kept until it changes, and the answer records the routes return.

Owns: ReadModel (connections, the change probe, the cache of whole-ledger answers), Response,
finish_whole (gzipped copy and entity tag), PieceGzip, etag_matches. It must not write to the
ledger or know about HTTP servers: slurm_quota.app turns Responses into WSGI answers.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import queue
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from slurm_quota import db
from slurm_quota.errors import DatabaseMissing, SlurmQuotaError

log = logging.getLogger(__name__)

POOL_SIZE = 4  # read-only connections kept open: one per server thread
# A read never waits long for the plugin's or a charge's write lock: the client is a person.
READ_BUSY_TIMEOUT_MS = 2000
GZIP_MIN_BYTES = 4096
GZIP_LEVEL = 5
GZIP_PIECE_BYTES = 32768  # PieceGzip: pieces of about this size are compressed and kept
GZIP_ETAG_SUFFIX = "-gzip"  # the gzipped copy's entity tag: the body's, with this suffix
JSON_TYPE = "application/json"
WHOLE_LEDGER_KEYS = ("stats", "metrics")
# Where PieceGzip cuts each whole-ledger answer: between two rows (JSON objects, text lines).
PIECE_DELIMITERS = {"stats": b"},", "metrics": b"\n"}


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
    change seen bumps a sequence number (observe()); a kept answer is current while it was
    built at the latest one.

    max_stale_s > 0 (`serve --max-stale`): a kept answer built at most that long ago is sent
    while another thread builds the fresh one. Thread-safe: a connection is used by one
    thread at a time.
    """

    def __init__(
        self, db_path: str | os.PathLike[str], pool_size: int = POOL_SIZE,
        max_stale_s: float = 0.0,
    ) -> None:
        # A MariaDB ledger (config.MariaDBLedger) has no file: no inode to watch.
        self._mariadb = db_path if getattr(db_path, "kind", None) == "mariadb" else None
        self.db_path = None if self._mariadb is not None else Path(db_path)
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
        self._build_locks = {key: threading.Lock() for key in WHOLE_LEDGER_KEYS}
        # Compressed pieces of the last answer of each key (used under its build lock).
        self._gzip = {key: PieceGzip(PIECE_DELIMITERS[key]) for key in WHOLE_LEDGER_KEYS}

    def _open(self) -> Any:
        return db.connect(
            self._mariadb or self.db_path, readonly=True, busy_timeout_ms=READ_BUSY_TIMEOUT_MS
        )

    def _check_file(self) -> int:
        if self._mariadb is not None:
            return 0
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
        """The answer for key as of the ledger now, built once per ledger change.

        One thread builds; others asking meanwhile wait for it (each answer holds every
        change committed before its request). Under max_stale_s, a kept answer young enough
        is sent at once instead, and a fresh one is built behind it for the next clients.
        """
        seq = self.observe()
        entry = self._cache.get(key)
        if entry is not None and entry[0] >= seq:
            return entry[1]
        lock = self._build_locks[key]
        recent = entry is not None and time.monotonic() - entry[2] <= self.max_stale_s
        if recent:
            assert entry is not None
            if lock.acquire(blocking=False):  # nobody is building: build behind this answer
                threading.Thread(
                    target=self._build_behind, args=(key, seq, build, lock), daemon=True
                ).start()
            return entry[1]
        lock.acquire()
        return self._build_locked(key, seq, build, lock)

    def _build_locked(
        self, key: str, seq: int, build: Callable[[], Response], lock: threading.Lock
    ) -> Response:
        """Build key's answer unless one at seq or later is kept; releases lock."""
        try:
            entry = self._cache.get(key)  # built by another thread while this one waited?
            if entry is not None and entry[0] >= seq:
                return entry[1]
            seq = self.observe()  # before the build: the answer holds at least this state
            built_at = time.monotonic()
            response = build()
            if response.status != 200:
                return response
            response = finish_whole(response, self._gzip[key])
            self._cache[key] = (seq, response, built_at)
            return response
        finally:
            lock.release()

    def _build_behind(
        self, key: str, seq: int, build: Callable[[], Response], lock: threading.Lock
    ) -> None:
        try:
            self._build_locked(key, seq, build, lock)
        except Exception as err:  # nobody waits for it: the next request builds and answers
            log.warning("building the %s answer behind a recent copy failed: %s", key, err)

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


class PieceGzip:
    """gzip of a whole-ledger answer made of the deflate streams of its pieces, each piece
    compressed once and kept while it recurs: after a change to a few rows, only the pieces
    holding them are compressed again (a 4 MB answer in 32 kB pieces: one or two of 130).

    The answer is cut at the first delimiter (between two rows) at least GZIP_PIECE_BYTES
    after the previous cut, so a row that grows or shrinks moves no later cut (unless a
    delimiter crosses that bound: then the pieces after it are compressed anew, once). Each
    piece is a raw deflate stream ended by a sync flush (byte-aligned, not final); the
    pieces, an empty final block, the CRC-32 and the length make one gzip member (RFC
    1951/1952), which any gzip reader decompresses to the answer.
    """

    _HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # no name, mtime 0, OS unknown
    _FINAL = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -15).flush()  # empty final block

    def __init__(self, delimiter: bytes, piece_bytes: int = GZIP_PIECE_BYTES) -> None:
        self.delimiter = delimiter
        self.piece_bytes = piece_bytes
        self._last: dict[bytes, bytes] = {}

    def compress(self, body: bytes) -> bytes:
        last: dict[bytes, bytes] = self._last
        now: dict[bytes, bytes] = {}
        parts = [self._HEADER]
        start, size = 0, len(body)
        while start < size:
            cut = body.find(self.delimiter, start + self.piece_bytes)
            end = size if cut < 0 else cut + len(self.delimiter)
            piece = body[start:end]
            deflated = last.get(piece)
            if deflated is None:
                compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -15)
                deflated = compressor.compress(piece) + compressor.flush(zlib.Z_SYNC_FLUSH)
            now[piece] = deflated
            parts.append(deflated)
            start = end
        self._last = now
        parts += (self._FINAL, struct.pack("<II", zlib.crc32(body), size & 0xFFFFFFFF))
        return b"".join(parts)


def finish_whole(response: Response, pieces: PieceGzip | None = None) -> Response:
    """A whole-ledger answer as it is kept and sent: with its gzipped copy (when worth it;
    through pieces, the ReadModel's, when given) and its entity tag. The tag hashes the
    bytes, so a restarted server gives the same tag for the same ledger state and a client
    keeps its copy across restarts."""
    digest = hashlib.blake2b(response.body, digest_size=12).hexdigest()
    gzipped = None
    if len(response.body) >= GZIP_MIN_BYTES:
        if pieces is not None:
            gzipped = pieces.compress(response.body)
        else:
            gzipped = gzip.compress(response.body, compresslevel=GZIP_LEVEL, mtime=0)
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
