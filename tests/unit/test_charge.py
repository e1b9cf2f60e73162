"""charge: one ended run -> one transaction, exactly once, on captured real Slurm outputs.

Jobs come from tests/fixtures/slurm-22.05/charge/ (real lab runs: jobcomp environment +
scontrol/sacct outputs). Where a test needs other numbers (59 s × 128 CPUs) it builds a
synthetic Run in the test and says so.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from slurm_quota import charge as C
from slurm_quota import db
from slurm_quota import slurm as S
from slurm_quota.cli import main
from slurm_quota.errors import ImplausibleSlurmData, InvalidInput, SlurmUnavailable
from slurm_quota.slurm import RunResult
from tests.unit.cli_helpers import snapshot
from tests.unit.slurm_fixtures import FakeSlurm, case, load, result, runner_for

REPO = Path(__file__).resolve().parents[2]


def _no_sleep(_s: float) -> None:
    pass


def do_charge(conn, name: str, **kw) -> C.ChargeResult:
    """Charge a captured job through the jobcomp entry point with its captured Slurm outputs."""
    runner = kw.pop("runner", None) or runner_for(name)
    return C.charge_env(conn, case(name)["env"], runner=runner, sleep=_no_sleep, **kw)


@pytest.fixture
def conn(any_conn):
    """The tests on `conn` run on both engines: SQLite and MariaDB (tests/conftest.py)."""
    return any_conn


def _insert_owner_if_absent(conn, table: str, key: str, name: str) -> None:
    if conn.execute(f"SELECT 1 FROM {table} WHERE {key} = ?", (name,)).fetchone() is None:
        conn.execute(f"INSERT INTO {table} ({key}) VALUES (?)", (name,))


def add_prealloc(conn, uuid: str, *, user="alice", account="research", cpu=30, gpu=0,
                 size=1, created_at="2026-11-21 12:00:00", cluster="") -> None:  # fmt: skip
    _insert_owner_if_absent(conn, "users", "username", user)
    _insert_owner_if_absent(conn, "accounts", "account", account)
    conn.execute(
        "INSERT INTO jobs_preallocations (job_uuid, username, account, preallocated_cpu_minutes,"
        " preallocated_gpu_minutes, array_size, created_at, cluster)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (uuid, user, account, cpu, gpu, size, created_at, cluster),
    )


def prealloc_size(conn, uuid: str) -> int | None:
    row = conn.execute(
        "SELECT array_size FROM jobs_preallocations WHERE job_uuid = ?", (uuid,)
    ).fetchone()
    return None if row is None else row[0]


def consumed(conn, kind: str, name: str) -> tuple[int, int] | None:
    table, key = ("users", "username") if kind == "user" else ("accounts", "account")
    row = conn.execute(
        f"SELECT total_consumed_cpu_minutes, total_consumed_gpu_minutes FROM {table} "
        f"WHERE {key} = ?",
        (name,),
    ).fetchone()
    return None if row is None else (row[0], row[1])


def charges(conn) -> list:
    return conn.execute("SELECT * FROM charges ORDER BY id").fetchall()


def set_factor(conn, gpu_type: str, factor: float) -> None:
    conn.execute("INSERT INTO gpu_factors (gpu_type, factor) VALUES (?, ?)", (gpu_type, factor))


def token_of(name: str) -> str:
    tok = S.find_token(S.parse_scontrol_jobs(case(name)["scontrol"].stdout)[0].admin_comment)
    if tok is None:
        for row in S.parse_sacct(case(name)["sacct"].stdout):
            tok = tok or row.token
    assert tok
    return tok


# --------------------------------------------------------------------------- basics


def test_plain_job_is_charged_to_user_and_account_and_releases_its_preallocation(conn):
    add_prealloc(conn, token_of("plain"))
    res = do_charge(conn, "plain")
    assert res.charged and res.released == 1
    (row,) = charges(conn)
    assert row["charge_key"] == "5:1795265535"
    assert (row["job_id"], row["username"], row["account"]) == (5, "alice", "research")
    assert (row["elapsed_s"], row["cpus"], row["cpu_s"], row["gpu_ms"]) == (2, 1, 2, 0)
    assert (row["cpu_minutes"], row["gpu_minutes"]) == (1, 0)  # per run, by the one rule
    assert row["job_uuid"] == "1ecf9b9e-197c-e98f-4680-d32353876995"
    assert row["source"] == "jobcomp:scontrol"
    assert row["released_prealloc"] == 1
    assert row["job_state"] == "COMPLETED" and row["partition"] == "main"
    assert prealloc_size(conn, token_of("plain")) is None


def test_exclusive_job_charges_every_cpu_and_gpu_of_the_node(conn):
    set_factor(conn, "h100", 100.0)
    res = do_charge(conn, "exclusive")
    # 16 CPUs × 2 s = 32/60 -> 1; (2 h100 × 100 + 2 a100 × 1) × 2 s = 404/60 = 6.73 -> 7
    assert (res.charge.cpu_minutes, res.charge.gpu_minutes) == (1, 7)
    (row,) = charges(conn)
    assert row["gpus"] == "a100=2,h100=2"
    assert row["gpu_factors"] == "a100=1.0,h100=100.0"
    assert consumed(conn, "user", "alice") == (1, 7)
    assert consumed(conn, "account", "research") == (1, 7)


def test_rounding_is_half_up_on_the_product_not_the_duration(conn):
    # synthetic run: 128 CPUs for 59 s (the seed floors 59 s to 0 minutes first)
    run = C.Run(job_id=900, start_time=1000, end_time=1059, cpus=128, username="carol",
                account="chem", job_state="COMPLETED")  # fmt: skip
    res = C.apply_charge(conn, run, C.Allocation(None), "test")
    assert res.charge.cpu_minutes == 126  # 128 × 59 / 60 = 125.87
    # and exactly half rounds up: 1 CPU × 30 s = 0.5 -> 1
    half = C.Run(job_id=901, start_time=0, end_time=30, cpus=1, username="carol", account="chem",
                 job_state="COMPLETED")  # fmt: skip
    assert C.apply_charge(conn, half, C.Allocation(None), "test").charge.cpu_minutes == 1
    assert consumed(conn, "user", "carol") == (127, 0)


def test_typed_gpu_request_uses_its_type_factor(conn):
    set_factor(conn, "h100", 45.0)
    res = do_charge(conn, "gres_h100")
    assert dict(res.charge.gpus_by_type) == {"h100": 1}
    assert res.charge.gpu_minutes == 2  # 1 × 45 × 2 s / 60 = 1.5 -> 2 (half up)


def test_untyped_request_is_charged_by_the_type_slurm_allocated(conn):
    # --gres=gpu:1: ReqTRES untyped, AllocTRES gres/gpu:h100=1 + gres/gpu=1 (not 2 GPUs)
    set_factor(conn, "h100", 60.0)
    set_factor(conn, "default", 1000.0)
    res = do_charge(conn, "gres_untyped")
    assert dict(res.charge.gpus_by_type) == {"h100": 1}
    assert res.charge.gpu_minutes == 2  # 1 × 60 × 2 / 60


def test_gpus2_split_across_types_charges_each_type_once(conn):
    # --gpus=2 landed as one h100 + one a100: gres/gpu:a100=1,gres/gpu:h100=1,gres/gpu=2
    set_factor(conn, "h100", 90.0)
    set_factor(conn, "a100", 30.0)
    res = do_charge(conn, "gpus2_split")
    assert dict(res.charge.gpus_by_type) == {"a100": 1, "h100": 1}
    assert res.charge.gpu_minutes == 4  # (90 + 30) × 2 s / 60 = 4; the total 2 is not added


def test_untyped_only_allocation_uses_the_default_factor(conn):
    # synthetic: a site whose GPUs have no type reports only gres/gpu=N
    set_factor(conn, "default", 2.0)
    run = C.Run(job_id=902, start_time=0, end_time=600, cpus=1, username="alice",
                account="research", job_state="COMPLETED")  # fmt: skip
    alloc = C.Allocation(None, S.gpus_by_type("billing=1,cpu=1,gres/gpu=3,node=1"))
    res = C.apply_charge(conn, run, alloc, "test")
    assert res.charge.gpu_minutes == 60  # 3 × 2.0 × 10 min


def test_missing_user_and_account_are_created_with_the_default_quotas(conn):
    conn.execute("INSERT INTO settings (`key`, value) VALUES ('default_user_quota_cpu_minutes', "
                 "'5000'), ('default_account_quota_gpu_minutes', '77')")  # fmt: skip
    do_charge(conn, "physics_bob")
    u = conn.execute("SELECT * FROM users WHERE username = 'bob'").fetchone()
    a = conn.execute("SELECT * FROM accounts WHERE account = 'physics'").fetchone()
    assert (u["quota_cpu_minutes"], u["quota_gpu_minutes"]) == (5000, -1)
    assert (a["quota_cpu_minutes"], a["quota_gpu_minutes"]) == (-1, 77)


def test_existing_quota_is_kept_when_charging(conn):
    conn.execute("INSERT INTO users (username, quota_cpu_minutes, total_consumed_cpu_minutes, "
                 "consumed_cpu_s) VALUES ('alice', 100, 40, 2400)")  # fmt: skip
    set_factor(conn, "h100", 100.0)
    do_charge(conn, "exclusive")
    u = conn.execute("SELECT * FROM users WHERE username = 'alice'").fetchone()
    assert (u["quota_cpu_minutes"], u["total_consumed_cpu_minutes"]) == (100, 41)


# --------------------------------------------------------------------------- idempotency


def test_charging_the_same_run_twice_changes_nothing_the_second_time(conn):
    set_factor(conn, "h100", 100.0)
    add_prealloc(conn, token_of("exclusive"), size=3)
    first = do_charge(conn, "exclusive")
    runner = runner_for("exclusive")
    second = do_charge(conn, "exclusive", runner=runner)
    assert first.charged and not second.charged
    assert runner.calls == []  # a replay does not even ask Slurm
    assert len(charges(conn)) == 1
    assert consumed(conn, "user", "alice") == (1, 7)
    assert prealloc_size(conn, token_of("exclusive")) == 2  # released once only


_CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    sys.path.insert(0, {repo!r})
    from slurm_quota import charge as C, db
    from tests.unit.slurm_fixtures import case, runner_for
    name, db_path, barrier, mode = sys.argv[1:5]
    if db_path == "-":  # a MariaDB ledger, from the environment (no password in argv)
        import json
        from slurm_quota.config import MariaDBLedger
        db_path = MariaDBLedger(**json.loads(os.environ["SQ_TEST_LEDGER"]))
    conn = db.connect(db_path)
    real_insert = db.insert_charge
    real_add = db.add_owner_consumption
    real_release = db.release_preallocation
    calls = []
    def insert(conn, values):
        ok = real_insert(conn, values)
        if mode == "hold":
            time.sleep(0.3)  # keep the write lock so the other process must wait on it
        return ok
    def add(conn, *a):
        calls.append(a)
        if mode == "kill-before-user" and len(calls) == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        real_add(conn, *a)
        if mode == "kill-between-user-and-account" and len(calls) == 1:
            os.kill(os.getpid(), signal.SIGKILL)
    def release(conn, *a, **k):
        n = real_release(conn, *a, **k)
        if mode == "kill-after-release":
            os.kill(os.getpid(), signal.SIGKILL)
        return n
    db.insert_charge, db.add_owner_consumption, db.release_preallocation = insert, add, release
    while barrier != "-" and not os.path.exists(barrier):
        time.sleep(0.005)
    res = C.charge_env(conn, case(name)["env"], runner=runner_for(name), sleep=lambda s: None)
    if mode == "kill-after-commit":
        os.kill(os.getpid(), signal.SIGKILL)
    print("charged" if res.charged else "noop")
    """
)


