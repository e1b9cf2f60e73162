"""A private MariaDB server for tests: started in a temp dir, stopped by its PID.

Use as pytest fixtures (import them into a conftest.py or a test module):

    from tests.mariadb_server import mariadb_server, mariadb_ledger  # noqa: F401

`mariadb_server` (session) is a running MariaDBServer: mariadbd on a unix socket in its own
data directory and on a TCP port of 127.0.0.1 (env SLURM_QUOTA_TEST_MARIADB_PORT, else one
the kernel says is free). `mariadb_ledger` (per test) is a fresh empty database on it, with
its own user and password, as a slurm_quota.config.MariaDBLedger (TCP, like a real site).

Without the Debian packages (installed when root) or PyMySQL the tests skip loudly, and fail
when SLURM_QUOTA_REQUIRE_SYSTEM=1, as the other system tests do. Nothing here kills a process
by name: only the mariadbd this module started, by its PID.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import syspkgs

PORT_ENV = "SLURM_QUOTA_TEST_MARIADB_PORT"
PACKAGES = ["mariadb-server", "mariadb-client"]
START_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MariaDBServer:
    """One mariadbd of our own: data directory, socket and log under `root`."""

    def __init__(
        self,
        root: Path,
        port: int | None = None,
        *,
        bind_address: str = "127.0.0.1",
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.root = root
        self.port = port or int(os.environ.get(PORT_ENV) or _free_port())
        # Another address (e.g. one of a network namespace) for multi-host lab tests.
        self.bind_address = bind_address
        self.extra_args = extra_args
        self.datadir = root / "data"
        self.socket = root / "mysqld.sock"
        self.log = root / "mysqld.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._names = itertools.count(1)

    def _client(self, *args: str) -> list[str]:
        return ["mariadb", "--no-defaults", "-S", str(self.socket), "-u", "root", *args]

    def start(self) -> None:
        """Initialise the data directory (first time) and start mariadbd; wait until it answers."""
        user = ["--user=root"] if os.geteuid() == 0 else []
        if not self.datadir.exists():
            proc = subprocess.run(
                [
                    "mariadb-install-db",
                    "--no-defaults",
                    f"--datadir={self.datadir}",
                    *user,
                    "--auth-root-authentication-method=socket",
                    "--skip-test-db",
                ],
                capture_output=True,
                text=True,
                timeout=180,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"mariadb-install-db failed: {proc.stderr[-2000:]}")
        with open(self.root / "mysqld.start.log", "ab") as out:
            self.proc = subprocess.Popen(
                [
                    "mariadbd",
                    "--no-defaults",
                    *user,
                    f"--datadir={self.datadir}",
                    f"--socket={self.socket}",
                    f"--pid-file={self.root / 'mysqld.pid'}",
                    f"--bind-address={self.bind_address}",
                    f"--port={self.port}",
                    f"--log-error={self.log}",
                    "--skip-name-resolve",
                    "--innodb-buffer-pool-size=64M",
                    "--innodb-log-file-size=16M",
                    # tests create and drop many small databases: no fsync per commit
                    "--innodb-flush-log-at-trx-commit=2",
                    "--skip-log-bin",
                    *self.extra_args,
                ],
                cwd=str(self.root),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mariadbd exited {self.proc.returncode}: {self._log_tail()}")
            ping = subprocess.run(
                ["mariadb-admin", "--no-defaults", "-S", str(self.socket), "-u", "root", "ping"],
                capture_output=True,
            )
            if ping.returncode == 0:
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mariadbd did not answer in {START_TIMEOUT_S} s")
            time.sleep(0.2)

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "(no log)"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop our mariadbd (SIGTERM: clean shutdown; SIGKILL: a crash), by its PID."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def sql(self, statement: str) -> str:
        """Run SQL as the server's root (unix socket); return the tab-separated output."""
        proc = subprocess.run(
            self._client("-N", "-B", "-e", statement), capture_output=True, text=True, timeout=60
        )
        if proc.returncode != 0:
            raise RuntimeError(f"mariadb: {proc.stderr.strip()}")
        return proc.stdout

    def new_database(self, prefix: str = "sq", client_host: str = "127.0.0.1"):
        """A new empty database and a user with every right on it: a config.MariaDBLedger
        (connecting over TCP to bind_address; client_host: where that user may come from,
        besides 127.0.0.1 and localhost)."""
        from slurm_quota.config import MariaDBLedger

        n = next(self._names)
        name = f"{prefix}_{os.getpid()}_{n}"
        password = secrets.token_urlsafe(12)
        hosts = dict.fromkeys(("127.0.0.1", "localhost", client_host))
        self.sql(
            f"CREATE DATABASE {name}; "
            + "".join(
                f"CREATE USER '{name}'@'{h}' IDENTIFIED BY '{password}'; "
                f"GRANT ALL ON {name}.* TO '{name}'@'{h}'; "
                for h in hosts
            )
        )
        host = "127.0.0.1" if self.bind_address in ("127.0.0.1", "0.0.0.0") else self.bind_address
        return MariaDBLedger(host=host, port=self.port, database=name, user=name, password=password)

    def drop_database(self, ledger) -> None:
        """Drop a database made by new_database, and its users."""
        name = ledger.database
        users = self.sql(f"SELECT Host FROM mysql.user WHERE User = '{name}'").split()
        self.sql(
            f"DROP DATABASE IF EXISTS {name}; "
            + "".join(f"DROP USER IF EXISTS '{name}'@'{h}'; " for h in users)
        )


def require_mariadb() -> None:
    """Skip (or fail under SLURM_QUOTA_REQUIRE_SYSTEM=1) unless a MariaDB server can be run."""
    syspkgs.require(PACKAGES)
    for binary in ("mariadbd", "mariadb-install-db", "mariadb", "mariadb-admin"):
        if shutil.which(binary) is None and not Path("/usr/sbin", binary).exists():
            syspkgs.skip_or_fail(f"{binary} not found (Debian package mariadb-server)")
    try:
        import pymysql  # noqa: F401
    except ImportError:
        syspkgs.skip_or_fail(
            "PyMySQL is not installed (pip install '.[mariadb]', Debian python3-pymysql)"
        )


@contextlib.contextmanager
def running_server(**options) -> Iterator[MariaDBServer]:
    """A MariaDBServer (options: port, bind_address, extra_args) for the duration of the
    block, in a temp dir removed afterwards."""
    os.environ["PATH"] = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    root = Path(tempfile.mkdtemp(prefix="slurm-quota-mariadb-"))
    server = MariaDBServer(root, **options)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def mariadb_server() -> Iterator[MariaDBServer]:
    """A private mariadbd for the whole test session."""
    require_mariadb()
    with running_server() as server:
        yield server


@pytest.fixture
def mariadb_ledger(mariadb_server: MariaDBServer):
    """A fresh, empty (not migrated) MariaDB database for one test: a config.MariaDBLedger."""
    ledger = mariadb_server.new_database()
    yield ledger
    with contextlib.suppress(RuntimeError):
        mariadb_server.drop_database(ledger)


def kill_server(server: MariaDBServer) -> None:
    """Crash the server (SIGKILL), as the lab's kill tests do; restart with server.start()."""
    server.stop(signal.SIGKILL)
