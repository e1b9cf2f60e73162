"""lua/job_submit.lua inside a real slurmctld (22.05, 24.11 or 26.05: the lab's release):
decisions, messages, rows, updates.

Jobs are submitted held (--hold) so that nothing runs and the reservations stay in place while
they are checked; the clean_ledger fixture cancels them afterwards. Het jobs never start on
this one-node lab (SLURM-FACTS gotcha 9): they are only submitted, held, and cancelled.
"""

from __future__ import annotations

import re

import pytest

from slurm_quota import db

TOKEN = re.compile(r"slurm-quota:([0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12})")
SCRIPT = "#!/bin/sh\ntrue\n"


def ledger(lab, sql, *args):
    """Rows of a query on the lab's ledger (SQLite or MariaDB), as tuples."""
    conn = db.connect(lab.ledger, readonly=True)
    try:
        return [tuple(r) for r in conn.execute(sql, args).fetchall()]
    finally:
        conn.close()


def write(lab, sql, *args):
    """One statement in its own write transaction on the lab's ledger."""
    conn = db.connect(lab.ledger)
    try:
        with db.write_transaction(conn):
            conn.execute(sql, args)
    finally:
        conn.close()


def admin_comment(lab, job_id):
    out = lab.run("scontrol", "-o", "show", "job", str(job_id)).stdout
    m = re.search(r"AdminComment=(.*?)(?= \w+=|$)", out)
    return m.group(1).strip() if m else ""


def job_uuid(lab, job_id):
    found = TOKEN.findall(admin_comment(lab, job_id))
    assert found, admin_comment(lab, job_id)
    return found[-1]


def row(lab, uuid):
    found = ledger(
        lab,
        "SELECT username, account, preallocated_cpu_minutes, preallocated_gpu_minutes, "
        "array_size FROM jobs_preallocations WHERE job_uuid = ?",
        uuid,
    )
    return found[0] if found else None


def time_limit(lab, job_id):
    out = lab.run("scontrol", "-o", "show", "job", str(job_id)).stdout
    return re.search(r"TimeLimit=(\S+)", out).group(1)


@pytest.fixture
def plab(clean_ledger):
    """The lab with the current plugin installed and an empty ledger."""
    from tests.integration.lab import REPO

    clean_ledger.install_plugin(REPO / "lua" / "job_submit.lua")
    return clean_ledger


# sbatch options -> (cpu minutes, gpu minutes, array size) per element; partition main has
# DefaultTime 30 min and one 16-CPU node with gpu:h100:2,gpu:a100:2; all factors 1.
FAMILIES = [
    ([], (30, 0, 1)),
    (["--time=10"], (10, 0, 1)),
    (["-n", "4"], (120, 0, 1)),
    (["-c", "4"], (120, 0, 1)),
    (["-n", "2", "-c", "3", "--time=10"], (60, 0, 1)),
    (["-N", "1", "--ntasks-per-node=3"], (90, 0, 1)),
    (["--exclusive", "--time=10"], (160, 0, 1)),
    (["--array=0-9"], (30, 0, 10)),
    (["--array=0-15:4%2", "--time=5"], (5, 0, 4)),
    (["--gres=gpu:h100:2", "--time=10"], (10, 20, 1)),
    (["--gres=gpu:1", "--time=10"], (10, 10, 1)),
    (["--gpus=a100:1", "--time=10"], (10, 10, 1)),
    (["--gpus=2", "--time=10"], (10, 20, 1)),
    (["--gpus-per-task=1", "-n", "2", "--time=10"], (20, 20, 1)),
    (["--gpus-per-node=a100:1", "--time=10"], (10, 10, 1)),
    (["--cpus-per-gpu=2", "--gpus=1", "--time=10"], (20, 10, 1)),
    (["--gpus-per-socket=1", "--sockets-per-node=1", "--time=10"], (10, 10, 1)),
]


@pytest.mark.parametrize(
    "args, expected", FAMILIES, ids=[" ".join(a) or "plain" for a, _ in FAMILIES]
)
def test_option_family_is_preallocated(plab, args, expected):
    res = plab.sbatch("--hold", *args, script=SCRIPT)
    assert res.rc == 0, res.stderr
    assert res.stderr == ""
    uuid = job_uuid(plab, res.job_id)
    assert row(plab, uuid) == ("alice", "research") + expected


def test_other_account_and_typed_factor(plab):
    write(plab, "INSERT INTO gpu_factors (gpu_type, factor) VALUES ('h100', 2.5)")
    res = plab.sbatch("--hold", "-A", "physics", "--gres=gpu:h100:2", "--time=10", script=SCRIPT)
    assert res.rc == 0, res.stderr
    uuid = job_uuid(plab, res.job_id)
    assert row(plab, uuid) == ("alice", "physics", 10, 50, 1)
    # the cluster of the slurm.conf beside the lab's job_submit.lua (migration 0007)
    assert ledger(plab, "SELECT cluster FROM jobs_preallocations WHERE job_uuid = ?", uuid) == [
        ("lab",)
    ]


