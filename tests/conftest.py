"""Shared fixtures: a real migrated SQLite file per test, a CLI runner."""

from __future__ import annotations

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
