"""`slurm-quota history`: journal rows and charges, newest first, filtered, table and JSON."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from tests.unit.cli_helpers import run_cli


@pytest.fixture
def india_time(monkeypatch):
    """Local time UTC+05:30 (POSIX TZ string: needs no tzdata), restored afterwards."""
    monkeypatch.setenv("TZ", "IST-5:30")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def _journal(conn, at, actor, action, kind, target, field, old, new, reason=None):
    conn.execute(
        "INSERT INTO journal (at, actor, action, target_kind, target, field, old_value, "
        "new_value, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (at, actor, action, kind, target, field, old, new, reason),
    )


def _charge(conn, charged_at, job_id, user, account, **extra):
    row = {
        "charge_key": f"{job_id}@{extra.get('start_time', 1_700_000_000)}",
        "job_id": job_id,
        "username": user,
        "account": account,
        "partition": "gpu",
        "job_state": "COMPLETED",
        "start_time": 1_700_000_000,
        "end_time": 1_700_000_059,
        "elapsed_s": 59,
        "cpus": 128,
        "gpus": "",
        "gpu_factors": "",
        "cpu_minutes": 126,
        "gpu_minutes": 0,
        "cpu_s": 7552,  # 128 CPUs x 59 s, exact; 126 minutes by the one rule
        "gpu_ms": 0,
        "source": "jobcomp",
        "charged_at": charged_at,
    }
    row.update(extra)
    cols = ", ".join(row)
    marks = ", ".join("?" * len(row))
    conn.execute(f"INSERT INTO charges ({cols}) VALUES ({marks})", tuple(row.values()))


@pytest.fixture
def ledger(db_path):
    """Journal rows and charges at known times (UTC), alice and bob on account projx."""
    conn = sqlite3.connect(str(db_path))
    _journal(
        conn, "2025-01-01 10:00:00", "root", "set-quota", "user", "alice",
        "quota_cpu_minutes", None, "50000", "grant 7",
    )  # fmt: skip
    _charge(
        conn, "2025-01-01 11:00:00", 100, "alice", "projx",
        gpus="h100=2", gpu_factors="h100=0.5", gpu_minutes=1, gpu_ms=59000,
    )  # fmt: skip
    _journal(
        conn, "2025-01-01 12:00:00", "root (sudo carol)", "adjust", "user", "alice",
        "total_consumed_cpu_minutes", "126", "0", "node failure",
    )  # fmt: skip
    _charge(conn, "2025-01-01 13:00:00", 101, "bob", "projx", job_state="TIMEOUT")
    _journal(
        conn, "2025-01-01 14:00:00", "root", "set-quota", "account", "projx",
        "quota_gpu_minutes", "-1", "900",
    )  # fmt: skip
    # Two elements of array job 200 (job ids 201, 202) and a het component 300+1;
    # one charged_at in ISO form with a Z, as another writer might store it.
    _charge(
        conn, "2025-01-02T09:00:00Z", 201, "alice", "hpc",
        array_job_id=200, array_task_id=1, start_time=1_700_000_100,
    )  # fmt: skip
    _charge(
        conn, "2025-01-02 09:30:00", 202, "alice", "hpc",
        array_job_id=200, array_task_id=2, start_time=1_700_000_200,
    )  # fmt: skip
    _charge(
        conn, "2025-01-02 10:00:00", 301, "bob", "hpc",
        het_job_id=300, het_job_offset=1,
    )  # fmt: skip
    conn.commit()
    conn.close()
    return db_path


def _ids(entries):
    return [(e["kind"], e.get("display_job_id") or f"{e['action']}:{e['target']}") for e in entries]


def test_history_of_a_user_mixes_journal_and_charges_newest_first(ledger, capsys):
    result = run_cli(capsys, ledger, "history", "--user", "alice", "--json")

    assert result.code == 0, result.err
    assert _ids(json.loads(result.out)) == [
        ("charge", "200_2"),
        ("charge", "200_1"),
        ("journal", "adjust:alice"),
        ("charge", "100"),
        ("journal", "set-quota:alice"),
    ]


def test_history_json_entries_carry_every_field(ledger, capsys):
    entries = json.loads(run_cli(capsys, ledger, "history", "--user", "alice", "--json").out)
    adjust = entries[2]
    assert adjust == {
        "kind": "journal",
        "id": adjust["id"],
        "time": "2025-01-01T12:00:00Z",
        "actor": "root (sudo carol)",
        "action": "adjust",
        "target_kind": "user",
        "target": "alice",
        "field": "total_consumed_cpu_minutes",
        "old": "126",
        "new": "0",
        "reason": "node failure",
    }
    charge = entries[3]
    assert charge == {
        "kind": "charge",
        "id": charge["id"],
        "time": "2025-01-01T11:00:00Z",
        "job_id": 100,
        "display_job_id": "100",
        "array_job_id": None,
        "array_task_id": None,
        "het_job_id": None,
        "het_job_offset": None,
        "username": "alice",
        "account": "projx",
        "partition": "gpu",
        "state": "COMPLETED",
        "start_time": 1_700_000_000,
        "end_time": 1_700_000_059,
        "elapsed_s": 59,
        "cpus": 128,
        "gpus": "h100=2",
        "gpu_factors": "h100=0.5",
        "cpu_minutes": 126,
        "gpu_minutes": 1,
        "cpu_s": 7552,
        "gpu_ms": 59000,
        "source": "jobcomp",
    }
    assert entries[0]["time"] == "2025-01-02T09:30:00Z"
    assert entries[1]["time"] == "2025-01-02T09:00:00Z"


def test_history_table_shows_charge_inputs_and_journal_changes_in_local_time(
    ledger, capsys, india_time
):
    result = run_cli(capsys, ledger, "history", "--account", "projx")

    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].split() == ["TIME", "EVENT", "TARGET", "CHANGE", "DETAILS"]
    body = lines[2:]
    assert len(body) == 3
    # 14:00 UTC is 19:30 at UTC+05:30.
    assert body[0].startswith("2025-01-01 19:30:00  set-quota")
    assert "account projx" in body[0]
    assert "quota_gpu_minutes: -1 -> 900" in body[0]
    assert body[0].rstrip().endswith("by root")
    assert body[1].startswith("2025-01-01 18:30:00  charge job 101")
    assert "user bob / account projx" in body[1]
    assert "128 CPUs x 59 s; GPUs none; TIMEOUT" in body[1]
    assert body[2].startswith("2025-01-01 16:30:00  charge job 100")
    assert "+7552 CPU-s, +59 GPU-s" in body[2]
    assert "128 CPUs x 59 s; GPUs h100=2 (factors h100=0.5); COMPLETED" in body[2]


def test_history_table_shows_actor_and_reason(ledger, capsys):
    out = run_cli(capsys, ledger, "history", "--user", "alice").out
    assert "total_consumed_cpu_minutes: 126 -> 0" in out
    assert "by root (sudo carol): node failure" in out
    assert "quota_cpu_minutes: none -> 50000" in out
    assert "by root: grant 7" in out


def test_history_of_an_array_job_lists_its_elements(ledger, capsys):
    entries = json.loads(run_cli(capsys, ledger, "history", "--job", "200", "--json").out)
    assert [(e["display_job_id"], e["job_id"]) for e in entries] == [("200_2", 202), ("200_1", 201)]


def test_history_of_one_job_lists_only_its_charges(ledger, capsys):
    entries = json.loads(run_cli(capsys, ledger, "history", "--job", "201", "--json").out)
    assert [e["display_job_id"] for e in entries] == ["200_1"]
    entries = json.loads(run_cli(capsys, ledger, "history", "--job", "300", "--json").out)
    assert [e["display_job_id"] for e in entries] == ["300+1"]


def test_history_job_and_user_combine(ledger, capsys):
    entries = json.loads(
        run_cli(capsys, ledger, "history", "--job", "101", "--user", "alice", "--json").out
    )
    assert entries == []
    out = run_cli(capsys, ledger, "history", "--job", "101", "--user", "alice").out
    assert out == "No history found for user: alice\n"


def test_history_without_filter_shows_everything_up_to_the_limit(ledger, capsys):
    entries = json.loads(run_cli(capsys, ledger, "history", "--json").out)
    assert len(entries) == 8
    assert entries[0]["display_job_id"] == "300+1"
    assert entries[-1]["action"] == "set-quota" and entries[-1]["target"] == "alice"

    limited = json.loads(run_cli(capsys, ledger, "history", "--limit", "3", "--json").out)
    assert _ids(limited) == [("charge", "300+1"), ("charge", "200_2"), ("charge", "200_1")]


def test_history_of_admin_commands_just_run(db_path, capsys, monkeypatch):
    monkeypatch.setenv("SUDO_USER", "dave")
    assert run_cli(capsys, db_path, "user-quota", "erin", "10", "--reason", "new").code == 0
    assert run_cli(capsys, db_path, "adjust", "--user", "erin", "--cpu", "--minutes=+4").code == 0

    entries = json.loads(run_cli(capsys, db_path, "history", "--user", "erin", "--json").out)

    assert [(e["action"], e["field"], e["old"], e["new"]) for e in entries] == [
        ("adjust", "total_consumed_cpu_minutes", "0", "4"),
        ("set-quota", "quota_cpu_minutes", None, "10"),
        ("create", "quota_gpu_minutes", None, "-1"),
    ]
    assert {e["actor"] for e in entries} == {"root (sudo dave)"}


def test_history_empty_messages(db_path, capsys):
    assert run_cli(capsys, db_path, "history").out == "No history found.\n"
    assert run_cli(capsys, db_path, "history", "--user", "zed").out == (
        "No history found for user: zed\n"
    )
    assert run_cli(capsys, db_path, "history", "--account", "none").out == (
        "No history found for account: none\n"
    )
    assert run_cli(capsys, db_path, "history", "--job", "9").out == "No charges found for job: 9\n"
    assert json.loads(run_cli(capsys, db_path, "history", "--json").out) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--user", "a", "--account", "b"], "not both"),
        (["--job", "abc"], "is not a Slurm job id"),
        (["--job", "12_3"], "is not a Slurm job id"),
        (["--job", "0"], "is not a Slurm job id"),
        (["--limit", "0"], "0 is not in the range"),
        (["--limit", "x"], "is not a valid integer"),
        (["--user", "a b"], "contains whitespace"),
    ],
)
def test_history_refuses_bad_selectors(db_path, capsys, args, message):
    result = run_cli(capsys, db_path, "history", *args)
    assert result.code == 2
    assert message in result.err
    assert result.out == ""
