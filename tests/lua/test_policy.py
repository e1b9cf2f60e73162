"""Failure policy: missing / locked / unknown-schema ledger and Lua errors, open and closed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from slurm_quota import db
from tests.lua.harness import execute, modify_case, prealloc, rows, submit_case

HOLD_LOCK = """
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("BEGIN IMMEDIATE")
c.execute("INSERT INTO settings (key, value) VALUES ('lock-holder', 'x')")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
c.execute("ROLLBACK")
"""


def hold_write_lock(db_path: Path, seconds: float) -> subprocess.Popen:
    """Another process holding the ledger's write lock (BEGIN IMMEDIATE) for `seconds`."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(db_path), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.parametrize("fail_open, rc", [(True, 0), (False, -1)])
def test_missing_database(plugin, tmp_path, fail_open, rc):
    missing = tmp_path / "nope" / "slurm-quota.db"
    missing.parent.mkdir()
    plugin.m.config.db_path = str(missing)
    plugin.m.config.fail_open = fail_open
    res = plugin.submit(submit_case("c01_plain"))
    assert res.rc == rc
    assert res.admin_comment is None
    err = res.log_text("error")
    assert "missing or unreadable" in err
    assert 'user=alice uid=1001 account=research job="c01_plain"' in err
    assert ("ACCEPTED WITHOUT QUOTA CHECK" in err) == fail_open
    assert bool(res.user_lines) == (not fail_open)
    assert not missing.exists()  # the plugin never creates the ledger


LATEST = db.latest_version()


def test_plugin_knows_the_latest_schema(plugin):
    assert plugin.m.SCHEMA_VERSION == LATEST


@pytest.mark.parametrize("version", [0, 1, LATEST - 1, LATEST + 1])
@pytest.mark.parametrize("fail_open, rc", [(True, 0), (False, -1)])
def test_unknown_schema(plugin, db_path, version, fail_open, rc):
    execute(db_path, f"PRAGMA user_version = {version}")
    plugin.m.config.fail_open = fail_open
    res = plugin.submit(submit_case("c01_plain"))
    assert res.rc == rc
    assert f"schema version {version}, this plugin knows {LATEST}" in res.log_text("error")
    assert rows(db_path, "SELECT COUNT(*) FROM jobs_preallocations") == [(0,)]


@pytest.mark.parametrize("fail_open, rc", [(True, 0), (False, -1)])
def test_schema_change_under_a_cached_connection(plugin, db_path, fail_open, rc):
    """The reused connection's check runs inside the write transaction, every call."""
    assert plugin.submit(submit_case("c01_plain")).rc == 0
    execute(db_path, f"PRAGMA user_version = {LATEST - 1}")  # e.g. a restored older file
    plugin.m.config.fail_open = fail_open
    res = plugin.submit(submit_case("c01_plain"))
    assert res.rc == rc and res.admin_comment is None
    assert f"schema version {LATEST - 1}, this plugin knows {LATEST}" in res.log_text("error")
    assert rows(db_path, "SELECT COUNT(*) FROM jobs_preallocations") == [(1,)]
    assert plugin.bridge.conns == {} and plugin.bridge.leaked == []


@pytest.mark.parametrize("fail_open, rc", [(True, 0), (False, -1)])
def test_lua_error_in_orchestration(plugin, db_path, fail_open, rc):
    plugin.lua.execute(
        "package.loaded.slurm_quota.build_request = function() error('boom in the plugin') end"
    )
    plugin.m.config.fail_open = fail_open
    res = plugin.submit(submit_case("c01_plain"))
    assert res.rc == rc
    assert "boom in the plugin" in res.log_text("error")
    assert plugin.bridge.conns == {}  # connection closed on the error path
    assert rows(db_path, "SELECT COUNT(*) FROM users") == [(0,)]


