"""The plugin under the real lua5.1 and lua5.4 + LuaDBI (SQLite3) on a real file, via
tests/lua/driver.lua."""

from __future__ import annotations

import os
import time

import pytest

from tests.lua import realrun
from tests.lua.harness import (
    MAIN_PARTITION,
    NO_VAL,
    execute,
    modify_case,
    prealloc,
    rows,
    submit_case,
)
from tests.lua.realrun import require_real_lua, run_cases
from tests.lua.test_policy import hold_write_lock
from tests.lua.test_submit import CAPTURED, set_factor, set_user_quota


@pytest.fixture(autouse=True, params=realrun.INTERPRETERS)
def _real_lua(request, monkeypatch):
    require_real_lua()
    monkeypatch.setattr(realrun, "current", request.param)
    return request.param


def submit(case, **fields):
    return {"kind": "submit", "desc": submit_case(case, **fields), "parts": [MAIN_PARTITION]}


def test_captured_submissions_under_real_lua(tmp_path, db_path):
    set_factor(db_path, "h100", 2.0)
    run = run_cases([submit(case) for case, _ in CAPTURED], tmp_path, db_path)
    assert run.load_rc == "0"
    assert run.globals == ["slurm_job_modify", "slurm_job_submit"]
    for (case, expected), call in zip(CAPTURED, run.calls):
        assert call.rc == 0, (case, call.logs)
        row = prealloc(db_path, call.uuid)
        account, cpu, gpu, size = expected
        if case == "c10_gres_h100x2":
            gpu *= 2  # factor 2.0 for h100 in this run
        assert row == ("alice", account, cpu, gpu, size), case


def test_refusal_message_under_real_lua(tmp_path, db_path):
    set_user_quota(db_path, "alice", cpu=100, consumed_cpu=50)
    run = run_cases([submit("c07_array0-9", time_limit=10.0, name="sweep")], tmp_path, db_path)
    call = run.calls[0]
    assert call.rc == 2050
    user = [m for lv, m in call.logs if lv == "user"]
    assert user[0] == ('slurm-quota: job "sweep" refused: it needs more CPU-minutes than user '
                       "alice has left.")
    assert user[1] == (
        "slurm-quota:   requested: 100 CPU-minutes = 1 CPU x 10 min x 10 array elements"
    )
    assert user[2] == ("slurm-quota:   available: 50 CPU-minutes = quota 100 - consumed 50 - "
                       "reserved 0 by 0 queued/running jobs")
    assert "--time=5 or less would fit; or 5 array elements would fit" in user[3]
    assert rows(db_path, "SELECT COUNT(*) FROM jobs_preallocations") == [(0,)]


def test_modify_under_real_lua(tmp_path, db_path):
    desc_hold, rec = modify_case(priority=0.0)
    rec = dict(rec, time_limit=20.0)
    desc_lower, _ = modify_case(time_limit=15.0)
    desc_raise, _ = modify_case(time_limit=300.0)
    desc_root, _ = modify_case(time_limit=25.0)
    desc_ac, _ = modify_case(admin_comment="ops note")
    cases = [
        submit("c22_hold", time_limit=20.0),
        {"kind": "modify", "desc": desc_hold, "rec": rec, "token_of": 1, "uid": 1001},
        {"kind": "modify", "desc": desc_lower, "rec": rec, "token_of": 1, "uid": 1001},
        {"kind": "modify", "desc": desc_raise, "rec": dict(rec, time_limit=15.0),
         "token_of": 1, "uid": 1001},
        {"kind": "modify", "desc": desc_root, "rec": dict(rec, time_limit=15.0),
         "token_of": 1, "uid": 0},
        {"kind": "modify", "desc": desc_ac, "rec": rec, "token_of": 1, "uid": 0},
    ]
    run = run_cases(cases, tmp_path, db_path)
    assert [c.rc for c in run.calls] == [0, 0, 0, 0, 0, 0]
    uuid = run.calls[0].uuid
    assert prealloc(db_path, uuid)[2] == 25  # 20 -> hold 20 -> 15 -> (300 > MaxTime) 15 -> 25
    assert run.calls[5].admin_comment == f"ops note slurm-quota:{uuid}"
    assert run.globals == ["slurm_job_modify", "slurm_job_submit"]


def test_locked_database_under_real_lua(tmp_path, db_path):
    holder = hold_write_lock(db_path, 5)
    try:
        start = time.monotonic()
        run = run_cases([submit("c01_plain")], tmp_path, db_path)
        elapsed = time.monotonic() - start
    finally:
        holder.kill()
        holder.wait()
    call = run.calls[0]
    assert call.rc == 0  # FAIL_OPEN is the shipped default
    assert call.admin_comment is None
    assert "database is locked" in call.log_text("error")
    assert "ACCEPTED WITHOUT QUOTA CHECK" in call.log_text("error")
    assert elapsed < 2.0  # sanity only (includes interpreter start-up)