def _child(name: str, ledger, barrier: str, mode: str) -> subprocess.Popen:
    """A charge in another process, on the SQLite file or the MariaDB ledger `ledger`."""
    code = _CHILD.format(repo=str(REPO))
    env = dict(os.environ)
    if getattr(ledger, "kind", None) == "mariadb":
        env["SQ_TEST_LEDGER"] = json.dumps(dataclasses.asdict(ledger))
        target = "-"
    else:
        target = str(getattr(ledger, "path", ledger))
    return subprocess.Popen(
        [sys.executable, "-c", code, name, target, barrier, mode],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(REPO),
    )


def test_concurrent_charges_of_one_run_in_separate_processes_count_once(any_ledger, tmp_path):
    db_path = any_ledger
    conn = db.connect(db_path)
    set_factor(conn, "h100", 100.0)
    add_prealloc(conn, token_of("exclusive"), size=5)
    barrier = tmp_path / "go"
    procs = [_child("exclusive", db_path, str(barrier), "hold") for _ in range(4)]
    barrier.touch()
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outs
    assert sorted(o[0].strip() for o in outs) == ["charged", "noop", "noop", "noop"]
    assert len(charges(conn)) == 1
    assert consumed(conn, "user", "alice") == (1, 7)
    assert consumed(conn, "account", "research") == (1, 7)
    assert prealloc_size(conn, token_of("exclusive")) == 4
    conn.close()


