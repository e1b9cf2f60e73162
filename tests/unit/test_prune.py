"""prune: orphan preallocations and unused users/accounts; never on a Slurm that did not answer.

squeue/sacct outputs are real lab captures (tests/fixtures/slurm-22.05/).
"""

from __future__ import annotations

import os

import pytest

from slurm_quota import reconcile as R
from slurm_quota import slurm as S
from slurm_quota.cli import main
from slurm_quota.errors import SlurmUnavailable
from slurm_quota.slurm import RunResult
from tests.unit.slurm_fixtures import FakeSlurm, load, result
from tests.unit.test_charge import add_prealloc, prealloc_size, token_of

NOW = 1795270000
OLD = "2026-11-21 10:00:00"
ORPHAN = "0badc0de-0000-4000-8000-00000000000a"
ORPHAN_BOB = "0badc0de-0000-4000-8000-00000000000b"


@pytest.fixture
def conn(any_conn):
    """The tests on `conn` run on both engines: SQLite and MariaDB (tests/conftest.py)."""
    return any_conn


def answering() -> FakeSlurm:
    return FakeSlurm(
        squeue=result(load("squeue_all")["squeue"]), sacct=result(load("sacct_window")["sacct"])
    )


def owner(conn, kind: str, name: str, *, cpu_quota=-1, gpu_quota=-1, cpu_used=0, gpu_used=0):
    table, key = ("users", "username") if kind == "user" else ("accounts", "account")
    conn.execute(
        f"INSERT INTO {table} ({key}, quota_cpu_minutes, quota_gpu_minutes, "
        f"total_consumed_cpu_minutes, total_consumed_gpu_minutes) VALUES (?, ?, ?, ?, ?)",
        (name, cpu_quota, gpu_quota, cpu_used, gpu_used),
    )


def names(conn, kind: str) -> list[str]:
    table, key = ("users", "username") if kind == "user" else ("accounts", "account")
    return [r[0] for r in conn.execute(f"SELECT {key} FROM {table} ORDER BY {key}")]


@pytest.fixture
def ledger(conn):
    owner(conn, "user", "quota_set", cpu_quota=100)
    owner(conn, "user", "gpu_quota_set", gpu_quota=0)
    owner(conn, "user", "consumed", cpu_used=5)
    owner(conn, "user", "idle")
    owner(conn, "user", "has_job")
    owner(conn, "account", "research")
    owner(conn, "account", "funded", gpu_quota=10)
    owner(conn, "account", "unused")
    add_prealloc(conn, token_of("plain"), user="has_job", account="research", created_at=OLD)
    add_prealloc(conn, ORPHAN, user="alice", account="research", created_at=OLD)
    add_prealloc(conn, ORPHAN_BOB, user="bob", account="physics", created_at=OLD)
    return conn


def test_prune_all_deletes_orphans_then_unused_users_and_accounts(ledger):
    conn = ledger
    rep = R.prune(conn, preallocs=True, users=True, accounts=True, now=NOW, runner=answering())
    assert sorted(rep.preallocations) == [ORPHAN, ORPHAN_BOB]
    # alice/bob were only held by their orphan preallocations; has_job is queued (squeue)
    assert rep.users == ("alice", "bob", "idle")
    assert rep.accounts == ("physics", "unused")
    assert names(conn, "user") == ["consumed", "gpu_quota_set", "has_job", "quota_set"]
    assert names(conn, "account") == ["funded", "research"]
    assert prealloc_size(conn, token_of("plain")) == 1


def test_prune_is_journaled_with_old_values(ledger):
    conn = ledger
    R.prune(conn, preallocs=True, users=True, accounts=True, now=NOW, runner=answering())
    rows = conn.execute(
        "SELECT actor, action, target_kind, target, old_value FROM journal ORDER BY id"
    ).fetchall()
    assert {r["action"] for r in rows} == {"prune"}
    kinds = [(r["target_kind"], r["target"]) for r in rows]
    assert ("preallocation", ORPHAN) in kinds and ("user", "idle") in kinds
    assert ("account", "unused") in kinds
    assert len(rows) == 2 + 3 + 2
    pre = next(r for r in rows if r["target"] == ORPHAN)
    assert '"username": "alice"' in pre["old_value"] and pre["actor"]


