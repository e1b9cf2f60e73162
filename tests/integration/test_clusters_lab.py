"""Two clusters, one ledger (issue 15): the lab's cluster `lab` and a second cluster `lab2`
beside it (tests/integration/cluster2.py: its own slurmctld and slurmd, the same slurmdbd, the
same plugin and ledger), with the ledger setting cluster_keys=yes.

* Both clusters number their jobs from the same id: one job on each with the same id is
  charged twice, under `<id>:<start>@lab` and `<id>:<start>@lab2`.
* Concurrent sbatch bursts on both clusters against one account's CPU-minute quota: the
  accepted reservations never exceed what is left, exactly as many jobs as fit are accepted,
  the others get the quota message; every accepted job is charged exactly once, as each
  cluster's sacct reports it; nothing stays reserved.
* `slurm-quota reconcile` on each cluster charges nothing twice and leaves the other cluster's
  reservations alone.
"""

from __future__ import annotations

import json
import re
import threading
import time

import pytest

from slurm_quota import db
from tests.integration.cluster2 import ClusterBeside, next_job_id
from tests.integration.lab import REPO, LabError

SLEEP = "#!/bin/sh\nsleep 2\n"
KEY = re.compile(r"^(\d+):(\d+)@(\w+)$")
# Each burst job reserves 1 CPU x 10 min; the quota fits FIT of them.
FIT, PER_CLUSTER = 6, 10
JOB_MINUTES = 10
QUOTA = FIT * JOB_MINUTES + JOB_MINUTES // 2


def ledger_rows(lab, sql: str, *args) -> list[tuple]:
    conn = db.connect(lab.ledger, readonly=True)
    try:
        return [tuple(r) for r in conn.execute(sql, args).fetchall()]
    finally:
        conn.close()


@pytest.fixture(scope="module")
def lab2(lab):
    """Cluster lab2 beside the session's lab for this module; its job ids start where the
    lab's next one is, so the two clusters hand out the same ids."""
    second = ClusterBeside(lab, "lab2", port_offset=4, first_job_id=next_job_id(lab))
    try:
        second.up()
    except LabError as err:
        pytest.fail(f"cluster lab2 did not come up beside the lab:\n{err}", pytrace=False)
    try:
        yield second
    finally:
        stopped = second.down()
        assert not second.daemon_pids(), (stopped, second.daemon_pids())


@pytest.fixture
def clusters(lab, lab2):
    """Both clusters idle (their jobcomp runs done), the plugin and wrapper current, an empty
    ledger shared with cluster_keys=yes."""
    for cluster in (lab2, lab):
        for job_id in cluster.cancel_all():
            cluster.wait_jobcomp(job_id)
        cluster.wait_jobcomp_idle()
        cluster.install_plugin(REPO / "lua" / "job_submit.lua")
        cluster.set_jobcomp(True)
    lab.reset_ledger()
    lab.run("slurm-quota", "set-setting", "cluster_keys", "yes")
    return lab, lab2


def sacct_runs(cluster, job_ids) -> dict[int, dict[str, str]]:
    """job id -> its final sacct row (this cluster's accounting only: sacct's default)."""
    return {j: cluster.wait_sacct_final(j, ["AllocCPUS", "ElapsedRaw", "Account"]) for j in job_ids}


def charges(lab) -> list[tuple]:
    return ledger_rows(lab, "SELECT charge_key, job_id, cpus, elapsed_s, cpu_s FROM charges")


