"""Migrations: empty -> latest, step by step, a seed-system database in place, idempotence,
refusal of a newer schema, file modes and a locked database."""

from __future__ import annotations

import os
import pwd
import sqlite3
import stat
from pathlib import Path

import pytest

from slurm_quota import db
from tests.unit.cli_helpers import run_cli, snapshot
from tests.unit.fixtures_seed import (
    PRIMARY_KEYS,
    SEED_DDL,
    SEED_ROWS,
    make_seed_db,
    read_rows,
)

LATEST = db.latest_version()
APPLIED_ALL = "Applied migrations " + ", ".join(str(v) for v in range(1, LATEST + 1))
NEW_TABLES = {
    "charges", "journal", "consumption_adjustments",
    "period_rules", "period_state", "period_archive", "threshold_events",
}  # fmt: skip
SEED_TABLES = set(PRIMARY_KEYS)
NEW_INDEXES = {
    "charges_username",
    "charges_account",
    "charges_job_id",
    "charges_end_time",
    "journal_target",
    "jobs_preallocations_username_account",
    "charges_username_account",
    "jobs_preallocations_account",
    "jobs_preallocations_created_at",
    "charges_username_end",
    "charges_account_end",
    "period_archive_start",
    "threshold_events_pending",
}


def _schema(path: Path) -> dict[str, set[str]]:
    conn = sqlite3.connect(str(path))
    try:
        rows = conn.execute(
            "SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
        ).fetchall()
    finally:
        conn.close()
    out: dict[str, set[str]] = {"table": set(), "index": set()}
    for kind, name in rows:
        out.setdefault(kind, set()).add(name)
    return out


def _pragma(path: Path, name: str):
    conn = sqlite3.connect(str(path))
    try:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        conn.close()


def _sql_of(path: Path, table: str) -> str:
    conn = sqlite3.connect(str(path))
    try:
        return conn.execute(
            "SELECT sql FROM sqlite_master WHERE type='table' AND name=?", (table,)
        ).fetchone()[0]
    finally:
        conn.close()


def test_latest_version_is_the_highest_migration_file():
    files = db.migration_files()
    highest = max(int(p.name[:4]) for p in db.migrations_dir().glob("[0-9][0-9][0-9][0-9]_*.sql"))
    assert [v for v, _ in files] == list(range(1, highest + 1))
    assert db.latest_version() == highest


def test_migrate_creates_an_empty_database_at_latest(tmp_path):
    path = tmp_path / "new" / "ledger.db"
    assert db.migrate(path) == list(range(1, LATEST + 1))
    assert _pragma(path, "user_version") == LATEST
    assert _pragma(path, "journal_mode") == "wal"
    schema = _schema(path)
    assert schema["table"] == SEED_TABLES | NEW_TABLES
    assert NEW_INDEXES <= schema["index"]


def test_each_step_applies_separately(tmp_path):
    path = tmp_path / "ledger.db"
    first = db.migration_files()[0][1]
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.executescript(first.read_text())
    conn.close()
    assert _pragma(path, "user_version") == 1
    assert _schema(path)["table"] == SEED_TABLES
    assert not (NEW_INDEXES & _schema(path)["index"])

    assert db.migrate(path) == list(range(2, LATEST + 1))
    assert _pragma(path, "user_version") == LATEST
    assert _schema(path)["table"] == SEED_TABLES | NEW_TABLES
    assert NEW_INDEXES <= _schema(path)["index"]


def test_migrate_command_upgrades_a_seed_database_keeping_every_row(tmp_path, capsys):
    path = make_seed_db(tmp_path / "seed.db")
    seed_sql = {t: _sql_of(path, t) for t in SEED_TABLES}

    result = run_cli(capsys, path, "migrate")

    assert result.code == 0, result.err
    assert result.out == f"{APPLIED_ALL}; schema version {LATEST}.\n"
    assert _pragma(path, "user_version") == LATEST
    assert _pragma(path, "journal_mode") == "wal"
    for table, rows in SEED_ROWS.items():
        # (0003 appends the reserved_* totals to users and accounts)
        kept = [r[: len(rows[0])] for r in read_rows(path, table)]
        assert kept == sorted(rows, key=lambda r: r[0]), table
    # The seed's own table definitions are adopted untouched (0003 only appends columns).
    for t in SEED_TABLES:
        assert _sql_of(path, t).startswith(seed_sql[t].rstrip().rstrip(")").rstrip()), t
    schema = _schema(path)
    assert schema["table"] == SEED_TABLES | NEW_TABLES
    assert NEW_INDEXES <= schema["index"]


