"""Shared fixtures: a real migrated SQLite file per test, a listening socket to pass to serve."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from slurm_quota import db


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
