"""`slurm-quota check [--repair]`: integrity, schema objects, reserved totals, unowned rows.

Real ledger files throughout. Drift is made the ways it happens on a site: a hand edit of a
total, a trigger dropped and writes going on without it, a writer with foreign keys off.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading

import pytest

from slurm_quota import check, db
from slurm_quota.errors import DatabaseUnavailable
from tests.unit.cli_helpers import (
    journal,
    remove_dir,
    run_as_nobody,
    run_cli,
    shared_dir,
    snapshot,
)
from tests.unit.test_reserved_totals import reserved_mismatches


def prealloc(conn, uuid: str, user: str, account: str, cpu: int, gpu: int = 0, size=1):
    conn.execute(
        "INSERT INTO jobs_preallocations (job_uuid, username, account, "
        "preallocated_cpu_minutes, preallocated_gpu_minutes, array_size) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (uuid, user, account, cpu, gpu, size),
    )


def hand_edit(path, *statements: str) -> None:
    """Run SQL as a person at the sqlite3 prompt would: foreign keys off, no slurm-quota."""
    conn = sqlite3.connect(path)
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.close()


def mismatches(path) -> list[str]:
    """Owners whose stored totals differ from test_reserved_totals' own sums."""
    conn = sqlite3.connect(path)
    try:
        return reserved_mismatches(conn)
    finally:
        conn.close()


@pytest.fixture
def ledger(db_path):
    """alice (2 open jobs, one an array of 4) and bob in account physics; carol idle."""
    conn = db.connect(db_path)
    for user in ("alice", "bob", "carol"):
        conn.execute("INSERT INTO users (username) VALUES (?)", (user,))
    conn.execute("INSERT INTO accounts (account) VALUES ('physics')")
    prealloc(conn, "u-1", "alice", "physics", 60, 30)
    prealloc(conn, "u-2", "alice", "physics", 10, 0, size=4)
    prealloc(conn, "u-3", "bob", "physics", 5, 1, size=None)  # a seed row: NULL = 1 element
    conn.close()
    return db_path


def test_a_consistent_ledger_passes_and_nothing_is_written(ledger, capsys):
    before = snapshot(ledger)
    result = run_cli(capsys, ledger, "check")
    assert result.code == 0, result.err
    assert result.out.splitlines() == [
        "Integrity: ok.",
        "Schema: every trigger and index present.",
        "Reserved totals: 0 owner(s) drifted.",
        "Consumed totals: 0 owner(s) drifted.",
        "Preallocations without an owner row: 0 owner(s).",
        "Ledger consistent.",
    ]
    assert result.err == ""
    assert snapshot(ledger) == before


def test_a_hand_edited_total_is_found_with_both_numbers_and_exit_1(ledger, capsys):
    hand_edit(
        ledger,
        "UPDATE users SET reserved_cpu_minutes = 999 WHERE username = 'alice'",
        "UPDATE accounts SET reserved_jobs = 0",
    )
    before = snapshot(ledger)
    result = run_cli(capsys, ledger, "check")
    assert result.code == 1
    assert "Reserved totals: 2 owner(s) drifted." in result.out
    # alice: 60 + 10 x 4 = 100 CPU min, 30 GPU min, 1 + 4 = 5 jobs.
    assert (
        "  user alice: stored 999 CPU min, 30 GPU min, 5 jobs; "
        "preallocations 100 CPU min, 30 GPU min, 5 jobs"
    ) in result.out
    # physics: 100 + 5 CPU, 30 + 1 GPU, 5 + 1 jobs.
    assert (
        "  account physics: stored 105 CPU min, 31 GPU min, 0 jobs; "
        "preallocations 105 CPU min, 31 GPU min, 6 jobs"
    ) in result.out
    assert "run `slurm-quota check --repair`" in result.err
    assert "Traceback" not in result.err
    assert snapshot(ledger) == before


