"""Shared fixtures: a real migrated SQLite file per test, a listening socket to pass to serve,
and the same ledger on both engines (`any_ledger`, `any_conn`: SQLite and a private MariaDB
server, tests/mariadb_server.py)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from slurm_quota import db
from tests.mariadb_server import mariadb_ledger, mariadb_server  # noqa: F401 (fixtures)

ENGINES = ("sqlite", "mariadb")


ABSENT_CONF = "/nonexistent/slurm-quota-tests/slurm-quota.conf"


@pytest.fixture(autouse=True)
def _no_site_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never read the machine's /etc/slurm-quota/slurm-quota.conf: an absent one (a
    test that wants a configuration file sets SLURM_QUOTA_CONF itself)."""
    monkeypatch.setenv("SLURM_QUOTA_CONF", ABSENT_CONF)


@pytest.fixture(params=[ENGINES[0], pytest.param(ENGINES[1], marks=pytest.mark.mariadb)])
def any_ledger(request: pytest.FixtureRequest, tmp_path: Path):
    """A freshly migrated ledger on each engine: a config.SQLiteLedger, then a
    config.MariaDBLedger (a new database on the private server)."""
    from slurm_quota.config import SQLiteLedger

    if request.param == "sqlite":
        ledger = SQLiteLedger(str(tmp_path / "slurm-quota.db"))
    else:
        ledger = request.getfixturevalue("mariadb_ledger")
    db.migrate(ledger)
    return ledger


@pytest.fixture
def any_conn(any_ledger):
    """A read-write connection to any_ledger, closed after the test."""
    c = db.connect(any_ledger)
    yield c
    c.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """A freshly migrated ledger file (a real file: Lua and Python must see the same data)."""
    path = tmp_path / "slurm-quota.db"
    db.migrate(path)
    return path


@pytest.fixture
def conn(db_path: Path):
    """A read-write connection to the migrated ledger, closed after the test."""
    c = db.connect(db_path)
    yield c
    c.close()


@pytest.fixture
def listener():
    """A bound, listening TCP socket on 127.0.0.1, as systemd passes to a socket-activated serve."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock
    sock.close()
