"""A private mariadbd for the plugin's MariaDB tests: its own data directory, socket and TCP
port, optionally inside a network namespace of its own (to black-hole its port with nft).

Owns: starting, stopping (SIGTERM or SIGKILL), restarting such a server, running SQL on it as
root over its socket, and a namespace with an nft rule that drops every packet to its port.
It never touches another server: everything is under the directory it is given, and it
signals only the process it started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests import syspkgs

PACKAGES = ["mariadb-server", "mariadb-client", "lua-dbi-mysql", "nftables", "iproute2"]
MARIADBD = "/usr/sbin/mariadbd"
DATABASE = "slurm_quota"
USER, PASSWORD = "sq_plugin", "pw-not-secret"
# The plugin's account: data only, as a site would grant it; migrations run as ADMIN.
ADMIN, ADMIN_PASSWORD = "sq_admin", "admin-not-secret"


def require() -> None:
    """Install MariaDB, LuaDBI's MySQL driver and nft, or skip (fail in CI) loudly."""
    syspkgs.require(PACKAGES)


class MariaDB:
    """One mariadbd under root (a directory), listening on 127.0.0.1:port and a socket."""

    def __init__(self, root: Path, port: int, netns: str | None = None):
        self.root = Path(root)
        self.port = port
        self.netns = netns
        self.data = self.root / "data"
        self.socket = self.root / "mysqld.sock"
        self.tmp = self.root / "tmp"
        self.proc: subprocess.Popen | None = None

    def _wrap(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    def install(self) -> None:
        """Create the data directory (system tables only)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(exist_ok=True)
        proc = subprocess.run(
            [
                "mariadb-install-db",
                "--no-defaults",
                f"--datadir={self.data}",
                "--user=root",
                f"--tmpdir={self.tmp}",
                "--auth-root-authentication-method=socket",
                "--skip-test-db",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def start(self, timeout: float = 60) -> None:
        """Start mariadbd and wait until it answers on its socket."""
        if not self.data.exists():
            self.install()
        log = open(self.root / "mariadbd.log", "ab")
        self.proc = subprocess.Popen(
            self._wrap(
                [
                    MARIADBD,
                    "--no-defaults",
                    f"--datadir={self.data}",
                    f"--socket={self.socket}",
                    f"--port={self.port}",
                    f"--tmpdir={self.tmp}",
                    "--bind-address=127.0.0.1",
                    "--user=root",
                    "--skip-name-resolve",
                    f"--pid-file={self.root / 'mariadbd.pid'}",
                    "--innodb-buffer-pool-size=16M",
                    "--innodb-log-file-size=8M",
                    "--skip-log-bin",
                    "--max-connect-errors=100000",
                    f"--log-error={self.root / 'mariadbd.err'}",
                ]
            ),
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"mariadbd exited {self.proc.returncode}: "
                    + (self.root / "mariadbd.err").read_text()[-2000:]
                )
            if (
                self.socket.exists()
                and subprocess.run(self._client(["-e", "SELECT 1"]), capture_output=True).returncode
                == 0
            ):
                return
            time.sleep(0.1)
        raise AssertionError(f"mariadbd did not answer within {timeout} s")

    def _client(self, args: list[str], database: str | None = None) -> list[str]:
        argv = ["mariadb", "--no-defaults", f"--socket={self.socket}", "-uroot", "-N", "-B"]
        return argv + ([database] if database else []) + args

    def sql(self, text: str, database: str | None = DATABASE) -> list[list[str]]:
        """Run SQL as root over the socket; the rows, tab-separated fields as strings."""
        proc = subprocess.run(
            self._client([], database), input=text, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        return [line.split("\t") for line in proc.stdout.splitlines()]

    def create_ledger(self) -> None:
        """The ledger database migrated by `slurm_quota.db.migrate` (migrations/mariadb), an
        administrator who migrates it and the plugin's user (data rights only)."""
        from slurm_quota import db as sqdb
        from slurm_quota.config import MariaDBLedger

        self.sql(
            f"DROP DATABASE IF EXISTS {DATABASE}; CREATE DATABASE {DATABASE}; "
            f"CREATE USER IF NOT EXISTS '{USER}'@'127.0.0.1' IDENTIFIED BY '{PASSWORD}'; "
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON {DATABASE}.* "
            f"TO '{USER}'@'127.0.0.1'; "
            f"CREATE USER IF NOT EXISTS '{ADMIN}'@'localhost' IDENTIFIED BY '{ADMIN_PASSWORD}'; "
            f"GRANT ALL ON {DATABASE}.* TO '{ADMIN}'@'localhost';",
            database=None,
        )
        sqdb.migrate(
            MariaDBLedger(
                database=DATABASE,
                user=ADMIN,
                password=ADMIN_PASSWORD,
                unix_socket=str(self.socket),
            )
        )

    def write_conf(self, path: Path, **overrides: str) -> Path:
        """A 0600 configuration file pointing at this server (keys overridable)."""
        keys = {
            "LedgerType": "mariadb",
            "StorageHost": "127.0.0.1",
            "StoragePort": str(self.port),
            "StorageLoc": DATABASE,
            "StorageUser": USER,
            "StoragePass": PASSWORD,
        }
        keys.update(overrides)
        path.write_text("".join(f"{k}={v}\n" for k, v in keys.items() if v is not None))
        path.chmod(0o600)
        return path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> None:
        """Stop the server this object started (SIGTERM: clean; SIGKILL: as a crash)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()


class Netns:
    """A network namespace with lo up, and an nft table that can drop a TCP port's packets."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self) -> Netns:
        proc = subprocess.run(["ip", "netns", "add", self.name], capture_output=True, text=True)
        if proc.returncode != 0:
            syspkgs.skip_or_fail(f"`ip netns add {self.name}` was refused: {proc.stderr.strip()}")
        self.run(["ip", "link", "set", "lo", "up"])
        return self

    def run(self, argv: list[str]) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            ["ip", "netns", "exec", self.name, *argv], capture_output=True, text=True, timeout=30
        )
        assert proc.returncode == 0, (argv, proc.stderr)
        return proc

    def drop_port(self, port: int) -> None:
        """Black-hole TCP port: every packet to it is dropped, nothing is answered."""
        self.run(["nft", "add", "table", "inet", "blackhole"])
        self.run(
            [
                "nft",
                "add",
                "chain",
                "inet",
                "blackhole",
                "input",
                "{ type filter hook input priority 0; }",
            ]
        )
        self.run(
            ["nft", "add", "rule", "inet", "blackhole", "input", "tcp", "dport", str(port), "drop"]
        )

    def undrop(self) -> None:
        """Remove the black hole."""
        self.run(["nft", "delete", "table", "inet", "blackhole"])

    def __exit__(self, *exc) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def have_tools() -> bool:
    """ip and nft are on PATH."""
    return bool(shutil.which("ip") and shutil.which("nft"))