def test_repair_writes_the_sums_back_journals_each_owner_and_a_second_check_passes(
    ledger, capsys
):
    hand_edit(
        ledger,
        "UPDATE users SET reserved_gpu_minutes = 7 WHERE username = 'bob'",
        "UPDATE users SET reserved_jobs = 3 WHERE username = 'carol'",
    )
    assert mismatches(ledger)
    result = run_cli(capsys, ledger, "check", "--repair")
    assert result.code == 0, result.err
    assert "Reserved totals: 2 owner(s) repaired." in result.out
    assert result.out.rstrip().endswith("Ledger consistent now.")
    assert mismatches(ledger) == []
    entries = [e for e in journal(ledger) if e["action"] == "repair-reserved"]
    assert [(e["target_kind"], e["target"], e["old_value"], e["new_value"]) for e in entries] == [
        ("user", "bob", "cpu_minutes=5,gpu_minutes=7,jobs=1", "cpu_minutes=5,gpu_minutes=1,jobs=1"),
        ("user", "carol", "cpu_minutes=0,gpu_minutes=0,jobs=3",
         "cpu_minutes=0,gpu_minutes=0,jobs=0"),
    ]  # fmt: skip
    assert all(e["reason"] == check.REPAIR_REASON and e["actor"] for e in entries)
    again = run_cli(capsys, ledger, "check")
    assert again.code == 0 and "Ledger consistent." in again.out
    history = run_cli(capsys, ledger, "history", "--user", "bob")
    assert "repair-reserved" in history.out and "gpu_minutes=7" in history.out


def test_repair_of_a_consistent_ledger_changes_nothing(ledger, capsys):
    before = snapshot(ledger)
    result = run_cli(capsys, ledger, "check", "--repair")
    assert result.code == 0, result.err
    assert "Reserved totals: 0 owner(s) drifted." in result.out
    assert snapshot(ledger) == before


def test_a_dropped_trigger_is_reported_and_the_drift_it_let_through_is_repaired(
    ledger, capsys
):
    hand_edit(
        ledger,
        "DROP TRIGGER jobs_preallocations_reserved_insert",
        # counted nowhere without the trigger
        "INSERT INTO jobs_preallocations (job_uuid, username, account, "
        "preallocated_cpu_minutes) VALUES ('u-4', 'carol', 'physics', 40)",
    )
    result = run_cli(capsys, ledger, "check", "--repair")
    assert result.code == 1
    assert "Schema: 1 object(s) missing:\n  trigger jobs_preallocations_reserved_insert" in (
        result.out
    )
    assert "Reserved totals: 2 owner(s) repaired." in result.out  # carol and physics
    assert "the reserved totals will drift again" in result.err
    assert mismatches(ledger) == []
    as_json = json.loads(run_cli(capsys, ledger, "check", "--json").out)
    assert as_json["missing_schema_objects"] == [
        {"type": "trigger", "name": "jobs_preallocations_reserved_insert"}
    ]


def test_an_index_dropped_by_a_later_migration_is_not_expected(ledger):
    # 0002 creates jobs_preallocations_username, 0004 drops it again.
    expected = db.expected_schema_objects()
    assert ("index", "jobs_preallocations_username") not in expected
    assert ("index", "jobs_preallocations_username_account") in expected
    assert ("trigger", "users_reserved_init") in expected
    conn = db.connect(ledger, readonly=True)
    assert set(expected) <= db.schema_objects(conn)
    conn.close()


def test_preallocations_without_an_owner_row_are_reported(ledger, capsys):
    hand_edit(  # foreign keys off, as an old tool would write
        ledger,
        "INSERT INTO jobs_preallocations (job_uuid, username, account, "
        "preallocated_cpu_minutes) VALUES ('u-5', 'dave', 'chemistry', 15)",
    )
    before = snapshot(ledger)
    result = run_cli(capsys, ledger, "check")
    assert result.code == 1
    assert "  user dave: 1 preallocation(s), counted in no total" in result.out
    assert "  account chemistry: 1 preallocation(s), counted in no total" in result.out
    assert "setting its quota creates the row and counts them" in result.err
    assert snapshot(ledger) == before
    # What the message advises: the new row starts from its real totals (0003's init trigger).
    assert run_cli(capsys, ledger, "user-quota", "dave", "100").code == 0
    after = json.loads(run_cli(capsys, ledger, "check", "--json").out)
    assert after["unowned_preallocations"] == [
        {"kind": "account", "name": "chemistry", "preallocations": 1}
    ]
    assert after["reserved_drift"] == []


