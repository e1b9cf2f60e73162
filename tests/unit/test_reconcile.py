"""reconcile: one batched sacct query, spool replay, orphan sweep (only when Slurm answered).

The sacct window and squeue outputs are real lab captures (tests/fixtures/slurm-22.05/).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from slurm_quota import charge as C
from slurm_quota import db
from slurm_quota import reconcile as R
from slurm_quota import slurm as S
from slurm_quota.cli import main
from slurm_quota.errors import SlurmUnavailable
from slurm_quota.slurm import RunResult
from tests.unit.slurm_fixtures import CHARGE, FakeSlurm, case, load, result
from tests.unit.test_charge import add_prealloc, charges, consumed, prealloc_size, token_of


@pytest.fixture
def conn(any_conn):
    """The tests on `conn` run on both engines: SQLite and MariaDB (tests/conftest.py)."""
    return any_conn

NOW = 1795270000  # after every captured job
CASES = sorted(
    p.stem for p in CHARGE.glob("*.json") if "env" in load(p.stem)
)  # every captured job with its jobcomp environment


def window() -> RunResult:
    return result(load("sacct_window")["sacct"])


def squeue() -> RunResult:
    return result(load("squeue_all")["squeue"])


def slurm(window_out: RunResult | Exception | None = None, queue=None, per_job=None) -> FakeSlurm:
    """sacct: the batched window (-a) or one job (-j) from the captured case `per_job`."""
    win = window() if window_out is None else window_out

    def sacct(argv):
        if "-j" in argv:
            return case(per_job)["sacct"] if per_job else RunResult(0, "", "")
        if isinstance(win, Exception):
            raise win
        return win

    scontrol = case(per_job)["scontrol"] if per_job else result(
        load("scontrol_invalid_id")["scontrol"]
    )
    return FakeSlurm(sacct=sacct, squeue=squeue() if queue is None else queue, scontrol=scontrol)


def independent_totals(rows: list[S.AccountingJob]) -> dict[str, tuple[int, int]]:
    """Per-user consumed minutes straight from sacct: ceil(Σ AllocCPUS × (End − Start) / 60)
    and ceil(Σ GPUs × (End − Start) / 60) (no factors set: 1 each)."""
    out: dict[str, list[int]] = {}
    for r in rows:
        if not r.final:
            continue
        start = r.start_time if r.start_time is not None else r.end_time
        secs = r.end_time - start
        cpu = r.alloc_cpus * secs
        gpu = sum(r.gpus_by_type.values()) * secs
        t = out.setdefault(r.username, [0, 0])
        t[0] += cpu
        t[1] += gpu
    return {k: (-(-v[0] // 60), -(-v[1] // 60)) for k, v in out.items()}


def test_jobcomp_and_sacct_agree_on_the_charge_key_of_every_captured_run():
    # If they disagreed, reconcile would charge a run the jobcomp path already charged.
    assert len(CASES) >= 20
    for name in CASES:
        c = case(name)
        env_run = C.run_from_env(c["env"])
        rows = [r for r in S.parse_sacct(c["sacct"].stdout) if r.job_id == c["job_id"]]
        sacct_keys = {C.run_from_sacct(r).charge_key for r in rows if r.final}
        assert env_run.charge_key in sacct_keys, name


def test_reconcile_charges_every_ended_run_once_and_matches_sacct(conn):
    rows = S.parse_sacct(window().stdout)
    fake = slurm()
    report = R.reconcile(conn, since=NOW - 86400, now=NOW, runner=fake)
    assert fake.count("sacct") == 1  # one batched query, never one per job
    final = [r for r in rows if r.final]
    assert report.runs == len({C.run_from_sacct(r).charge_key for r in final})
    assert report.charged == report.runs and report.already_charged == 0
    expected = independent_totals(rows)
    for user, totals in expected.items():
        assert consumed(conn, "user", user) == totals
    exact_cpu_s = sum(
        r.alloc_cpus * (r.end_time - (r.start_time if r.start_time is not None else r.end_time))
        for r in final
    )
    assert report.cpu_s == exact_cpu_s > 0
    assert report.cpu_minutes == -(-exact_cpu_s // 60)
    again = R.reconcile(conn, since=NOW - 86400, now=NOW, runner=slurm())
    assert again.charged == 0 and again.already_charged == report.runs
    for user, totals in expected.items():
        assert consumed(conn, "user", user) == totals


def test_reconcile_checkpoints_the_wal_the_plugin_leaves(db_path):
    # the plugin's connection never checkpoints; a WAL left by it (here: another connection
    # with autocheckpoint off, still open so that closing does not checkpoint) is copied
    # back into the database file by reconcile, with nothing to charge
    import sqlite3

    other = sqlite3.connect(str(db_path), isolation_level=None)
    try:
        other.execute("PRAGMA wal_autocheckpoint = 0")
        for i in range(50):
            other.execute("INSERT INTO settings (key, value) VALUES (?, 'x')", (f"k{i}",))
        before = db_path.stat().st_mtime_ns
        time.sleep(0.01)
        conn = db.connect(db_path)  # SQLite only: a WAL is SQLite's
        R.reconcile(conn, since=NOW - 60, now=NOW, runner=slurm(RunResult(0, "", "")))
        conn.close()
        assert db_path.stat().st_mtime_ns > before  # the WAL's pages were written back
    finally:
        other.close()


def test_reconcile_skips_runs_the_jobcomp_path_already_charged(conn):
    for name in ("plain", "exclusive", "array_task2", "requeue_run1", "cancelled_pending"):
        C.charge_env(conn, case(name)["env"], runner=FakeSlurm(
            scontrol=case(name)["scontrol"], sacct=case(name)["sacct"]), sleep=lambda s: None)
    before = len(charges(conn))
    report = R.reconcile(conn, since=NOW - 86400, now=NOW, runner=slurm())
    assert report.already_charged == 5
    assert len(charges(conn)) == before + report.charged
    keys = [r["charge_key"] for r in charges(conn)]
    assert len(keys) == len(set(keys))


def test_reconcile_releases_array_shares_of_the_runs_it_charges(conn):
    tok = token_of("array_task0")
    add_prealloc(conn, tok, size=3)
    R.reconcile(conn, since=NOW - 86400, now=NOW, runner=slurm(queue=RunResult(0, "", "")))
    assert prealloc_size(conn, tok) is None
    rows = conn.execute(
        "SELECT released_prealloc FROM charges WHERE job_uuid = ?", (tok,)
    ).fetchall()
    assert sorted(r[0] for r in rows) == [1, 1, 1]


def test_sacct_down_changes_nothing(conn, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "5.1795265535.env").write_text(_env_text("plain"))
    add_prealloc(conn, "99999999-9999-9999-9999-999999999999")
    down = SlurmUnavailable("`sacct ...` did not answer within 120 s (killed).")
    with pytest.raises(SlurmUnavailable):
        R.reconcile(conn, now=NOW, spool_dir=spool, runner=slurm(window_out=down))
    assert charges(conn) == []
    assert (spool / "5.1795265535.env").exists()
    assert prealloc_size(conn, "99999999-9999-9999-9999-999999999999") == 1


# --------------------------------------------------------------------------- spool


def _env_text(name: str) -> str:
    return "".join(f"{k}={v}\n" for k, v in case(name)["env"].items())


def test_spooled_run_is_charged_and_its_file_removed_only_after_commit(conn, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    f = spool / "17.1795265568.env"
    f.write_text(_env_text("gpus2_split"))
    empty = RunResult(0, "", "")
    report = R.reconcile(conn, now=NOW, spool_dir=spool,
                         runner=slurm(window_out=empty, per_job="gpus2_split"))  # fmt: skip
    assert report.spool_replayed == 1 and report.charged == 0
    assert not f.exists()
    (row,) = charges(conn)
    assert (row["charge_key"], row["source"]) == ("17:1795265568", "spool:scontrol")


def test_spooled_run_is_kept_when_slurm_cannot_tell_its_allocation(conn, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    f = spool / "17.1795265568.env"
    f.write_text(_env_text("gpus2_split"))
    empty = RunResult(0, "", "")
    report = R.reconcile(conn, now=NOW, spool_dir=spool, runner=slurm(window_out=empty))
    assert report.spool_replayed == 0
    assert [name for name, _ in report.spool_kept] == ["17.1795265568.env"]
    assert f.exists() and charges(conn) == []


def test_spooled_run_already_charged_from_accounting_is_removed(conn, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    f = spool / "5.1795265535.env"
    f.write_text(_env_text("plain"))
    report = R.reconcile(conn, since=NOW - 86400, now=NOW, spool_dir=spool, runner=slurm())
    assert report.spool_removed == 1 and not f.exists()
    assert sum(1 for r in charges(conn) if r["charge_key"] == "5:1795265535") == 1


def test_unreadable_spool_file_is_kept_and_reported(conn, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "x.0.env").write_text("JOBID=\n")
    report = R.reconcile(conn, now=NOW, spool_dir=spool, runner=slurm(RunResult(0, "", "")))
    assert report.spool_kept[0][0] == "x.0.env" and "unreadable" in report.spool_kept[0][1]


# --------------------------------------------------------------------------- orphans


def test_orphan_sweep_releases_only_old_rows_nobody_refers_to(conn):
    queued = token_of("plain")  # in the captured squeue output, not in this window
    in_accounting = "37830a6d-55f9-a306-4fdd-83d553eeae1c"  # the array's token
    orphan = "0badc0de-0000-4000-8000-000000000001"
    young = "0badc0de-0000-4000-8000-000000000002"
    odd_date = "0badc0de-0000-4000-8000-000000000003"
    old = "2026-11-21 10:00:00"
    add_prealloc(conn, queued, created_at=old)
    add_prealloc(conn, in_accounting, created_at=old, size=5)
    add_prealloc(conn, orphan, created_at=old)
    add_prealloc(conn, young, created_at=time.strftime("%Y-%m-%d %H:%M:%S",
                                                       time.gmtime(NOW - 360)))  # fmt: skip
    if not db.is_mariadb(conn):  # a DATETIME column holds no such text on MariaDB
        add_prealloc(conn, odd_date, created_at="yesterday")
    # the accounting window holds only the array's 3 rows (real `sacct -j 18` listing)
    fake = slurm(window_out=result(load("array_master_listing")["sacct"]))
    report = R.reconcile(conn, since=NOW - 86400, now=NOW, grace_s=600, runner=fake)
    assert report.orphans == (orphan,)
    assert prealloc_size(conn, orphan) is None
    assert prealloc_size(conn, queued) == 1
    assert prealloc_size(conn, young) == 1
    assert prealloc_size(conn, odd_date) == (None if db.is_mariadb(conn) else 1)
    # (in_accounting was decremented by its 3 charged runs, not swept)
    assert prealloc_size(conn, in_accounting) == 2
    j = conn.execute("SELECT * FROM journal WHERE target = ?", (orphan,)).fetchone()
    assert (j["action"], j["target_kind"]) == ("reconcile", "preallocation")
    assert '"array_size": 1' in j["old_value"]


def test_orphan_sweep_is_skipped_when_squeue_fails_but_charges_stand(conn):
    orphan = "0badc0de-0000-4000-8000-000000000001"
    add_prealloc(conn, orphan, created_at="2026-11-21 10:00:00")
    down = RunResult(1, "", "squeue: error: Unable to contact slurm controller\n")
    report = R.reconcile(conn, since=NOW - 86400, now=NOW, runner=slurm(queue=down))
    assert report.sweep_error and "could not be read" in report.sweep_error
    assert prealloc_size(conn, orphan) == 1
    assert report.charged > 0


def test_dry_run_changes_nothing(conn, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "5.1795265535.env").write_text(_env_text("plain"))
    orphan = "0badc0de-0000-4000-8000-000000000001"
    add_prealloc(conn, orphan, created_at="2026-11-21 10:00:00")
    report = R.reconcile(conn, since=NOW - 86400, now=NOW, spool_dir=spool, dry_run=True,
                         runner=slurm())  # fmt: skip
    assert report.charged > 0 and report.orphans == (orphan,)
    assert charges(conn) == []
    assert prealloc_size(conn, orphan) == 1
    assert (spool / "5.1795265535.env").exists()


def test_default_window_starts_6h_before_the_newest_charge_or_24h_back(conn):
    fake = slurm(RunResult(0, "", ""))
    R.reconcile(conn, now=NOW, runner=fake)
    argv = fake.calls[0][0]
    assert argv[argv.index("-S") + 1] == S._sacct_time(NOW - 86400)
    run = C.Run(job_id=1, start_time=NOW - 1000, end_time=NOW - 100, cpus=1, username="a",
                account="b", job_state="COMPLETED")  # fmt: skip
    C.apply_charge(conn, run, C.Allocation(None), "test")
    fake = slurm(RunResult(0, "", ""))
    report = R.reconcile(conn, now=NOW, runner=fake)
    assert report.since == NOW - 100 - 6 * 3600


# --------------------------------------------------------------------------- command


def test_reconcile_command_prints_what_it_did(db_path, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(S, "run_command", slurm())
    rc = main(["--db", str(db_path), "reconcile", "--since", str(NOW - 86400),
               "--spool", str(tmp_path / "none")])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "sacct rows" in out and "Charged:" in out and "Orphans: 0" in out


def test_reconcile_command_exits_75_when_the_queue_cannot_be_read(db_path, monkeypatch, capsys):
    down = RunResult(1, "", "squeue: error: Unable to contact slurm controller\n")
    monkeypatch.setattr(S, "run_command", slurm(queue=down))
    assert main(["--db", str(db_path), "reconcile", "--spool", "/nonexistent"]) == 75
    assert "orphan sweep skipped" in capsys.readouterr().err


def test_reconcile_command_is_root_or_ledger_owner_only(db_path, monkeypatch, capsys):
    monkeypatch.setattr(os, "getuid", lambda: 65534)
    fake = slurm()
    monkeypatch.setattr(S, "run_command", fake)
    assert main(["--db", str(db_path), "reconcile"]) == 1
    assert fake.calls == []
    assert "runs as root or as the owner of" in capsys.readouterr().err


def test_reconcile_command_rejects_a_bad_since(db_path, monkeypatch):
    monkeypatch.setattr(S, "run_command", slurm())
    assert main(["--db", str(db_path), "reconcile", "--since", "last tuesday"]) == 2


def test_parse_created_at_forms():
    assert R.parse_created_at("1970-01-01 00:01:00") == 60
    assert R.parse_created_at("1970-01-01T00:01:00Z") == 60
    assert R.parse_created_at(60) == 60
    assert R.parse_created_at("60") == 60
    assert R.parse_created_at("soon") is None
    assert R.parse_created_at(None) is None


def test_fixture_dir_exists():
    assert Path(CHARGE).is_dir()


def test_an_implausible_sacct_row_is_skipped_and_the_others_are_charged(conn, tmp_path):
    # issue 19: one absurd AllocCPUS must neither abort the batch nor be half-charged
    lines = window().stdout.splitlines()
    target = next(i for i, line in enumerate(lines)
                  if (r := S.parse_sacct(line)) and r[0].final and r[0].alloc_cpus > 0
                  and r[0].start_time and r[0].end_time and r[0].end_time > r[0].start_time)
    bad = C.run_from_sacct(S.parse_sacct(lines[target])[0])
    parts = lines[target].split("|")
    parts[6] = str(2**40)
    lines[target] = "|".join(parts)
    spool = tmp_path / "spool"
    spool.mkdir()
    env_text = re.sub(r"(?m)^PROCS=.*$", f"PROCS={2**70}", _env_text("plain"))
    (spool / "5.1.env").write_text(env_text)
    fake = slurm(window_out=RunResult(0, "\n".join(lines) + "\n", ""))
    report = R.reconcile(conn, since=NOW - 86400, now=NOW, runner=fake, spool_dir=spool)
    keys = {r["charge_key"] for r in charges(conn)}
    assert bad.charge_key not in keys
    assert report.charged == report.runs - 1 and len(keys) == report.charged
    assert [name for name, _ in report.spool_kept] == ["5.1.env"]
    kept_reason = report.spool_kept[0][1]
    assert f"PROCS={2**70}" in kept_reason and "nothing was charged" in kept_reason
