"""An HA pair of controllers on the real lab: `scontrol takeover` in the middle of a burst of
submissions, both controllers running the plugin against one ledger.

The lab (tests/integration/ha.py) is this module's own: SlurmctldHost=ctl1 (primary) and ctl2
(backup), each slurmctld in its own network/UTS/mount namespace, everything else in the host
namespace. Its directory and ports are the session lab's plus "-ha" and +50, so it runs beside
the session's lab without touching it (a reconfigured session lab would have to be restored
to a single controller afterwards, and every other test relies on it).

The quota fits some but not all of the burst. After every job has ended and `slurm-quota
reconcile` ran: every job Slurm knows (sacct) is charged exactly once with its CPU-seconds
(AllocCPUS x ElapsedRaw), no preallocation is left, every charge released exactly one
reservation, `slurm-quota check` finds no drift, the user's consumed + reserved minutes never
exceeded the quota while the burst ran, and a job accepted by ctl1 before the takeover and
finished under ctl2 is charged. A job the plugin reserved for but Slurm lost (possible when the
takeover races a submission) must be released by reconcile's orphan sweep: asserted, not
hidden.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from slurm_quota import db
from tests import syspkgs
from tests.integration.ha import HALab
from tests.integration.lab import (
    FINAL_STATES,
    LabError,
    session_ledgers,
)

QUOTA_MIN = 60  # alice's CPU-minute quota
JOB_MIN = 10  # each job: 1 CPU, --time=10: a 10-minute reservation
THREADS = 4  # submitting threads (at most 5 jobs fit beside the long job at a time)
TAKEOVER_AFTER = 6  # submissions answered before `scontrol takeover`
AFTER_S = 25.0  # the burst goes on this long once ctl2 answers as the controller
PACE_S = 2.5  # each thread's pause between submissions: jobs end and free quota meanwhile
FIELDS = ["JobIDRaw", "User", "State", "AllocCPUS", "ElapsedRaw", "End", "Partition"]
QUOTA_REFUSAL = "refused: it needs more CPU-minutes"


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="module", params=session_ledgers())
def ha(request):
    """This module's HA lab (up now, down at the end, on failures too)."""
    if os.geteuid() != 0:
        syspkgs.skip_or_fail("the HA lab needs root (namespaces, daemons)")
    if not (shutil.which("ip") and shutil.which("unshare")):
        syspkgs.skip_or_fail("the HA lab needs ip (iproute2) and unshare (util-linux)")
    # the session lab's directory and ports (env or defaults) + "-ha" and +50
    probe = HALab(ledger=request.param)
    lab = HALab(f"{probe.root}-ha", probe.port_base + 50, probe.release, request.param)
    owned = [True]

    def stop() -> dict[str, int]:
        if not owned[0]:
            return {}
        owned[0] = False
        return lab.down()

    # as the session lab: an exit that skips finalization, and SIGTERM (a CI timeout)
    atexit.register(stop)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        took = lab.up()
    except LabError as err:
        stop()
        pytest.fail(f"the HA lab did not come up:\n{err}", pytrace=False)
    print(f"[ha lab] up in {took:.1f} s in {lab.root}, {request.param} ledger")
    try:
        yield lab
    finally:
        t0 = time.monotonic()
        stopped = stop()
        print(f"[ha lab] down in {time.monotonic() - t0:.1f} s: {stopped}")
        assert not lab.daemon_pids(), lab.daemon_pids()
        assert not any(Path(f"/run/netns/{c['netns']}").exists() for c in lab.ctl.values())


def rows(lab, sql: str, *args):
    conn = db.connect(lab.ledger, readonly=True)
    try:
        return [tuple(r) for r in conn.execute(sql, args).fetchall()]
    finally:
        conn.close()


def window_start() -> str:
    t0 = int(time.time()) + 1
    while time.time() < t0:
        time.sleep(0.05)
    return str(t0)


class Sampler(threading.Thread):
    """Polls alice's consumed + reserved CPU minutes (one statement: one snapshot)."""

    SQL = (
        "SELECT u.total_consumed_cpu_minutes + COALESCE((SELECT SUM("
        "p.preallocated_cpu_minutes * p.array_size) FROM jobs_preallocations p "
        "WHERE p.username = 'alice'), 0) FROM users u WHERE u.username = 'alice'"
    )

    def __init__(self, lab):
        super().__init__(daemon=True)
        self.lab = lab
        self.stop = threading.Event()
        self.samples: list[int] = []
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                got = rows(self.lab, self.SQL)
                if got:
                    self.samples.append(int(got[0][0]))
            except Exception as err:  # noqa: BLE001 - a busy SQLite file: sample again
                self.errors.append(f"{type(err).__name__}: {err}")
            time.sleep(0.2)