def test_json_report_of_a_drift(ledger, capsys):
    hand_edit(ledger, "UPDATE accounts SET reserved_cpu_minutes = 1")
    result = run_cli(capsys, ledger, "check", "--json")
    assert result.code == 1
    assert json.loads(result.out) == {
        "ok": False,
        "integrity": ["ok"],
        "missing_schema_objects": [],
        "reserved_drift": [
            {
                "kind": "account",
                "name": "physics",
                "stored": {"cpu_minutes": 1, "gpu_minutes": 31, "jobs": 6},
                "actual": {"cpu_minutes": 105, "gpu_minutes": 31, "jobs": 6},
            }
        ],
        "repaired": False,
        "unowned_preallocations": [],
        "consumed_drift": [],
    }


def _corrupt_page(path, page: int) -> None:
    """Overwrite one b-tree page of the file with garbage (the header page stays sound)."""
    data = bytearray(path.read_bytes())
    offset = (page - 1) * 4096
    data[offset : offset + 4096] = b"\x0d" + b"\xff" * 4095
    path.write_bytes(bytes(data))


@pytest.fixture
def damaged(db_path):
    """A ledger whose preallocations span many pages, one of them overwritten."""
    conn = db.connect(db_path)
    conn.execute("INSERT INTO users (username) VALUES ('alice')")
    conn.execute("INSERT INTO accounts (account) VALUES ('physics')")
    for i in range(3000):
        prealloc(conn, f"uuid-{i:06d}-{'x' * 24}", "alice", "physics", i)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("UPDATE users SET reserved_cpu_minutes = 1")  # drift a repair would fix
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert conn.execute("PRAGMA page_size").fetchone()[0] == 4096
    conn.close()
    _corrupt_page(db_path, 100)
    return db_path


def test_a_damaged_file_fails_the_integrity_check_and_is_not_repaired(damaged, capsys):
    before = damaged.read_bytes()
    result = run_cli(capsys, damaged, "check", "--repair")
    assert result.code == 1
    assert "Integrity: FAILED" in result.out
    assert re.search(r"\n  (.*Page 100|\*\*\* in database main|database disk image is malformed)",
                     result.out)
    assert "not checked in a damaged file" in result.out
    assert "so nothing was repaired" in result.err
    assert "Traceback" not in result.err
    assert damaged.read_bytes() == before
    as_json = run_cli(capsys, damaged, "check", "--json")
    assert as_json.code == 1
    report = json.loads(as_json.out)
    assert report["ok"] is False and report["integrity"] != ["ok"]
    assert report["reserved_drift"] is None and report["repaired"] is False


def test_repair_is_root_only_and_the_check_is_not(ledger, capsys, monkeypatch):
    hand_edit(ledger, "UPDATE users SET reserved_cpu_minutes = 1")
    before = snapshot(ledger)
    monkeypatch.setattr(os, "getuid", lambda: 65534)
    result = run_cli(capsys, ledger, "check", "--repair")
    assert result.code == 1
    assert "restricted to root" in result.err
    assert snapshot(ledger) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as another uid")
def test_a_user_who_can_read_the_file_can_check_it(capsys):
    where = shared_dir()
    try:
        path = where / "ledger.db"
        db.migrate(path)
        conn = db.connect(path)
        conn.execute("INSERT INTO users (username) VALUES ('alice')")
        conn.execute("UPDATE users SET reserved_jobs = 2")
        conn.execute("PRAGMA journal_mode = DELETE")  # no -shm a reader would have to create
        conn.close()
        os.chmod(path, 0o644)
        before = path.read_bytes()
        proc = run_as_nobody(path, "check")
        assert proc.returncode == 1, proc.stderr
        assert "  user alice: stored 0 CPU min, 0 GPU min, 2 jobs" in proc.stdout
        refused = run_as_nobody(path, "check", "--repair")
        assert refused.returncode == 1
        assert "restricted to root" in refused.stderr
        assert path.read_bytes() == before
    finally:
        remove_dir(where)