@pytest.mark.parametrize("entry", ["job_submit", "job_modify"])
@pytest.mark.parametrize("fail_open, rc", [(True, 0), (False, -1)])
def test_no_error_leaves_the_entry_points(plugin, entry, fail_open, rc):
    # 26.05 rejects the job when a Lua error escapes job_submit/job_modify: even an error
    # outside the module's own guard (here: in the entry point itself) must be turned into
    # the failure policy by the wiring.
    plugin.lua.execute(
        f"package.loaded.slurm_quota.{entry} = function() error('escaped the guard') end"
    )
    plugin.m.config.fail_open = fail_open
    if entry == "job_submit":
        res = plugin.submit(submit_case("c01_plain"))
    else:
        desc, rec = modify_case(time_limit=15.0)
        res = plugin.modify(desc, rec, modify_uid=1001)
    assert res.rc == rc
    assert "escaped the guard" in res.log_text("error")


def test_fail_closed_message_asks_to_retry(plugin, tmp_path):
    plugin.m.config.db_path = str(tmp_path / "absent.db")
    plugin.m.config.fail_open = False
    res = plugin.submit(submit_case("c01_plain"))
    assert res.user_lines == [
        "slurm-quota: your job could not be checked against your CPU/GPU-minute quota (the "
        "quota database is unavailable), so it was not submitted. Please retry in a minute; "
        "if this persists, tell your administrators."
    ]


def test_root_is_accepted_even_fail_closed(plugin, tmp_path):
    plugin.m.config.db_path = str(tmp_path / "absent.db")
    plugin.m.config.fail_open = False
    res = plugin.submit(submit_case("c01_plain", user_name="root", user_id=0.0))
    assert res.rc == 0


def test_error_after_begin_rolls_everything_back(plugin, db_path):
    execute(db_path, "CREATE TRIGGER no_prealloc BEFORE INSERT ON jobs_preallocations "
                     "BEGIN SELECT RAISE(ABORT, 'refused by trigger'); END")
    plugin.m.config.fail_open = False
    res = plugin.submit(submit_case("c01_plain"))
    assert res.rc == -1
    assert "refused by trigger" in res.log_text("error")
    # the user and account rows created in the same transaction are gone too
    assert rows(db_path, "SELECT COUNT(*) FROM users") == [(0,)]
    assert rows(db_path, "SELECT COUNT(*) FROM accounts") == [(0,)]
    assert plugin.bridge.conns == {}


@pytest.mark.parametrize("fail_open, rc", [(True, 0), (False, -1)])
def test_locked_database_decides_within_the_bound(plugin, db_path, fail_open, rc):
    plugin.m.config.fail_open = fail_open
    holder = hold_write_lock(db_path, 5)
    try:
        res = plugin.submit(submit_case("c01_plain"))
    finally:
        holder.kill()
        holder.wait()
    assert res.rc == rc
    assert "locked" in res.log_text("error")
    # The bound is SQLite's busy_timeout (200 ms), waited once: no retry loop.
    pragma = f"PRAGMA busy_timeout = {plugin.m.config.busy_timeout_ms}"
    assert plugin.bridge.statements.count(pragma) == 1
    assert plugin.bridge.statements.count("BEGIN IMMEDIATE") == 1
    assert plugin.bridge.conns == {}
    # once the lock is gone the next submission is checked and recorded normally
    after = plugin.submit(submit_case("c01_plain"))
    assert after.rc == 0 and prealloc(db_path, after.uuid) is not None


def test_locked_database_does_not_block_hold(plugin, db_path):
    from tests.lua.test_modify import submitted, update

    plugin.m.config.fail_open = False
    uuid, rec = submitted(plugin, db_path)
    holder = hold_write_lock(db_path, 5)
    try:
        assert update(plugin, rec, priority=0.0).rc == 0
        # a time change needs the ledger: fail-closed refuses the user's update...
        assert update(plugin, rec, time_limit=10.0).rc == -1
        # ...but never an administrator's
        assert update(plugin, rec, uid=0, time_limit=10.0).rc == 0
    finally:
        holder.kill()
        holder.wait()