@pytest.mark.parametrize(
    "mode", ["kill-before-user", "kill-between-user-and-account", "kill-after-release"]
)
def test_kill_9_inside_the_transaction_leaves_no_trace_and_a_rerun_charges_once(
    any_ledger, mode
):
    db_path = any_ledger
    conn = db.connect(db_path)
    set_factor(conn, "h100", 100.0)
    add_prealloc(conn, token_of("exclusive"), size=2)
    p = _child("exclusive", db_path, "-", mode)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert charges(conn) == []
    assert consumed(conn, "user", "alice") == (0, 0)  # row pre-exists from add_prealloc
    assert prealloc_size(conn, token_of("exclusive")) == 2
    rerun = _child("exclusive", db_path, "-", "normal")
    out, err = rerun.communicate(timeout=60)
    assert rerun.returncode == 0, err
    assert out.strip() == "charged"
    assert len(charges(conn)) == 1
    assert consumed(conn, "user", "alice") == (1, 7)
    assert consumed(conn, "account", "research") == (1, 7)
    assert prealloc_size(conn, token_of("exclusive")) == 1
    conn.close()


def test_kill_9_after_commit_then_rerun_is_a_noop(any_ledger):
    db_path = any_ledger
    conn = db.connect(db_path)
    p = _child("n4", db_path, "-", "kill-after-commit")
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    rerun = _child("n4", db_path, "-", "normal")
    out, _ = rerun.communicate(timeout=60)
    assert out.strip() == "noop"
    assert len(charges(conn)) == 1
    conn.close()


