"""The lab itself works: a job runs as alice, is accounted, and reaches the jobcomp wrapper.

Independent of the job_submit plugin (whatever lua/job_submit.lua does, these jobs fit any
sane quota policy: the ledger is empty, so quotas are unlimited) and of `slurm-quota charge`.
"""

from __future__ import annotations

import re
import time

SCRIPT = "#!/bin/sh\nid -un\nid -gn\necho account=$SLURM_JOB_ACCOUNT\n"


def _spool_file(lab, job_id: int):
    found = sorted(lab.spool_dir.glob(f"{job_id}.*.env"))
    return found[-1] if found else None


def _parse_env(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def test_lab_daemons_are_ours_and_up(lab):
    pids = lab.daemon_pids()
    assert set(pids) == {"munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd"}
    assert lab.run("scontrol", "ping").stdout.count("is UP") == 1
    node = lab.run("scontrol", "-o", "show", "node", "localhost").stdout
    assert "CPUTot=16" in node
    assert "Gres=gpu:h100:2,gpu:a100:2" in node
    users = lab.run("sacctmgr", "-n", "-P", "show", "user", "format=user,defaultaccount").stdout
    assert {"alice|research", "bob|physics", "root|research"} <= set(users.split())


def test_job_runs_as_alice_and_sacct_accounts_it(lab, clean_ledger):
    res = lab.sbatch("--job-name=smoke", "-n", "2", script=SCRIPT)
    assert res.rc == 0, res.stderr
    assert res.job_id is not None

    assert lab.wait_job_end(res.job_id) == "COMPLETED"
    row = lab.wait_sacct_final(res.job_id, ["User", "Account", "NCPUS", "Partition"])
    assert row["State"] == "COMPLETED"
    assert row["User"] == "alice"
    assert row["Account"] == "research"
    # JobName is not asserted: see Lab.wait_sacct_final about "allocation".
    assert row["NCPUS"] == "2"
    assert row["Partition"] == "main"
    out = (lab.jobs_dir / f"slurm-{res.job_id}.out").read_text().split()
    assert out == ["alice", "alice", "account=research"]


def test_jobcomp_wrapper_gets_the_job_environment(lab, clean_ledger):
    before = int(time.time())
    res = lab.sbatch("-n", "3", "--time=5", script="#!/bin/sh\nsleep 1\n")
    assert res.job_id is not None, res.stderr
    assert lab.wait_job_end(res.job_id) == "COMPLETED"

    lines = lab.wait_jobcomp(res.job_id)
    assert re.search(rf"job {res.job_id} \(alice/research COMPLETED\): charging", lines), lines

    if "charge failed" in lines:
        # `slurm-quota charge` failed (or does not exist yet): the wrapper kept the job's
        # environment for reconcile.
        spooled = _spool_file(lab, res.job_id)
        assert spooled is not None, lines
        env = _parse_env(spooled.read_text())
        assert env["JOBID"] == str(res.job_id)
        assert env["USERNAME"] == "alice"
        assert env["ACCOUNT"] == "research"
        assert env["PARTITION"] == "main"
        assert env["JOBSTATE"] == "COMPLETED"
        assert env["PROCS"] == "3"
        assert env["LIMIT"] == "00:05:00"
        start, end = int(env["START"]), int(env["END"])
        assert before - 5 <= start <= end <= int(time.time()) + 5
        assert end - start >= 1
        assert spooled.name == f"{res.job_id}.{start}.env"
    else:
        assert _spool_file(lab, res.job_id) is None


def test_jobcomp_can_be_switched_off_and_on(lab, clean_ledger):
    lab.set_jobcomp(False)
    try:
        assert not lab.jobcomp_enabled()
        off = lab.sbatch(script="#!/bin/sh\ntrue\n", user="bob")
        assert off.job_id is not None, off.stderr
        assert lab.wait_job_end(off.job_id) == "COMPLETED"
        lines = lab.wait_jobcomp(off.job_id)
        assert "not charged" in lines
        assert "charging" not in lines
        assert _spool_file(lab, off.job_id) is None
    finally:
        lab.set_jobcomp(True)
    assert lab.jobcomp_enabled()
    on = lab.sbatch(script="#!/bin/sh\ntrue\n", user="bob")
    assert lab.wait_job_end(on.job_id) == "COMPLETED"
    assert re.search(
        rf"job {on.job_id} \(bob/physics COMPLETED\): charging", lab.wait_jobcomp(on.job_id)
    )


def test_install_plugin_bumps_mtime_past_the_loaded_one(lab, tmp_path):
    plugin = lab.etc / "job_submit.lua"
    source = plugin.read_text()
    first = int(plugin.stat().st_mtime)
    copy = tmp_path / "job_submit.lua"
    copy.write_text(source)
    second = lab.install_plugin(copy)
    third = lab.install_plugin(copy)
    assert first < second < third
    assert int(plugin.stat().st_mtime) == third
    assert plugin.read_text() == source
    res = lab.sbatch("--hold", script="#!/bin/sh\ntrue\n")
    assert res.job_id is not None, res.stderr
    lab.run("scancel", str(res.job_id))


def test_reset_ledger_empties_every_table(lab, clean_ledger):
    from slurm_quota import db

    conn = db.connect(lab.ledger)
    try:
        with db.write_transaction(conn):
            conn.execute(
                "INSERT INTO users (username, quota_cpu_minutes) VALUES ('reset-probe', 10)"
            )
            conn.execute("INSERT INTO settings (`key`, value) VALUES ('reset-probe', 'v')")
    finally:
        conn.close()
    lab.reset_ledger()
    conn = db.connect(lab.ledger)
    try:
        assert conn.execute("SELECT COUNT(*) FROM users").fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(*) FROM settings").fetchone()[0] == 0
    finally:
        conn.close()
    assert db.schema_version(lab.ledger) == db.latest_version()
