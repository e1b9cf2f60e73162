"""Fixtures of the plugin tests: one Lua runtime per parameter, the plugin loaded in it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.lua.harness import RUNTIMES, Plugin


@pytest.fixture(params=RUNTIMES)
def runtime(request) -> str:
    """Each lupa runtime: Lua 5.1, 5.2, 5.3, 5.4 and LuaJIT 2.1."""
    return request.param


@pytest.fixture
def plugin(runtime: str, db_path: Path) -> Plugin:
    """lua/job_submit.lua loaded like slurmctld loads it, on a migrated temp ledger."""
    p = Plugin(runtime, db_path)
    assert p.load_rc == 0
    return p