# --------------------------------------------------------------------------- job kinds


def test_each_array_element_releases_one_share_and_the_last_removes_the_row(conn):
    tok = token_of("array_task0")
    add_prealloc(conn, tok, cpu=30, size=3)
    sizes = []
    for name in ("array_task0", "array_task2", "array_task1"):  # task 2 = master id 18
        res = do_charge(conn, name)
        assert res.charged and res.released == 1
        sizes.append(prealloc_size(conn, tok))
    assert sizes == [2, 1, None]
    rows = charges(conn)
    assert [(r["job_id"], r["array_job_id"], r["array_task_id"]) for r in rows] == [
        (19, 18, 0), (18, 18, 2), (20, 18, 1)
    ]  # fmt: skip


def test_cancelled_pending_array_releases_every_remaining_element(conn):
    tok = token_of("array_meta_cancelled")
    add_prealloc(conn, tok, size=4)
    res = do_charge(conn, "array_meta_cancelled")
    assert (res.charge.cpu_minutes, res.charge.gpu_minutes) == (0, 0)
    assert res.released == 4
    assert prealloc_size(conn, tok) is None


def test_het_components_each_release_their_own_row(conn):
    lead, comp = token_of("het_cancelled_leader"), token_of("het_cancelled_component1")
    assert lead != comp
    add_prealloc(conn, lead)
    add_prealloc(conn, comp)
    do_charge(conn, "het_cancelled_leader")
    assert prealloc_size(conn, lead) is None and prealloc_size(conn, comp) == 1
    do_charge(conn, "het_cancelled_component1")
    assert prealloc_size(conn, comp) is None
    rows = charges(conn)
    assert [(r["job_id"], r["het_job_id"], r["het_job_offset"]) for r in rows] == [
        (23, 23, 0), (24, 23, 1)
    ]  # fmt: skip