def test_fail_closed_under_real_lua(tmp_path, db_path):
    plugin = tmp_path / "job_submit.lua"
    from tests.lua.harness import MODULE, PLUGIN

    text = MODULE.read_text()
    assert "local FAIL_OPEN = true" in text
    # the wiring finds the module next to itself
    (tmp_path / "slurm_quota.lua").write_text(
        text.replace("local FAIL_OPEN = true", "local FAIL_OPEN = false"))
    plugin.write_text(PLUGIN.read_text())
    execute(db_path, "PRAGMA user_version = 99")
    run = run_cases([submit("c01_plain")], tmp_path, db_path, plugin=plugin)
    call = run.calls[0]
    assert call.rc == -1
    assert "schema version 99" in call.log_text("error")
    assert "could not be checked" in call.log_text("user")


def test_missing_db_is_not_created_under_real_lua(tmp_path):
    missing = tmp_path / "absent.db"
    run = run_cases([submit("c01_plain")], tmp_path, missing)
    assert run.calls[0].rc == 0
    assert not missing.exists()


def test_no_time_no_partition_default_under_real_lua(tmp_path, db_path):
    set_user_quota(db_path, "alice", cpu=1000)
    parts = [dict(MAIN_PARTITION, default_time=NO_VAL, max_time=4294967295)]
    run = run_cases([{"kind": "submit", "desc": submit_case("c01_plain"), "parts": parts}],
                    tmp_path, db_path)
    assert run.calls[0].rc == 8000
    assert "add --time" in run.calls[0].log_text("user")


WRITER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], timeout=5, isolation_level=None)
conn.execute(sys.argv[2])
# TRUNCATE waits (up to the 5 s timeout) for every reader: busy=1 if a snapshot stays pinned
busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
with open(sys.argv[3], "a") as out:
    out.write(f"{busy}\\n")
