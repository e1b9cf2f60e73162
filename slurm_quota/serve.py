"""`slurm-quota serve` and `slurm-quota-web`: slurm_quota.app on the waitress WSGI server.

Owns: the listening socket (bound, or adopted from systemd socket activation on fd 3), the
server's limits against slow and hostile clients, the idle exit, the stop on SIGTERM/SIGINT
and the request log. The routes and what they answer are slurm_quota.app's; HTTP parsing,
connections and threads are waitress's (docs/design.md says why waitress).

Waitress reads every connection in one event loop and hands a request to its worker
threads only once the request is complete, so slow clients cost a socket each, not a
thread; the whole-ledger answers are built by one worker while the others keep answering.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from slurm_quota import __version__
from slurm_quota.app import Settings, StartResponse, WSGIApp, create_app
from slurm_quota.errors import ServiceUnavailable
from slurm_quota.numbers import int_or_none, shown

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9911
DEFAULT_IDLE_TIMEOUT_S = 600.0
DEFAULT_THREADS = 4
LISTEN_BACKLOG = 1024
MAX_HEADER_BYTES = 32768  # the request line and headers (as nginx allows); more: 431
MAX_BODY_BYTES = 4096  # only admin writes have a body (a few hundred bytes): larger ones get 413
CHANNEL_TIMEOUT_S = 10  # a connection without a whole request for this long is closed
WANTED_FILES = 16384  # open-file limit asked for: one per connection
RESERVED_FILES = 64  # kept for the ledger, logs and the server's own sockets
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


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


def connection_limit() -> int:
    """Connections served at once: the open-file limit (raised towards WANTED_FILES when the
    hard limit allows) less a reserve. Past it, new connections wait in the backlog."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = WANTED_FILES if hard == resource.RLIM_INFINITY else min(WANTED_FILES, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as err:  # e.g. a seccomp filter without @resources
            log.warning("cannot raise the open-file limit from %d: %s", soft, err)
    if soft == resource.RLIM_INFINITY:
        soft = WANTED_FILES
    return max(16, soft - RESERVED_FILES)


class Activity:
    """WSGI middleware that knows how long the service has had no request in progress, and
    logs requests when asked (-v)."""

    def __init__(self, app: WSGIApp, log_requests: bool = False) -> None:
        self.app = app
        self.log_requests = log_requests
        self._lock = threading.Lock()
        self._active = 0
        self._last = time.monotonic()

    def idle_for(self) -> float:
        """Seconds since the last request ended; 0 while one is in progress."""
        with self._lock:
            return 0.0 if self._active else time.monotonic() - self._last

    def _done(self) -> None:
        with self._lock:
            self._active -= 1
            self._last = time.monotonic()

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        with self._lock:
            self._active += 1
            self._last = time.monotonic()
        status: list[str] = []

        def recording(code: str, headers: list[tuple[str, str]], *exc: Any) -> Any:
            status.append(code)
            return start_response(code, headers, *exc)

        try:
            body = self.app(environ, recording)
        except BaseException:
            self._done()
            raise
        return self._finish(environ, body, status)

    def _finish(
        self, environ: dict, body: Iterable[bytes], status: list[str]
    ) -> Iterator[bytes]:
        sent = 0
        try:
            for chunk in body:
                sent += len(chunk)
                yield chunk
        finally:
            self._done()
            if self.log_requests:
                query = environ.get("QUERY_STRING")
                log.info('%s "%s %s%s" %s %d', environ.get("REMOTE_ADDR", "-"),
                         environ.get("REQUEST_METHOD"), environ.get("PATH_INFO", "")[:200],
                         f"?{query[:200]}" if query else "",
                         status[0].split()[0] if status else "-", sent)


def make_server(
    app: WSGIApp, sock: socket.socket, *, threads: int = DEFAULT_THREADS
) -> Any:
    """A waitress server of app on the listening socket sock, with our limits."""
    import waitress  # lazy: `slurm-quota --help` must not pay for it

    # Requests waiting for a free thread are normal under a burst (100 clients at once); the
    # queue logs a warning per waiting request, which would flood the journal.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    return waitress.create_server(
        app, sockets=[sock], threads=threads, backlog=LISTEN_BACKLOG,
        connection_limit=connection_limit(), asyncore_use_poll=True,
        channel_timeout=CHANNEL_TIMEOUT_S, cleanup_interval=max(1, CHANNEL_TIMEOUT_S // 3),
        max_request_header_size=MAX_HEADER_BYTES, max_request_body_size=MAX_BODY_BYTES,
        ident=f"slurm-quota/{__version__}", clear_untrusted_proxy_headers=True,
    )