def test_a_migrated_seed_database_is_usable_by_the_admin_commands(tmp_path, capsys):
    path = make_seed_db(tmp_path / "seed.db")
    assert run_cli(capsys, path, "migrate").code == 0

    result = run_cli(capsys, path, "user-quota", "dave", "700")

    assert result.code == 0, result.err
    conn = sqlite3.connect(str(path))
    # dave is new: his GPU quota is the seed's default_user_quota_gpu_minutes (-1).
    assert conn.execute(
        "SELECT quota_cpu_minutes, quota_gpu_minutes FROM users WHERE username='dave'"
    ).fetchone() == (700, -1)
    conn.close()
    assert run_cli(capsys, path, "default-quotas", "--json").out.count("1000") == 1


def test_migrate_twice_applies_nothing_the_second_time(tmp_path, capsys):
    path = make_seed_db(tmp_path / "seed.db")
    assert run_cli(capsys, path, "migrate").code == 0
    before = snapshot(path)
    schema_before = _schema(path)

    result = run_cli(capsys, path, "migrate")

    assert result.code == 0
    assert result.out == f"Schema already at version {LATEST}; nothing to do.\n"
    assert db.migrate(path) == []
    assert snapshot(path) == before
    assert _schema(path) == schema_before


def test_migrate_refuses_a_newer_schema(tmp_path, capsys):
    path = tmp_path / "ledger.db"
    db.migrate(path)
    conn = sqlite3.connect(str(path))
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    before = snapshot(path)

    result = run_cli(capsys, path, "migrate")

    assert result.code == 1
    assert f"schema version 99, newer than this slurm-quota understands ({LATEST})" in result.err
    assert snapshot(path) == before


def test_commands_refuse_a_newer_schema(tmp_path, capsys):
    path = tmp_path / "ledger.db"
    db.migrate(path)
    conn = sqlite3.connect(str(path))
    conn.execute(f"PRAGMA user_version = {LATEST + 1}")
    conn.close()
    before = snapshot(path)

    result = run_cli(capsys, path, "user-quota", "alice", "10")

    assert result.code == 1
    assert "newer than this slurm-quota understands" in result.err
    assert snapshot(path) == before


def test_commands_on_an_unmigrated_seed_database_ask_for_migrate(tmp_path, capsys):
    path = make_seed_db(tmp_path / "seed.db")
    before = snapshot(path)

    result = run_cli(capsys, path, "user-quota", "alice", "10")

    assert result.code == 1
    assert "Run `slurm-quota migrate`" in result.err
    assert snapshot(path) == before


def test_commands_on_a_missing_database_say_run_migrate(tmp_path, capsys):
    path = tmp_path / "absent.db"

    result = run_cli(capsys, path, "gpu-factors")

    assert result.code == 1
    assert f"The database {path} does not exist" in result.err
    assert "slurm-quota migrate" in result.err
    assert not path.exists()


def test_database_wal_and_shm_are_mode_0644(tmp_path):
    path = tmp_path / "ledger.db"
    old_umask = os.umask(0o077)  # without the chmod the files would be 0600
    try:
        db.migrate(path)
        # SQLite gives -wal/-shm the mode of the main file: start them all at 0600.
        os.chmod(path, 0o600)
        # A reader keeps -wal/-shm in place (the last connection to close removes them).
        reader = sqlite3.connect(str(path))
        reader.execute("SELECT count(*) FROM users").fetchone()
        try:
            writer = sqlite3.connect(str(path))
            writer.execute("INSERT INTO settings (key, value) VALUES ('x', '1')")
            writer.commit()
            writer.close()
            for suffix in ("", "-wal", "-shm"):
                assert stat.S_IMODE(os.stat(f"{path}{suffix}").st_mode) == 0o600
            assert db.migrate(path) == []  # nothing to apply, modes still fixed
            modes = {
                suffix: stat.S_IMODE(os.stat(f"{path}{suffix}").st_mode)
                for suffix in ("", "-wal", "-shm")
            }
        finally:
            reader.close()
    finally:
        os.umask(old_umask)
    assert modes == {"": 0o644, "-wal": 0o644, "-shm": 0o644}