"""


def test_cached_statements_see_other_writers_and_pin_no_snapshot(tmp_path, db_path):
    """Between two calls on the cached connection and its cached statements, another process
    changes a quota and truncates the WAL: the next call sees the change, and no statement
    left a read snapshot open (the checkpoint is not blocked). At the end, dropping the
    connection leaves no descriptor open on the ledger."""
    import sys

    writer = tmp_path / "writer.py"
    writer.write_text(WRITER)
    busy = tmp_path / "busy.txt"

    def shell(sql):
        return {"kind": "shell", "cmd": f"{sys.executable} {writer} {db_path} \"{sql}\" {busy}"}

    cases = [
        submit("c01_plain"),  # creates alice (unlimited)
        submit("c01_plain"),
        shell("UPDATE users SET quota_cpu_minutes = 10 WHERE username = 'alice'"),
        submit("c01_plain"),  # 30 > 10: refused
        shell("UPDATE users SET quota_cpu_minutes = -1 WHERE username = 'alice'"),
        submit("c01_plain"),
    ]
    run = run_cases(cases, tmp_path, db_path)
    assert [c.rc for c in run.calls] == [0, 0, 0, 2050, 0, 0], [c.logs for c in run.calls]
    assert busy.read_text().split() == ["0", "0"]
    assert rows(db_path, "SELECT reserved_cpu_minutes, reserved_jobs FROM users") == [(90, 3)]
    assert run.db_fds == 0


FAILED_STATEMENT = """
slurm = { SUCCESS = 0, ERROR = -1, log_info = print, log_error = print, log_user = print }
local slurm_quota = dofile(arg[1])
local DBI = require "DBI"
-- LuaDBI itself: after a failed execute(), the next execute() of that statement reports the
-- same error again (sqlite3_reset returns it), even with good values.
local conn = assert(DBI.Connect("SQLite3", arg[2]))
conn:autocommit(true)
local raw = assert(conn:prepare("INSERT INTO settings (key, value) VALUES (?, ?)"))
print("RAW", raw:execute("bad", "x"))
print("RAW", raw:execute("fine", "x"))
raw:close()
conn:close()
-- the plugin's session drops a statement that failed and prepares it again
local s = slurm_quota.open_db(arg[2])
print("SESSION", pcall(s.exec, s, "insert_user", "bad", -1, -1))
print("SESSION", pcall(s.exec, s, "insert_user", "good", -1, -1))
s:close()
"""


def test_a_failed_statement_is_prepared_again_under_real_luadbi(tmp_path, db_path):
    import os
    import subprocess

    from tests.lua.harness import MODULE

    execute(db_path, "CREATE TRIGGER bad_key BEFORE INSERT ON settings WHEN NEW.key = 'bad' "
                     "BEGIN SELECT RAISE(ABORT, 'bad key'); END")
    execute(db_path, "CREATE TRIGGER bad_user BEFORE INSERT ON users WHEN NEW.username = 'bad' "
                     "BEGIN SELECT RAISE(ABORT, 'bad user'); END")
    script = tmp_path / "failed.lua"
    script.write_text(FAILED_STATEMENT)
    proc = subprocess.run([realrun.current, str(script), str(MODULE), str(db_path)],
                          capture_output=True, text=True, env=dict(os.environ), timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("RAW\tfalse") and "bad key" in lines[0]
    assert lines[1].startswith("RAW\tfalse") and "bad key" in lines[1]  # the quirk
    assert lines[2].startswith("SESSION\tfalse") and "bad user" in lines[2]
    assert lines[3] == "SESSION\ttrue\ttrue"
    assert rows(db_path, "SELECT key FROM settings") == []
    assert rows(db_path, "SELECT username FROM users") == [("good",)]


def test_quota_above_32_bits_is_enforced_under_real_luadbi(tmp_path, db_path):
    # lua-dbi-sqlite3 <= 0.7.4 reads INTEGER columns as 32-bit: 3,000,000,000 came back
    # negative, which the plugin takes for "unlimited".
    big = 3_000_000_000
    set_user_quota(db_path, "alice", cpu=big, consumed_cpu=big - 10)
    run = run_cases([submit("c01_plain"), submit("c02_time10")], tmp_path, db_path)
    refused, fits = run.calls
    assert refused.rc == 2050, refused.logs  # 30 CPU-minutes > 10 left
    assert "available: 10 CPU-minutes = quota 3000000000 - consumed 2999999990" in (
        refused.log_text("user")
    )
    assert fits.rc == 0, fits.logs  # 10 CPU-minutes fit exactly
    assert rows(db_path, "SELECT reserved_cpu_minutes FROM users") == [(10,)]


def test_no_submission_pays_a_wal_checkpoint_under_real_luadbi(tmp_path, db_path):
    # A WAL past SQLite's automatic checkpoint size (1000 pages), written by another
    # connection that stays open (closing the last connection would checkpoint it):
    # the plugin's commit must leave the checkpoint to the Python side.
    import sqlite3

    other = sqlite3.connect(str(db_path), isolation_level=None)
    try:
        other.execute("PRAGMA wal_autocheckpoint = 0")
        other.execute("BEGIN")
        for i in range(1200):
            other.execute(
                "INSERT INTO journal (actor, action, target_kind, target, reason) "
                "VALUES ('test', 'fill', 'user', ?, ?)", (f"u{i}", "x" * 4000))
        other.execute("COMMIT")
        wal = db_path.with_name(db_path.name + "-wal")
        assert wal.stat().st_size > 1000 * 4096
        before = db_path.stat()
        run = run_cases([submit("c01_plain")], tmp_path, db_path)
        assert run.calls[0].rc == 0
        after = db_path.stat()
        assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
        # the Python side checkpoints as usual
        other.execute("PRAGMA wal_checkpoint(PASSIVE)")
        assert db_path.stat().st_size > before.st_size
    finally:
        other.close()

def test_a_job_without_user_name_is_reserved_for_its_uid_by_real_luaposix(tmp_path, db_path):
    # issue 19: the name comes from posix.pwd.getpwuid(user_id); uid 0 is root everywhere
    import subprocess

    run = run_cases([submit("c01_plain", user_name=None, user_id=0.0)], tmp_path, db_path)
    call = run.calls[0]
    assert call.rc == 0, call.logs
    has_posix = subprocess.run([realrun.current, "-e", 'require "posix.pwd"'],
                               capture_output=True).returncode == 0
    if has_posix:
        assert prealloc(db_path, call.uuid)[0] == "root"
        assert "user_id 0 is root" in call.log_text("info")
    else:
        # Debian 12 has no luaposix for Lua 5.4: no name can be had, the failure policy
        # applies (root's job is accepted), with the reason logged
        assert call.uuid is None
        assert "ACCEPTED WITHOUT QUOTA CHECK" in call.log_text("error"), call.logs


def test_a_fifo_at_the_ledger_path_is_not_opened_by_real_lua51(tmp_path):
    # issue 19: the open of a FIFO blocked slurmctld forever; run_cases times out at 60 s
    fifo = tmp_path / "ledger.db"
    os.mkfifo(fifo)
    run = run_cases([submit("c01_plain")], tmp_path, fifo, timeout=60)
    call = run.calls[0]
    assert call.rc == 0  # fail-open, with the reason logged
    assert "is not a regular file" in call.log_text("error")
