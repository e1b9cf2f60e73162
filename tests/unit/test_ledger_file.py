"""Issue 19: a damaged, read-only or non-regular ledger file gets one clear message each.

Damaged: garbage in a page of `users`, met by whatever statement reads it (not only at
open). Read-only: SQLite's "attempt to write a readonly database" during a charge. Not a
regular file: a FIFO at the ledger path, which used to block `stats --local` forever.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest

from slurm_quota import charge as C
from slurm_quota import db
from slurm_quota.errors import DatabaseDamaged, NotPermitted
from tests.unit.cli_helpers import (
    NOBODY_GID,
    NOBODY_UID,
    SLURM_QUOTA_BIN,
    remove_dir,
    run_cli,
    shared_dir,
    snapshot,
)

PAGE = 4096


def _fill(db_path: Path) -> None:
    conn = db.connect(db_path)
    conn.execute("BEGIN")
    for i in range(400):
        conn.execute(
            "INSERT INTO users (username, quota_cpu_minutes) VALUES (?, 100)",
            (f"user{i:04d}-{'x' * 40}",),
        )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def _corrupt_root_of(db_path: Path, table: str) -> None:
    raw = sqlite3.connect(str(db_path))
    root = raw.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    raw.close()
    data = bytearray(db_path.read_bytes())
    offset = (root - 1) * PAGE
    data[offset : offset + PAGE] = b"\x0d" + b"\xff" * (PAGE - 1)
    db_path.write_bytes(bytes(data))


@pytest.fixture
def damaged(db_path: Path) -> Path:
    """A ledger whose header is sound and whose `users` table has a garbage root page."""
    _fill(db_path)
    _corrupt_root_of(db_path, "users")
    return db_path


def test_stats_local_on_a_damaged_page_says_so_with_exit_1(damaged, capsys):
    result = run_cli(capsys, damaged, "stats", "--local", "--all")
    assert result.code == 1
    assert "is not a SQLite database or is damaged" in result.err
    assert "slurm-quota check" in result.err and ".recover" in result.err


def test_charge_on_a_damaged_page_says_so_with_exit_1(damaged, monkeypatch, capsys):
    before = damaged.read_bytes()
    env = {"JOBID": "7", "START": "100", "END": "100", "PROCS": "1", "USERNAME": "alice",
           "ACCOUNT": "research", "JOBSTATE": "CANCELLED"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(C, "lookup_allocation", lambda run, **kw: C.Allocation(None))
    result = run_cli(capsys, damaged, "charge")
    assert result.code == 1
    assert "is not a SQLite database or is damaged" in result.err
    assert damaged.read_bytes() == before


@pytest.mark.parametrize(
    "args",
    [
        ("user-quota", "alice", "5"),
        ("set-gpu-factor", "h100", "2"),
        ("set-setting", "default_time_minutes", "60"),
        ("set-default-quotas", "--user-cpu", "5"),
        ("adjust", "--account", "physics", "--cpu", "--minutes=+5"),
    ],
)
def test_admin_writes_into_a_ledger_failing_the_integrity_check_are_refused(
    db_path, capsys, args
):
    _fill(db_path)
    conn = db.connect(db_path)
    conn.execute("INSERT INTO accounts (account) VALUES ('physics')")
    conn.close()
    # Damage that the admin write itself would never read: only quick_check finds it.
    _corrupt_root_of(db_path, "users")
    before = db_path.read_bytes()
    result = run_cli(capsys, db_path, *args)
    assert result.code == 1, result
    assert "fails SQLite's integrity check" in result.err
    assert db_path.read_bytes() == before


def test_a_write_on_a_read_only_ledger_is_not_permitted_with_what_to_do(db_path):
    conn = db.connect(db_path, readonly=True)
    run = C.Run(job_id=7, start_time=100, end_time=160, cpus=1, username="alice",
                account="research", job_state="COMPLETED")
    with pytest.raises(NotPermitted, match="is read-only for uid .*nothing was written"):
        C.apply_charge(conn, run, C.Allocation(None), "test")
    assert not conn.in_transaction
    conn.close()


def test_charge_by_the_owner_of_a_read_only_ledger_exits_1_with_a_message():
    work = shared_dir()
    try:
        ledger = work / "ledger.db"
        db.migrate(ledger)
        os.chown(ledger, NOBODY_UID, NOBODY_GID)
        os.chmod(ledger, 0o444)
        before = snapshot(ledger)
        bin_dir = work / "bin"
        bin_dir.mkdir()
        for tool in ("scontrol", "sacct"):  # answer, know nothing: a never-started job
            (bin_dir / tool).write_text("#!/bin/sh\nexit 0\n")
            (bin_dir / tool).chmod(0o755)
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": "/", "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "SLURM_QUOTA_DB": str(ledger), "JOBID": "7",
               "START": "100", "END": "100", "PROCS": "1", "USERNAME": "alice",
               "ACCOUNT": "research", "JOBSTATE": "CANCELLED"}
        proc = subprocess.run(
            ["setpriv", f"--reuid={NOBODY_UID}", f"--regid={NOBODY_GID}", "--clear-groups",
             str(SLURM_QUOTA_BIN), "charge"],
            capture_output=True, text=True, env=env, cwd="/", timeout=60,
        )
        assert proc.returncode == 1, proc
        assert "is read-only for uid 65534" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert snapshot(ledger) == before
    finally:
        remove_dir(work)


def _fifo(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.db"
    os.mkfifo(path)
    return path


def _run_with_deadline(fn):
    """Run fn in a thread; a hang leaves the test to fail (and never blocks the suite)."""
    box: dict[str, object] = {}
    thread = threading.Thread(target=lambda: box.update(result=fn()), daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "blocked on the FIFO"
    return box["result"]


@pytest.mark.parametrize("readonly", [True, False])
def test_connect_refuses_a_fifo_without_opening_it(tmp_path, readonly):
    path = _fifo(tmp_path)

    def attempt():
        try:
            db.connect(path, readonly=readonly)
        except DatabaseDamaged as err:
            return str(err)
        return "opened"

    message = _run_with_deadline(attempt)
    assert "is a FIFO, not a regular file" in message


def test_stats_local_on_a_fifo_exits_1(tmp_path, capsys):
    path = _fifo(tmp_path)
    result = _run_with_deadline(lambda: run_cli(capsys, path, "stats", "--local", "--all"))
    assert result.code == 1
    assert "is a FIFO, not a regular file" in result.err


def test_a_fifo_at_the_wal_path_is_refused_too(db_path):
    wal = Path(str(db_path) + "-wal")
    if wal.exists():
        wal.unlink()
    os.mkfifo(wal)
    with pytest.raises(DatabaseDamaged, match="-wal is a FIFO"):
        db.connect(db_path)