def test_cancelled_while_pending_charges_zero_and_releases(conn):
    tok = token_of("cancelled_pending")
    add_prealloc(conn, tok, cpu=500)
    res = do_charge(conn, "cancelled_pending")
    assert (res.charge.cpu_minutes, res.charge.gpu_minutes, res.released) == (0, 0, 1)
    assert charges(conn)[0]["job_state"] == "CANCELLED"
    assert prealloc_size(conn, tok) is None


def test_failed_job_is_charged_like_any_other(conn):
    res = do_charge(conn, "failed")
    assert res.charged and res.charge.run.job_state == "FAILED"
    assert charges(conn)[0]["elapsed_s"] == 1


def test_timeout_job_is_charged_for_its_real_elapsed_time(conn):
    c = case("timeout")
    elapsed = int(c["env"]["END"]) - int(c["env"]["START"])
    assert elapsed > 60  # --time=1 ran past the limit until slurmctld's check killed it
    res = do_charge(conn, "timeout")
    assert res.charge.run.job_state == "TIMEOUT"
    assert res.charge.cpu_s == elapsed  # 1 CPU
    assert res.charge.cpu_minutes == -(-elapsed // 60)


def test_requeue_charges_each_run_and_releases_only_when_the_job_ends(conn):
    tok = token_of("requeue_run1")
    add_prealloc(conn, tok)
    # run 1: jobcomp says JOBSTATE=PENDING; the controller already shows the next pending
    # run, so the run's own REQUEUED row comes from sacct -D.
    r1 = do_charge(conn, "requeue_run1")
    assert r1.charged and r1.released == 0
    assert r1.charge.source == "jobcomp:sacct"
    assert prealloc_size(conn, tok) == 1
    r2 = do_charge(conn, "requeue_run2")
    assert r2.charged and r2.released == 1
    keys = [r["charge_key"] for r in charges(conn)]
    assert len(set(keys)) == 2 and all(k.startswith("27:") for k in keys)
    assert prealloc_size(conn, tok) is None


def test_bare_uuid_admin_comment_of_the_seed_system_releases(conn):
    tok = "265cb163-b761-109d-4183-a9ae2216be28"
    add_prealloc(conn, tok)
    assert do_charge(conn, "bare_uuid").released == 1
    assert prealloc_size(conn, tok) is None


def test_job_without_a_token_is_charged_and_releases_nothing(conn):
    # synthetic: the real scontrol line of the plain job with its AdminComment removed
    # (a job submitted before the plugin was installed).
    c = case("plain")
    line = c["scontrol"].stdout
    start = line.index("AdminComment=")
    end = line.index(" StdErr=")
    stripped = RunResult(0, line[:start] + line[end + 1 :], "")
    add_prealloc(conn, token_of("plain"))
    res = do_charge(conn, "plain", runner=FakeSlurm(scontrol=stripped))
    assert res.charged and res.charge.token is None and res.released == 0
    assert prealloc_size(conn, token_of("plain")) == 1
    assert charges(conn)[0]["job_uuid"] is None


# --------------------------------------------------------------------------- Slurm sources


def test_sacct_is_the_fallback_when_the_controller_purged_the_job(conn):
    invalid = result(load("scontrol_invalid_id")["scontrol"])
    fake = FakeSlurm(scontrol=invalid, sacct=case("gpus2_split")["sacct"])
    res = do_charge(conn, "gpus2_split", runner=fake)
    assert res.charge.source == "jobcomp:sacct"
    assert dict(res.charge.gpus_by_type) == {"a100": 1, "h100": 1}


def test_stale_sacct_is_retried_within_a_bounded_time(conn):
    invalid = result(load("scontrol_invalid_id")["scontrol"])
    c = case("exclusive")  # its first sacct read was stale (PENDING, End Unknown)
    fake = FakeSlurm(scontrol=invalid, sacct=[c["sacct_first"], c["sacct_first"], c["sacct"]])
    slept: list[float] = []
    res = C.charge_env(conn, c["env"], runner=fake, sleep=slept.append)
    assert res.charged and dict(res.charge.gpus_by_type) == {"a100": 2, "h100": 2}
    assert fake.count("sacct") == 3
    assert slept == [0.1, 0.2]


def test_sacct_stale_for_too_long_raises_and_charges_nothing(conn):
    invalid = result(load("scontrol_invalid_id")["scontrol"])
    c = case("exclusive")
    fake = FakeSlurm(scontrol=invalid, sacct=c["sacct_first"])
    slept: list[float] = []
    with pytest.raises(SlurmUnavailable, match="did not report"):
        C.charge_env(conn, c["env"], runner=fake, sleep=slept.append)
    assert sum(slept) <= 1.0 + 1e-9
    assert fake.count("sacct") == 1 + len(C.SACCT_RETRY_DELAYS_S)
    assert charges(conn) == []
    assert consumed(conn, "user", "alice") is None


def test_slurm_down_raises_temporary_failure_and_writes_nothing(conn):
    down = SlurmUnavailable("`scontrol` did not answer within 5 s (killed).")
    fake = FakeSlurm(scontrol=down, sacct=down)
    with pytest.raises(SlurmUnavailable):
        do_charge(conn, "plain", runner=fake)
    assert fake.count("sacct") == 1  # a hung sacct is not retried
    assert charges(conn) == []


def test_never_started_job_unknown_to_slurm_charges_zero_without_release(conn):
    invalid = result(load("scontrol_invalid_id")["scontrol"])
    fake = FakeSlurm(scontrol=invalid, sacct=RunResult(0, "", ""))
    tok = token_of("cancelled_pending")
    add_prealloc(conn, tok)
    res = do_charge(conn, "cancelled_pending", runner=fake)
    assert res.charged and res.charge.cpu_minutes == 0 and res.released == 0
    assert prealloc_size(conn, tok) == 1  # reconcile's orphan sweep releases it later


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("JOBID", "", "no JOBID"), ("START", "x", "not a number"), ("END", "1", "before START"),
     ("USERNAME", "", "no USERNAME")],
)  # fmt: skip
def test_bad_environment_is_refused_with_a_clear_message(conn, key, value, message):
    env = case("plain")["env"]
    env[key] = value
    with pytest.raises(InvalidInput, match=message):
        C.charge_env(conn, env, runner=runner_for("plain"), sleep=_no_sleep)
    assert charges(conn) == []