def test_exclusive_takes_the_node_gpus_from_the_setting(plab):
    write(plab, "INSERT INTO settings (`key`, value) VALUES ('node_gpus', 'gpu:h100:2,gpu:a100:2')")
    res = plab.sbatch("--hold", "--exclusive", "--time=10", script=SCRIPT)
    assert row(plab, job_uuid(plab, res.job_id)) == ("alice", "research", 160, 40, 1)


def test_het_job_components_each_get_a_row(plab):
    res = plab.sbatch(
        "--hold", "-n1", "--time=5", ":", "-n2", "-c2", "--gres=gpu:a100:1", script=SCRIPT
    )
    assert res.rc == 0, res.stderr
    rows = ledger(
        plab,
        "SELECT preallocated_cpu_minutes, preallocated_gpu_minutes "
        "FROM jobs_preallocations ORDER BY preallocated_cpu_minutes",
    )
    assert rows == [(5, 0), (20, 5)]
    plab.run("scancel", str(res.job_id))


def test_over_quota_is_refused_with_the_message_on_stderr(plab):
    write(
        plab,
        "INSERT INTO users (username, quota_cpu_minutes, total_consumed_cpu_minutes, "
        "consumed_cpu_s) VALUES ('alice', 1000, 400, 24000)",
    )
    first = plab.sbatch("--hold", "-n", "10", "--time=10", script=SCRIPT)  # 100
    assert first.rc == 0, first.stderr
    res = plab.sbatch(
        "--hold", "--job-name=train", "-c", "4", "--time=60", "--array=0-9", script=SCRIPT
    )
    print(res.stderr)
    assert res.rc == 1
    assert res.job_id is None
    lines = res.stderr.splitlines()
    assert lines == [
        'sbatch: error: slurm-quota: job "train" refused: it needs more CPU-minutes than '
        "user alice has left.",
        "sbatch: error: slurm-quota:   requested: 2400 CPU-minutes = 4 CPUs x 60 min x 10 "
        "array elements",
        "sbatch: error: slurm-quota:   available: 500 CPU-minutes = quota 1000 - consumed 400 - "
        "reserved 100 by 1 queued/running job",
        "sbatch: error: slurm-quota:   hint: --time=12 or less would fit; or 2 array elements "
        "would fit; or fewer CPUs; or ask your administrators for more quota. Usage: "
        "slurm-quota stats",
        "sbatch: error: Batch job submission failed: Job violates accounting/QOS policy (job "
        "submit limit, user's size and/or time limits)",
    ]
    assert ledger(plab, "SELECT COUNT(*) FROM jobs_preallocations") == [(1,)]
    assert "slurm-quota: refused user=alice" in plab.logs("slurmctld")


def test_account_quota_refusal_suggests_another_account(plab):
    write(plab, "INSERT INTO accounts (account, quota_gpu_minutes) VALUES ('research', 10)")
    res = plab.sbatch("--hold", "--gpus=h100:1", "--time=30", script=SCRIPT)
    assert res.rc == 1
    assert "GPU-minutes than account research has left" in res.stderr
    assert "another account of yours (-A/--account)" in res.stderr
    ok = plab.sbatch("--hold", "-A", "physics", "--gpus=h100:1", "--time=30", script=SCRIPT)
    assert ok.rc == 0, ok.stderr


def test_root_is_never_refused(plab):
    write(plab, "INSERT INTO users (username, quota_cpu_minutes) VALUES ('root', 0)")
    res = plab.sbatch("--hold", "--time=10", user="root", script=SCRIPT)
    assert res.rc == 0, res.stderr
    assert row(plab, job_uuid(plab, res.job_id)) == ("root", "research", 10, 0, 1)


def set_alice_cpu_quota(lab, minutes):
    if ledger(lab, "SELECT COUNT(*) FROM users WHERE username = 'alice'") == [(0,)]:
        write(lab, "INSERT INTO users (username, quota_cpu_minutes) VALUES ('alice', ?)", minutes)
    else:
        write(lab, "UPDATE users SET quota_cpu_minutes = ? WHERE username = 'alice'", minutes)