def test_repair_waits_for_a_writer_and_gives_up_with_exit_75(ledger, capsys):
    hand_edit(ledger, "UPDATE users SET reserved_cpu_minutes = 1")
    holder = sqlite3.connect(ledger, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    try:
        before = snapshot(ledger)
        result = run_cli(capsys, ledger, "check", "--repair")  # waits db.BUSY_TIMEOUT_MS
        assert result.code == 75, result.err
        assert "locked" in result.err
        assert snapshot(ledger) == before
        # A plain check reads past the writer (WAL) and still sees the drift.
        assert run_cli(capsys, ledger, "check").code == 1
        # A writer that finishes within the wait: the repair goes through after it.
        threading.Timer(0.5, holder.execute, ("ROLLBACK",)).start()
        assert run_cli(capsys, ledger, "check", "--repair").code == 0
    finally:
        if holder.in_transaction:
            holder.execute("ROLLBACK")
        holder.close()
    assert run_cli(capsys, ledger, "check").code == 0


def test_the_repair_sees_writes_made_between_the_scan_and_the_write_lock(ledger, monkeypatch):
    """The scan runs without a lock; under it each drifted owner is read again."""
    hand_edit(
        ledger,
        "UPDATE users SET reserved_cpu_minutes = 1 WHERE username = 'alice'",
        "UPDATE users SET reserved_jobs = 9 WHERE username = 'carol'",
    )
    real = db.write_transaction

    def after_a_submission_and_a_prune(conn):
        other = db.connect(ledger)
        prealloc(other, "u-6", "alice", "physics", 20)  # the trigger adds 20 to the wrong total
        other.execute("DELETE FROM users WHERE username = 'carol'")
        other.close()
        return real(conn)

    monkeypatch.setattr(db, "write_transaction", after_a_submission_and_a_prune)
    fixer = db.connect(ledger)
    report = check.check(fixer, repair=True)
    fixer.close()
    assert report.repaired and report.ok
    [drift] = report.drift  # carol is gone: nothing to repair, nothing journaled for her
    assert (drift.name, drift.stored, drift.actual) == ("alice", (21, 30, 6), (120, 30, 6))
    assert mismatches(ledger) == []
    assert [e["target"] for e in journal(ledger) if e["action"] == "repair-reserved"] == ["alice"]


def test_a_large_repair_is_written_in_batches_and_a_lock_timeout_keeps_the_done_ones(
    ledger, capsys, monkeypatch
):
    hand_edit(ledger, "UPDATE users SET reserved_jobs = reserved_jobs + 1")  # all 3 users
    monkeypatch.setattr(check, "REPAIR_BATCH", 2)
    real = db.write_transaction
    batches: list[int] = []

    def second_batch_times_out(conn):
        batches.append(1)
        if len(batches) == 2:
            raise DatabaseUnavailable("The database is locked by another writer: test.")
        return real(conn)

    monkeypatch.setattr(db, "write_transaction", second_batch_times_out)
    result = run_cli(capsys, ledger, "check", "--repair")
    assert result.code == 75 and "locked" in result.err
    assert len(batches) == 2
    repaired = [e["target"] for e in journal(ledger) if e["action"] == "repair-reserved"]
    assert repaired == ["alice", "bob"]  # the first batch, committed with its journal
    monkeypatch.setattr(db, "write_transaction", real)
    again = run_cli(capsys, ledger, "check", "--repair")
    assert again.code == 0, again.err
    assert "Reserved totals: 1 owner(s) repaired.\n  user carol:" in again.out


def test_a_total_edited_into_text_or_a_fraction_is_shown_as_stored_and_repaired(ledger, capsys):
    hand_edit(
        ledger,
        "UPDATE users SET reserved_cpu_minutes = 'lots' WHERE username = 'alice'",
        "UPDATE users SET reserved_gpu_minutes = 1.5 WHERE username = 'bob'",
    )
    result = run_cli(capsys, ledger, "check")
    assert result.code == 1, result.err
    assert "  user alice: stored lots CPU min, 30 GPU min, 5 jobs;" in result.out
    assert "  user bob: stored 5 CPU min, 1.5 GPU min, 1 jobs;" in result.out
    assert "Traceback" not in result.err
    repaired = run_cli(capsys, ledger, "check", "--repair")
    assert repaired.code == 0, repaired.err
    conn = sqlite3.connect(ledger)
    assert reserved_mismatches(conn) == []
    assert conn.execute(
        "SELECT typeof(reserved_cpu_minutes) FROM users WHERE username = 'alice'"
    ).fetchone() == ("integer",)
    conn.close()