def test_migrate_as_root_gives_the_files_to_slurm(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    try:
        slurm = pwd.getpwnam("slurm")
    except KeyError:
        pytest.skip("no slurm user on this machine")
    path = tmp_path / "ledger.db"
    db.migrate(path)
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (slurm.pw_uid, slurm.pw_gid)


def test_migrate_on_a_locked_database_exits_75_and_changes_nothing(tmp_path, capsys):
    path = make_seed_db(tmp_path / "seed.db")
    before = snapshot(path)
    holder = sqlite3.connect(str(path), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        result = run_cli(capsys, path, "migrate")
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    assert result.code == 75
    assert "locked" in result.err
    assert "was not applied" in result.err
    assert snapshot(path) == before
    assert _pragma(path, "user_version") == 0
    assert "charges" not in _schema(path)["table"]


def test_admin_write_on_a_locked_database_exits_75_and_changes_nothing(db_path, capsys):
    assert run_cli(capsys, db_path, "user-quota", "alice", "10").code == 0
    before = snapshot(db_path)
    holder = sqlite3.connect(str(db_path), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        result = run_cli(capsys, db_path, "user-quota", "alice", "20")
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    assert result.code == 75
    assert "locked" in result.err
    assert result.out == ""
    assert snapshot(db_path) == before


def test_migrate_on_a_locked_rollback_journal_database_exits_75(tmp_path, capsys):
    # Switching a non-WAL file to WAL needs an exclusive lock; it used to escape as a
    # raw sqlite3 traceback.
    path = tmp_path / "old.db"
    conn = sqlite3.connect(str(path))
    conn.executescript(SEED_DDL)  # the seed's tables, but in rollback-journal mode
    conn.close()
    holder = sqlite3.connect(str(path), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        result = run_cli(capsys, path, "migrate")
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    assert result.code == 75
    assert "is locked; no migration was applied" in result.err
    assert "Traceback" not in result.err
    assert _pragma(path, "user_version") == 0
    assert _pragma(path, "journal_mode") == "delete"


def test_migrate_refuses_a_seed_database_older_than_array_size(tmp_path, capsys):
    path = tmp_path / "older-seed.db"
    conn = sqlite3.connect(str(path))
    conn.executescript(
        """
        CREATE TABLE users (username TEXT PRIMARY KEY, total_consumed_cpu_minutes INTEGER
            DEFAULT 0, quota_cpu_minutes INTEGER DEFAULT -1, total_consumed_gpu_minutes
            INTEGER DEFAULT 0, quota_gpu_minutes INTEGER DEFAULT -1,
            last_updated TIMESTAMP DEFAULT CURRENT_TIMESTAMP);
        CREATE TABLE jobs_preallocations (job_uuid TEXT PRIMARY KEY, username TEXT NOT NULL,
            account TEXT NOT NULL, preallocated_cpu_minutes INTEGER NOT NULL,
            preallocated_gpu_minutes INTEGER DEFAULT 0,
            created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP);
        INSERT INTO users (username) VALUES ('alice');
        """
    )
    conn.close()
    before = snapshot(path)

    result = run_cli(capsys, path, "migrate")

    assert result.code == 1
    assert "lacks jobs_preallocations.array_size" in result.err
    assert "Nothing was changed" in result.err
    assert snapshot(path) == before
    assert "charges" not in _schema(path)["table"]


def test_a_users_accounts_are_read_from_the_0004_indexes_alone(db_path):
    # /stats?username= finds the user's accounts from open jobs and charges: with 0004 both
    # lookups are covering-index range scans, not one table row per job.
    conn = sqlite3.connect(str(db_path))
    plan = " | ".join(
        row[3] for row in conn.execute(
            "EXPLAIN QUERY PLAN " + db.SQL_STATS_USER_VIEW, {"username": "alice"}
        )
    )
    conn.close()
    assert "jobs_preallocations USING COVERING INDEX jobs_preallocations_username_account" in plan
    assert "charges USING COVERING INDEX charges_username_account" in plan


def test_0004_replaces_the_old_username_index_of_preallocations(db_path):
    indexes = _schema(db_path)["index"]
    assert "jobs_preallocations_username" not in indexes
    assert "jobs_preallocations_username_account" in indexes