def test_hold_release_and_time_updates_by_user_and_root(plab):
    # --begin keeps it pending once released, so release/priority can be exercised
    res = plab.sbatch("--hold", "--begin=now+3600", "--time=20", "-n", "2", script=SCRIPT)
    job = str(res.job_id)
    uuid = job_uuid(plab, res.job_id)
    assert row(plab, uuid)[2] == 40
    # quota now too small for a re-check from scratch: hold/release must not care
    set_alice_cpu_quota(plab, 10)
    plab.run("scontrol", "release", job, user="alice")
    plab.run("scontrol", "hold", job, user="alice")
    plab.run("scontrol", "release", job)
    plab.run("scontrol", "update", f"jobid={job}", "priority=10")
    plab.run("scontrol", "update", f"jobid={job}", "nice=50", user="alice")
    plab.run("scontrol", "hold", job)
    assert row(plab, uuid)[2] == 40
    # alice lowers her time limit: the reservation follows
    plab.run("scontrol", "update", f"jobid={job}", "TimeLimit=15", user="alice")
    assert time_limit(plab, job) == "00:15:00"
    assert row(plab, uuid)[2] == 30
    # alice raises it beyond MaxTime (240): slurmctld denies after the plugin ran
    denied = plab.run("scontrol", "update", f"jobid={job}", "TimeLimit=300", user="alice",
                      check=False)
    assert denied.returncode != 0
    assert time_limit(plab, job) == "00:15:00"
    assert row(plab, uuid)[2] == 30
    # within MaxTime a user may raise a pending job's limit: checked against her quota
    over = plab.run("scontrol", "update", f"jobid={job}", "TimeLimit=100", user="alice",
                    check=False)
    assert over.returncode != 0
    assert time_limit(plab, job) == "00:15:00"
    assert row(plab, uuid)[2] == 30
    set_alice_cpu_quota(plab, 1000)
    plab.run("scontrol", "update", f"jobid={job}", "TimeLimit=100", user="alice")
    assert time_limit(plab, job) == "01:40:00"
    assert row(plab, uuid)[2] == 200
    # root raises it over alice's quota: never refused, the reservation follows
    set_alice_cpu_quota(plab, 10)
    plab.run("scontrol", "update", f"jobid={job}", "TimeLimit=240")
    assert time_limit(plab, job) == "04:00:00"
    assert row(plab, uuid)[2] == 480


def test_user_increase_over_quota_is_refused(plab):
    res = plab.sbatch("--hold", "--time=10", script=SCRIPT)
    uuid = job_uuid(plab, res.job_id)
    set_alice_cpu_quota(plab, 30)
    out = plab.run(
        "scontrol", "update", f"jobid={res.job_id}", "NumCPUs=8", user="alice", check=False
    )
    assert out.returncode != 0
    assert row(plab, uuid)[2] == 10
    assert "refused update of user=alice" in plab.logs("slurmctld")


def series(lab) -> tuple[int, int]:
    """The lab's Slurm major.minor, e.g. (24, 11)."""
    major, minor = lab.slurm_version().split(".")[:2]
    return int(major), int(minor)


def test_refused_update_tells_the_user_why_with_numbers(plab):
    res = plab.sbatch("--hold", "--job-name=tune", "--time=10", script=SCRIPT)
    uuid = job_uuid(plab, res.job_id)
    set_alice_cpu_quota(plab, 30)
    out = plab.run(
        "scontrol", "update", f"jobid={res.job_id}", "TimeLimit=60", user="alice", check=False
    )
    print(out.stderr)
    assert out.returncode != 0
    assert time_limit(plab, res.job_id) == "00:10:00"
    assert row(plab, uuid)[2] == 10
    why = [
        f'slurm-quota: job {res.job_id} "tune" refused: it needs more CPU-minutes than user '
        "alice has left.",
        "slurm-quota:   requested: 60 CPU-minutes = 1 CPU x 60 min",
        "slurm-quota:   available: 30 CPU-minutes = quota 30 - consumed 0 - reserved 0 by 0 "
        "queued/running jobs",
    ]
    log = plab.logs("slurmctld")
    assert all(line in log for line in why)
    if series(plab) >= (23, 2):
        # since 23.02 scontrol prints job_modify's log_user to the user
        assert all(line in out.stderr for line in why), out.stderr
    else:
        # 22.05 drops it: the user sees only Slurm's generic error
        assert "slurm-quota" not in out.stderr


def test_quota_above_32_bits_is_enforced_inside_slurmctld(plab):
    # lua-dbi-sqlite3 <= 0.7.4 reads INTEGER columns as 32-bit (3e9 came back negative:
    # unlimited); the plugin reads its numbers as REAL.
    big = 3_000_000_000
    write(plab, "INSERT INTO users (username, quota_cpu_minutes, total_consumed_cpu_minutes, "
                "consumed_cpu_s) VALUES ('alice', ?, ?, ?)", big, big - 20,
                (big - 20) * 60)  # fmt: skip
    refused = plab.sbatch("--hold", "--time=30", script=SCRIPT)
    assert refused.rc == 1, refused.stderr
    assert (
        "available: 20 CPU-minutes = quota 3000000000 - consumed 2999999980 - reserved 0"
        in refused.stderr
    )
    fits = plab.sbatch("--hold", "--time=20", script=SCRIPT)
    assert fits.rc == 0, fits.stderr
    assert row(plab, job_uuid(plab, fits.job_id))[2] == 20


def test_admin_comment_rewrite_keeps_the_token(plab):
    res = plab.sbatch("--hold", "--time=10", script=SCRIPT)
    uuid = job_uuid(plab, res.job_id)
    plab.run("scontrol", "update", f"jobid={res.job_id}", "AdminComment=checked by ops")
    assert admin_comment(plab, res.job_id) == f"checked by ops slurm-quota:{uuid}"