@pytest.mark.parametrize("broken", ["squeue", "sacct"])
def test_prune_deletes_nothing_when_slurm_does_not_answer(ledger, broken):
    conn = ledger
    fake = answering()
    fake.responses[broken] = [SlurmUnavailable(f"`{broken}` did not answer within 10 s.")]
    with pytest.raises(SlurmUnavailable):
        R.prune(conn, preallocs=True, users=True, accounts=True, now=NOW, runner=fake)
    assert prealloc_size(conn, ORPHAN) == 1
    assert "idle" in names(conn, "user") and "unused" in names(conn, "account")
    assert conn.execute("SELECT COUNT(*) FROM journal").fetchone()[0] == 0


def test_prune_users_only_needs_no_slurm_and_keeps_quota_usage_and_open_jobs(ledger):
    conn = ledger
    fake = FakeSlurm()
    rep = R.prune(conn, preallocs=False, users=True, accounts=False, now=NOW, runner=fake)
    assert fake.calls == []
    assert rep.users == ("idle",)
    assert rep.preallocations == () and rep.accounts == ()


def test_prune_user_narrows_to_that_user(ledger):
    conn = ledger
    rep = R.prune(conn, preallocs=True, users=True, accounts=True, user="bob", now=NOW,
                  runner=answering())  # fmt: skip
    assert rep.preallocations == (ORPHAN_BOB,)
    assert rep.users == ("bob",) and rep.accounts == ()
    assert prealloc_size(conn, ORPHAN) == 1


def test_prune_account_narrows_to_that_account(ledger):
    conn = ledger
    rep = R.prune(conn, preallocs=True, users=True, accounts=True, account="physics", now=NOW,
                  runner=answering())  # fmt: skip
    assert rep.preallocations == (ORPHAN_BOB,)
    assert rep.accounts == ("physics",) and rep.users == ()


def test_prune_keeps_young_preallocations(ledger):
    conn = ledger
    conn.execute("UPDATE jobs_preallocations SET created_at = '2026-11-21 14:05:00' "
                 "WHERE job_uuid = ?", (ORPHAN,))  # fmt: skip  (NOW − 100 s, UTC)
    rep = R.prune(conn, preallocs=True, users=False, accounts=False, now=NOW, grace_s=600,
                  runner=answering())  # fmt: skip
    assert rep.preallocations == (ORPHAN_BOB,)


def test_prune_dry_run_reports_and_changes_nothing(ledger):
    conn = ledger
    rep = R.prune(conn, preallocs=True, users=True, accounts=True, dry_run=True, now=NOW,
                  runner=answering())  # fmt: skip
    assert sorted(rep.preallocations) == [ORPHAN, ORPHAN_BOB]
    assert rep.users == ("alice", "bob", "idle")
    assert rep.accounts == ("physics", "unused")
    assert prealloc_size(conn, ORPHAN) == 1
    assert "idle" in names(conn, "user")
    assert conn.execute("SELECT COUNT(*) FROM journal").fetchone()[0] == 0


def test_prune_command_counts_and_exit_codes(db_path, monkeypatch, capsys):
    from slurm_quota import db

    conn = db.connect(db_path)
    owner(conn, "user", "idle")
    add_prealloc(conn, ORPHAN, created_at=OLD)
    conn.close()
    monkeypatch.setattr(S, "run_command", answering())
    assert main(["--db", str(db_path), "prune", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Would prune 1 preallocation(s), 2 user(s), 1 account(s).")
    down = FakeSlurm(squeue=RunResult(1, "", "squeue: error: Unable to contact slurm controller\n"))
    monkeypatch.setattr(S, "run_command", down)
    assert main(["--db", str(db_path), "prune"]) == 75
    monkeypatch.setattr(S, "run_command", answering())
    assert main(["--db", str(db_path), "prune", "--all"]) == 0
    out = capsys.readouterr().out
    assert "Pruned 1 preallocation(s), 2 user(s), 1 account(s)." in out
    assert f"  preallocation {ORPHAN}" in out


def test_prune_command_is_root_only(db_path, monkeypatch, capsys):
    monkeypatch.setattr(os, "getuid", lambda: 65534)
    fake = answering()
    monkeypatch.setattr(S, "run_command", fake)
    assert main(["--db", str(db_path), "prune"]) == 1
    assert fake.calls == []
    assert "restricted to root" in capsys.readouterr().err