class _Stop(SystemExit):
    """Raised in the main thread to end waitress's loop (waitress.run() catches it)."""


def run(
    settings: Settings,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
    threads: int = DEFAULT_THREADS,
    log_requests: bool = False,
    what: str = "slurm-quota",
) -> bool:
    """Serve the app of settings until SIGTERM/SIGINT, or until idle_timeout_s without a
    request (0 = never; True is returned then). Call from the main thread."""
    # Held until the handlers are in place (then delivered, not lost): a SIGTERM right after
    # the start line must stop the service cleanly, not kill it.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        inherited = systemd_socket()
        sock = inherited if inherited is not None else listen_socket(host, port)
        app = Activity(create_app(settings), log_requests)
        server = make_server(app, sock, threads=threads)
        address = sock.getsockname()
        origin = "systemd socket (fd 3)" if inherited is not None else "bound"
        source = settings.db_path if settings.db_path is not None else (
            f"statistics from {settings.api_url}")
        log.info("%s %s serving %s on http://%s:%s/ (%s), idle timeout %s, %d threads",
                 what, __version__, source, address[0], address[1], origin,
                 f"{idle_timeout_s:g} s" if idle_timeout_s else "off", threads)
        if settings.max_stale_s:
            log.info("whole-ledger answers may be sent up to %g s old while fresh ones are "
                     "built (--max-stale)", settings.max_stale_s)
        if isinstance(settings.db_path, Path) and not settings.db_path.exists():
            log.warning("the database %s does not exist yet: answering 503", settings.db_path)
        why: list[str] = []

        def on_signal(signum: int, _frame: Any) -> None:
            if signum == signal.SIGALRM:
                if app.idle_for() < idle_timeout_s:
                    return
                why.append("idle")
            else:
                why.append(f"signal {signum}")
            signal.setitimer(signal.ITIMER_REAL, 0)
            raise _Stop()

        for sig in _STOP_SIGNALS:
            signal.signal(sig, on_signal)
        if idle_timeout_s:
            # Checked from the main thread, where waitress's loop runs: the handler ends it.
            signal.signal(signal.SIGALRM, on_signal)
            tick = min(1.0, idle_timeout_s / 4)
            signal.setitimer(signal.ITIMER_REAL, tick, tick)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    try:
        server.run()  # returns once on_signal raised _Stop
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        server.close()
        sock.close()
    if why and why[0] == "idle":
        log.info("no request for %g s: exiting", idle_timeout_s)
        return True
    log.info("%s: stopped", why[0] if why else "stopped")
    return False


def web_main(argv: list[str] | None = None) -> int:
    """Console script `slurm-quota-web`: the dashboard, with the data from SLURM_QUOTA_URL."""
    import argparse
    import sys

    settings = Settings.from_env()
    parser = argparse.ArgumentParser(
        prog="slurm-quota-web",
        description="slurm-quota web dashboard (the same application as `slurm-quota serve`, "
        "with the data from the service). Reads SLURM_QUOTA_URL (default "
        f"{settings.api_url}), SLURM_QUOTA_WEB_HOST (127.0.0.1), SLURM_QUOTA_WEB_PORT "
        "(8080), SLURM_QUOTA_WEB_REFRESH (seconds, default 60, 0 = off). Under Apache, "
        "point WSGIScriptAlias at slurm_quota/web/wsgi.py instead.",
    )
    parser.add_argument("--host", default=os.environ.get("SLURM_QUOTA_WEB_HOST", "127.0.0.1"))
    parser.add_argument("--port", default=None, help="TCP port (0-65535)")
    parser.add_argument("--version", action="version", version=f"slurm-quota-web {__version__}")
    args = parser.parse_args(argv)
    given, source = args.port, "--port"
    if given is None:
        given, source = os.environ.get("SLURM_QUOTA_WEB_PORT", "8080"), "SLURM_QUOTA_WEB_PORT"
    port = int_or_none(given)
    if port is None or port > 65535:
        print(f"slurm-quota-web: error: {source} {shown(given)} is not a port number "
              "(0-65535).", file=sys.stderr)
        return 2
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    try:
        run(settings, host=args.host, port=port, idle_timeout_s=0,
            log_requests=bool(os.environ.get("SLURM_QUOTA_WEB_VERBOSE")), what="slurm-quota-web")
    except ServiceUnavailable as err:
        print(f"slurm-quota-web: error: {err}", file=sys.stderr)
        return 75
    return 0