# --------------------------------------------------------------------------- the command


@pytest.fixture
def jobcomp_env(monkeypatch):
    def apply(name: str) -> FakeSlurm:
        for k in list(os.environ):
            if k in case(name)["env"]:
                monkeypatch.delenv(k)
        for k, v in case(name)["env"].items():
            monkeypatch.setenv(k, v)
        fake = runner_for(name)
        monkeypatch.setattr(S, "run_command", fake)
        return fake

    return apply


def test_charge_command_charges_and_prints_one_line(db_path, jobcomp_env, capsys):
    jobcomp_env("gpus2_split")
    assert main(["--db", str(db_path), "charge"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("job 17 run 17:1795265568 (COMPLETED): charged alice/research: ")
    assert "GPUs a100=1,h100=1" in out
    assert main(["--db", str(db_path), "charge"]) == 0
    assert "already charged" in capsys.readouterr().out
    conn = db.connect(db_path)
    assert len(charges(conn)) == 1
    conn.close()


def test_charge_command_dry_run_writes_nothing(db_path, jobcomp_env, capsys):
    jobcomp_env("n4")
    assert main(["--db", str(db_path), "charge", "--dry-run", "--json"]) == 0
    assert '"dry_run": true' in capsys.readouterr().out
    conn = db.connect(db_path)
    assert charges(conn) == []
    conn.close()


def test_charge_command_exits_75_when_slurm_does_not_answer(
    db_path, jobcomp_env, monkeypatch, capsys
):
    jobcomp_env("plain")
    down = SlurmUnavailable("`scontrol show job -o 5` did not answer within 5 s (killed).")
    monkeypatch.setattr(S, "run_command", FakeSlurm(scontrol=down, sacct=down))
    assert main(["--db", str(db_path), "charge"]) == 75
    assert "did not answer" in capsys.readouterr().err


def test_charge_command_exits_2_on_a_bad_environment(db_path, jobcomp_env, monkeypatch):
    jobcomp_env("plain")
    monkeypatch.delenv("JOBID")
    assert main(["--db", str(db_path), "charge"]) == 2


def test_charge_command_refuses_a_user_who_does_not_own_the_ledger(
    db_path, jobcomp_env, monkeypatch, capsys
):
    jobcomp_env("plain")
    monkeypatch.setattr(os, "getuid", lambda: 65534)
    assert main(["--db", str(db_path), "charge"]) == 1
    assert "SlurmUser" in capsys.readouterr().err
    conn = db.connect(db_path)
    assert charges(conn) == []
    conn.close()


def test_charge_command_missing_database_fails_without_asking_slurm(tmp_path, jobcomp_env):
    fake = jobcomp_env("plain")
    assert main(["--db", str(tmp_path / "absent.db"), "charge"]) == 1
    assert fake.calls == []


def test_charge_help_does_not_import_sqlite_or_subprocess():
    code = (
        "import sys; from slurm_quota.cli import main; "
        "rc = main(['charge', '--help']); "
        "print(sorted(m for m in ('sqlite3', 'subprocess', 'slurm_quota.charge') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(REPO), check=True).stdout  # fmt: skip
    assert out.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(
    ("key", "value"),
    [("PROCS", str(2**70)), ("END", str(2**40)), ("JOBID", str(2**40)), ("ARRAYJOBID", "9" * 25)],
)
def test_charge_command_refuses_implausible_slurm_values_with_exit_1(
    db_path, jobcomp_env, monkeypatch, capsys, key, value
):
    jobcomp_env("plain")
    monkeypatch.setenv(key, value)
    before = snapshot(db_path)
    assert main(["--db", str(db_path), "charge"]) == 1
    err = capsys.readouterr().err
    assert f"{key}={value}" in err and "nothing was charged" in err
    assert snapshot(db_path) == before


def test_charge_fast_path_refuses_procs_2_pow_70_with_exit_1(
    db_path, jobcomp_env, monkeypatch, capsys
):
    jobcomp_env("plain")
    monkeypatch.setenv("PROCS", str(2**70))
    monkeypatch.setenv("SLURM_QUOTA_DB", str(db_path))
    before = snapshot(db_path)
    from slurm_quota import entry

    assert entry.charge_main([]) == 1
    assert "PROCS=1180591620717411303424" in capsys.readouterr().err
    assert snapshot(db_path) == before


def test_a_charge_beyond_max_minutes_is_refused_before_any_write(conn):
    run = C.Run(job_id=7, start_time=0, end_time=2**33, cpus=2**32 - 1, username="alice",
                account="research", job_state="COMPLETED")
    with pytest.raises(ImplausibleSlurmData, match="CPU minutes"):
        C.apply_charge(conn, run, C.Allocation(None), "test")
    assert charges(conn) == []
    assert consumed(conn, "user", "alice") is None


def test_an_absurd_gpu_count_is_refused_before_any_write(conn):
    run = C.Run(job_id=7, start_time=0, end_time=3600, cpus=1, username="alice",
                account="research", job_state="COMPLETED")
    with pytest.raises(ImplausibleSlurmData, match="GPU minutes"):
        C.apply_charge(conn, run, C.Allocation(None, {"h100": 10**29}), "test")
    assert charges(conn) == []