def test_the_same_job_id_on_both_clusters_is_charged_twice(clusters):
    lab, lab2 = clusters
    assert next_job_id(lab) == next_job_id(lab2)
    first = lab.sbatch(script=SLEEP)
    second = lab2.sbatch("-n", "2", script=SLEEP)
    assert first.rc == 0 and second.rc == 0, (first.stderr, second.stderr)
    assert first.job_id == second.job_id
    job = first.job_id
    for cluster in (lab, lab2):
        assert cluster.wait_job_end(job) == "COMPLETED"
        cluster.wait_jobcomp(job)
    rows = {r[0]: r for r in charges(lab)}
    assert len(rows) == 2, rows
    by_cluster = {KEY.match(k).group(3): r for k, r in rows.items()}
    assert set(by_cluster) == {"lab", "lab2"}
    for cluster in (lab, lab2):
        got = by_cluster[cluster.cluster]
        run = sacct_runs(cluster, [job])[job]
        assert got[1] == job
        assert (got[2], got[3]) == (int(run["AllocCPUS"]), int(run["ElapsedRaw"]))
    assert by_cluster["lab2"][2] == 2
    consumed = ledger_rows(lab, "SELECT consumed_cpu_s FROM accounts WHERE account = 'research'")
    assert consumed == [(sum(r[4] for r in rows.values()),)]
    assert ledger_rows(lab, "SELECT COUNT(*) FROM jobs_preallocations") == [(0,)]


def burst(cluster, n: int, start: threading.Event, out: list) -> None:
    start.wait()
    for _ in range(n):
        out.append(cluster.sbatch("--hold", f"--time={JOB_MINUTES}", script=SLEEP))


RESERVED_AND_LEFT = (
    "SELECT (SELECT COALESCE(SUM(preallocated_cpu_minutes * COALESCE(array_size, 1)), 0) "
    "FROM jobs_preallocations WHERE account = 'research'), reserved_cpu_minutes, "
    "quota_cpu_minutes - total_consumed_cpu_minutes FROM accounts WHERE account = 'research'"
)


def reserved_and_left(conn) -> tuple[int, int, int]:
    """(Σ preallocated CPU-minutes of account research, its reserved total kept by the
    triggers, quota - consumed minutes), in one statement (one snapshot)."""
    return tuple(int(v) for v in conn.execute(RESERVED_AND_LEFT).fetchone())


def reconcile(cluster, since: int) -> dict:
    out = cluster.run(
        "slurm-quota", "reconcile", "--since", str(since), "--grace", "0", "--json",
        "--spool", str(cluster.spool_dir), timeout=120,
    )  # fmt: skip
    return json.loads(out.stdout)