def _sacct_final(r: dict[str, str]) -> bool:
    return (
        (r["State"].split() or [""])[0] in FINAL_STATES
        and r["End"] != "Unknown"
        and bool(r["Partition"])
    )


def _seconds(text: str) -> int:
    """[D-]HH:MM:SS (scontrol's RunTime) in seconds."""
    days, _, hms = text.rpartition("-")
    h, m, sec = (int(x) for x in hms.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + sec


def ctld_jobs(lab) -> dict[int, dict]:
    """The jobs slurmctld holds: id -> state, cpus, run_s (from `scontrol -o show job`)."""
    out = lab.run("scontrol", "-o", "show", "job", check=False).stdout
    jobs = {}
    for line in out.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "JobId" in fields:
            jobs[int(fields["JobId"])] = {
                "state": fields.get("JobState"),
                "cpus": int(fields.get("NumCPUs", 0)),
                "run_s": _seconds(fields.get("RunTime", "0:0:0")),
            }
    return jobs


def _dbd_agent_queue(lab) -> int:
    out = lab.run("sdiag", check=False).stdout
    m = re.search(r"DBD Agent queue size:\s*(\d+)", out)
    return int(m.group(1)) if m else -1


def submit_with_retry(lab, log: list, lock: threading.Lock, i: int) -> None:
    """One submission of the burst; a failure that is not the plugin's quota refusal is
    transient (the controllers are changing hands): counted and retried."""
    script = f"#!/bin/sh\nsleep {2 + i % 3}\n"
    transient = []
    for _ in range(15):
        at = time.monotonic()
        res = lab.sbatch(f"--time={JOB_MIN}", "-J", f"burst{i}", script=script)
        if res.rc == 0 or QUOTA_REFUSAL in res.stderr:
            break
        transient.append(res.stderr.strip())
        time.sleep(1)
    else:
        raise AssertionError(f"submission {i} kept failing: {transient}")
    with lock:
        log.append({"i": i, "at": at, "res": res, "transient": transient})


def test_takeover_mid_burst_keeps_charges_and_reservations_exact(ha):
    lab = ha
    lab.reset_ledger()
    t0 = window_start()
    lab.run(lab.quota_bin, "user-quota", "alice", str(QUOTA_MIN))
    assert set(lab.ping()) == {"ctl1", "ctl2"} and "primary" in lab.ping()["ctl1"]

    # Accepted by ctl1 and still running when ctl2 takes over.
    long = lab.sbatch(f"--time={JOB_MIN}", "-J", "long", script="#!/bin/sh\nsleep 14\n")
    assert long.rc == 0, long.stderr
    deadline = time.monotonic() + 60
    while lab.job_state(long.job_id) != "RUNNING":
        assert time.monotonic() < deadline, "the long job never started"
        time.sleep(0.2)

    sampler = Sampler(lab)
    sampler.start()
    log: list[dict] = []
    lock = threading.Lock()
    counter = iter(range(10**6))
    end = {"at": None}  # set once ctl2 has taken over
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                if end["at"] is not None and time.monotonic() >= end["at"]:
                    return
                i = next(counter)
            try:
                submit_with_retry(lab, log, lock, i)
            except BaseException as err:  # noqa: BLE001 - reported by the main thread
                errors.append(err)
                return
            time.sleep(PACE_S)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(THREADS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while len(log) < TAKEOVER_AFTER:
        assert time.monotonic() < deadline and not errors, (len(log), errors)
        time.sleep(0.05)
    assert lab.job_state(long.job_id) == "RUNNING"
    takeover_at = time.monotonic()
    took = lab.run("scontrol", "takeover", check=False, timeout=60)
    assert took.returncode == 0, took.stdout + took.stderr
    deadline = time.monotonic() + 60
    while True:
        ping = lab.ping()
        if "is UP" in ping.get("ctl2", "") and "is UP" not in ping.get("ctl1", ""):
            break
        assert time.monotonic() < deadline, f"ctl2 never took over: {ping}"
        time.sleep(0.5)
    taken_at = time.monotonic()
    with lock:
        end["at"] = taken_at + AFTER_S
    for t in threads:
        t.join(timeout=300)
    sampler.stop.set()
    sampler.join()
    assert not errors, errors
    submitted = len(log)
    assert "Running as primary controller" in lab.logs("slurmctld2")

    accepted = {e["res"].job_id: e for e in log if e["res"].rc == 0}
    refused = [e for e in log if e["res"].rc != 0]
    after = [j for j, e in accepted.items() if e["at"] > taken_at]
    transient = [m for e in log for m in e["transient"]]
    summary = {
        "release": lab.release,
        "ledger": lab.ledger_type,
        "submissions": submitted,
        "accepted": len(accepted),
        "refused": len(refused),
        "accepted_after_takeover": len(after),
        "transient_errors": len(transient),
        "transient_messages": sorted(set(transient))[:5],
        "takeover_s": round(taken_at - takeover_at, 1),
        "max_reserved_plus_consumed": max(sampler.samples, default=None),
        "samples": len(sampler.samples),
    }
    print(f"[ha burst] {json.dumps(summary)}")
    assert accepted and refused, summary  # the quota fits some, not all
    assert after, summary  # the burst went on against ctl2
    # the quota was never exceeded while the burst ran (consumed + reserved, one snapshot)
    assert sampler.samples and max(sampler.samples) <= QUOTA_MIN, summary

    ours = {long.job_id, *accepted}
    for job_id in sorted(ours):
        lab.wait_job_end(job_id, timeout=180)
    lab.wait_jobcomp_idle(quiet_s=1.0, timeout=120)

    # every job Slurm has (also any a retried sbatch created twice): slurmctld's own records
    # (finished jobs stay MinJobAge = 300 s) and sacct's, each final
    ctld = ctld_jobs(lab)
    started = time.monotonic()
    deadline = started + 60
    while True:
        since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(int(t0)))
        proc = lab.run("sacct", "-a", "-X", "-n", "-P", "-S", since, "-o", ",".join(FIELDS))
        runs = {}
        for line in proc.stdout.splitlines():
            r = dict(zip(FIELDS, line.split("|")))
            runs[int(r["JobIDRaw"])] = r
        stale = sorted(j for j in set(ctld) | ours if j not in runs or not _sacct_final(runs[j]))
        if not stale or time.monotonic() > deadline:
            break
        if time.monotonic() > started + 15 and _dbd_agent_queue(lab) > 0:
            break  # the controller holds them back (see below): waiting does not help
        time.sleep(0.5)
    for job_id, j in ctld.items():
        assert j["state"] in FINAL_STATES, (job_id, j)
    known = set(runs) | set(ctld)
    lost = sorted(ours - known)
    dbd_queue = _dbd_agent_queue(lab)
    summary.update(sacct_stale=stale, dbd_agent_queue=dbd_queue, lost=lost)
    print(f"[ha accounting] {json.dumps(summary)}")
    if stale:
        # Seen on 26.05 only: after the takeover ctl2 queued its accounting records and never
        # sent them (sdiag's "DBD Agent queue size" grows; they are saved to dbd.messages at
        # its shutdown). Not lost, not the plugin's: asserted, and checked against slurmctld.
        assert dbd_queue > 0, summary

    rep = lab.run(lab.quota_bin, "reconcile", "--since", t0, "--grace", "0", "--json",
                  "--spool", str(lab.spool_dir), check=False)  # fmt: skip
    assert rep.returncode == 0, rep.stdout + rep.stderr
    report = json.loads(rep.stdout)
    print(f"[ha reconcile] lost={lost} {json.dumps(report)}")
    # A job Slurm lost after the plugin reserved for it: the orphan sweep releases it.
    assert len(report["orphans"]) == len(lost), (lost, report)

    charges = rows(lab, "SELECT job_id, cpu_s, job_uuid, released_prealloc FROM charges")
    per_job: dict[int, list] = {}
    for job_id, cpu_s, uuid, released in charges:
        per_job.setdefault(int(job_id), []).append((cpu_s, uuid, released))
    assert sorted(per_job) == sorted(known), (sorted(per_job), sorted(known))
    for job_id in sorted(known):
        assert len(per_job[job_id]) == 1, (job_id, per_job[job_id])  # charged exactly once
        cpu_s, uuid, released = per_job[job_id][0]
        if job_id in runs and job_id not in stale:
            r = runs[job_id]
            assert cpu_s == int(r["AllocCPUS"]) * int(r["ElapsedRaw"]), (job_id, r, cpu_s)
        if job_id in ctld:
            j = ctld[job_id]
            assert cpu_s == j["cpus"] * j["run_s"], (job_id, j, cpu_s)
        assert uuid and released == 1, (job_id, uuid, released)  # its one reservation
    assert len({c[2] for c in charges}) == len(charges)  # no reservation shared or doubled
    assert long.job_id in per_job  # accepted by ctl1, finished under ctl2
    assert rows(lab, "SELECT COUNT(*) FROM jobs_preallocations") == [(0,)]
    consumed = rows(lab, "SELECT consumed_cpu_s, total_consumed_cpu_minutes FROM users "
                         "WHERE username = 'alice'")  # fmt: skip
    assert consumed == [(sum(c[1] for c in charges), -(-sum(c[1] for c in charges) // 60))]
    assert consumed[0][1] <= QUOTA_MIN
    check = lab.run(lab.quota_bin, "check", "--json", check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    checked = json.loads(check.stdout)
    assert checked["reserved_drift"] == [] and checked["consumed_drift"] == []