def test_concurrent_bursts_on_two_clusters_share_one_quota(clusters):
    lab, lab2 = clusters
    # reconcile's window: the next whole second, waited for, so that it holds this test's
    # runs only (the previous test's runs, charged before the ledger was emptied, ended
    # before it; `time() - 1` let reconcile charge one of them again on the sid lab)
    since = int(time.time()) + 1
    while time.time() < since:
        time.sleep(0.05)
    lab.run("slurm-quota", "account-quota", "research", str(QUOTA))
    start = threading.Event()
    results: dict[str, list] = {"lab": [], "lab2": []}
    threads = [
        threading.Thread(target=burst, args=(c, PER_CLUSTER, start, results[c.cluster]))
        for c in (lab, lab2)
    ]
    samples: list[tuple[int, int, int]] = []
    done = threading.Event()

    def watch() -> None:
        # autocommit (MariaDB: READ COMMITTED) / no open transaction (SQLite): each
        # statement sees what is committed now. One last sample after the burst.
        conn = db.connect(lab.ledger, readonly=True)
        try:
            while not done.is_set():
                samples.append(reserved_and_left(conn))
                time.sleep(0.01)
            samples.append(reserved_and_left(conn))
        finally:
            conn.close()

    watcher = threading.Thread(target=watch)
    for t in threads:
        t.start()
    watcher.start()
    t0 = time.monotonic()
    start.set()
    for t in threads:
        t.join(timeout=300)
    burst_s = time.monotonic() - t0
    done.set()
    watcher.join()
    accepted = {name: [r.job_id for r in rs if r.rc == 0] for name, rs in results.items()}
    refused = [r for rs in results.values() for r in rs if r.rc != 0]
    print(f"burst: {burst_s:.1f} s, accepted {accepted}, {len(refused)} refused, "
          f"{len(samples)} ledger samples")  # fmt: skip
    assert all(summed == total <= left for summed, total, left in samples), samples
    # the jobs are held: nothing is charged during the burst, so exactly FIT fit
    assert sum(len(ids) for ids in accepted.values()) == FIT, (accepted, refused)
    assert samples[-1] == (FIT * JOB_MINUTES, FIT * JOB_MINUTES, QUOTA)
    for r in refused:
        assert r.job_id is None
        assert "CPU-minutes than account research has left" in r.stderr, r.stderr

    # A held job on lab2 keeps its reservation through reconcile on both clusters.
    keep = lab2.sbatch("--hold", "--time=1", script=SLEEP)
    assert keep.rc == 0, keep.stderr
    clusters_of = {"lab": lab, "lab2": lab2}
    for name, ids in accepted.items():
        if ids:
            clusters_of[name].run("scontrol", "release", *map(str, ids))
    expected: set[tuple[int, str]] = set()
    runs: dict[tuple[int, str], dict[str, str]] = {}
    for name, ids in accepted.items():
        cluster = clusters_of[name]
        for job in ids:
            assert cluster.wait_job_end(job) == "COMPLETED"
            cluster.wait_jobcomp(job)
            expected.add((job, name))
        runs.update({(j, name): row for j, row in sacct_runs(cluster, ids).items()})

    def check_ledger() -> None:
        rows = charges(lab)
        keys = [KEY.match(r[0]) for r in rows]
        assert all(keys), rows
        got = [(int(k.group(1)), k.group(3)) for k in keys]
        assert sorted(got) == sorted(expected), rows  # each job once, on its own cluster
        for (key, job_id, cpus, elapsed, cpu_s), (job, name) in zip(rows, got):
            run = runs[(job, name)]
            assert job_id == job
            assert (cpus, elapsed) == (int(run["AllocCPUS"]), int(run["ElapsedRaw"])), key
            assert cpu_s == cpus * elapsed
        (consumed, used), = ledger_rows(
            lab, "SELECT consumed_cpu_s, total_consumed_cpu_minutes FROM accounts "
            "WHERE account = 'research'"
        )  # fmt: skip
        assert consumed == sum(r[4] for r in rows)
        assert used <= QUOTA
        left = ledger_rows(
            lab, "SELECT job_uuid, account, cluster FROM jobs_preallocations "
            "WHERE job_uuid NOT LIKE 'orphan-%'"
        )  # fmt: skip
        # lab2's held job only, and its plugin named its cluster (migration 0007)
        assert len(left) == 1 and left[0][1:] == ("research", "lab2"), left

    check_ledger()
    # An orphan of each cluster (no job holds it, made long ago): each cluster's reconcile
    # releases its own only; the other cluster's jobs are not in its squeue or sacct.
    conn = db.connect(lab.ledger)
    try:
        with db.write_transaction(conn):
            for name in ("lab", "lab2"):
                conn.execute(
                    "INSERT INTO jobs_preallocations (job_uuid, username, account, "
                    "preallocated_cpu_minutes, preallocated_gpu_minutes, array_size, created_at, "
                    "cluster) VALUES (?, 'alice', 'research', 1, 0, 1, '2000-01-01 00:00:00', ?)",
                    (f"orphan-{name}", name),
                )
    finally:
        conn.close()
    for cluster in (lab, lab2):
        report = reconcile(cluster, since)
        print(f"reconcile on {cluster.cluster}: {report}")
        ran = len(accepted[cluster.cluster])
        assert (report["runs"], report["already_charged"]) == (ran, ran), report
        assert (report["charged"], report["released_elements"]) == (0, 0), report
        assert report["orphans"] == [f"orphan-{cluster.cluster}"], report
        check_ledger()
    assert ledger_rows(lab, "SELECT COUNT(*) FROM jobs_preallocations WHERE job_uuid LIKE "
                       "'orphan-%'") == [(0,)]
    lab2.run("scancel", str(keep.job_id))
    lab2.wait_job_end(keep.job_id)
    lab2.wait_jobcomp(keep.job_id)
    assert ledger_rows(lab, "SELECT COUNT(*) FROM jobs_preallocations") == [(0,)]
