"""Issue 15 on the real lab: the MariaDB server of a MariaDB ledger killed with SIGKILL in the
middle of a burst of submissions and completions, then started again.

While the server is away: every submission is decided at once by the plugin's failure policy
(fail-open: accepted without a token; fail-closed: refused with the message), the plugin logs
that it did, and jobcomp charges that fail are spooled by the charge wrapper. After the
restart (InnoDB crash recovery) the circuit breaker lets the next submission after RETRY_S
reserve again, and after `slurm-quota reconcile` every run of the burst in sacct is charged
exactly once (CPU-seconds equal to sacct's), the spool is empty, no preallocation is left,
and a second reconcile changes nothing.

The teardown starts mariadbd again if the test left it dead, and checks that the ledger and
slurmdbd answer: the session's lab is used by the tests after this one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.integration.lab import REPO, LabError, alive
from tests.integration.test_charge_lab import (
    assert_exact,
    assert_ledger_consistent,
    charged_runs,
    compare,
    ledger_rows,
    runs_of,
    window_start,
)

pytestmark = pytest.mark.ledger("mariadb")

TOKEN = re.compile(r"slurm-quota:[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}")
MODULE = (REPO / "lua" / "slurm_quota.lua").read_text()
FAIL_OPEN = re.search(r"^local FAIL_OPEN = (true|false)$", MODULE, re.M).group(1) == "true"
RETRY_S = int(re.search(r"^local RETRY_S = (\d+)$", MODULE, re.M).group(1))
# Bound on one sbatch's wall time while the ledger is down: the plugin's decision takes
# milliseconds (the breaker answers without touching the network); the rest is sbatch and
# slurmctld on a loaded 2-core machine.
SBATCH_BOUND_S = 5.0
THREADS = 3
PAUSE_S = 0.7  # between two submissions of one thread
BEFORE_KILL_S = 4.0
MIN_OUTAGE_S = RETRY_S + 3.0  # at least one breaker retry fails while the server is away


def admin_comment(lab, job_id: int) -> str:
    out = lab.run("scontrol", "-o", "show", "job", str(job_id), check=False).stdout
    m = re.search(r"AdminComment=(.*?)(?= \w+=|$)", out)
    return m.group(1).strip() if m else ""


def has_token(lab, job_id: int) -> bool:
    text = admin_comment(lab, job_id)
    if not text:  # slurmctld no longer holds the job: ask accounting
        rows = lab.sacct(job_id, ["JobIDRaw", "AdminComment"])
        text = " ".join(r["AdminComment"] for r in rows if r["JobIDRaw"] == str(job_id))
    return bool(TOKEN.search(text))


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def charge_connected(lab) -> bool:
    """True when a `slurm-quota charge` run by the lab's wrapper has an established TCP
    connection to the lab's MariaDB now."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"charge" in argv and any(a.endswith(b"slurm-quota") for a in argv):
                pids.append(int(entry))
    if not pids:
        return False
    inodes = set().union(*(_socket_inodes(pid) for pid in pids))
    port = f"{lab.mysql_port:04X}"
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        f = line.split()
        if f[2].endswith(":" + port) and f[3] == "01" and f[9] in inodes:
            return True
    return False


class Burst:
    """THREADS threads submitting short jobs (sleep 1-4 s, unique names) until stopped;
    every sbatch's start, wall time and result are recorded."""

    def __init__(self, lab):
        self.lab = lab
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.records: list[dict] = []
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(THREADS)]

    def _run(self, index: int) -> None:
        n = 0
        try:
            while not self.stop.is_set():
                name = f"burst-{index}-{n}"
                script = f"#!/bin/sh\nsleep {1 + (index + n) % 4}\n"
                began = time.monotonic()
                res = self.lab.sbatch("-J", name, "--time=5", script=script)
                wall = time.monotonic() - began
                with self.lock:
                    self.records.append({"name": name, "began": began, "wall": wall,
                                         "rc": res.rc, "job_id": res.job_id,
                                         "stderr": res.stderr})  # fmt: skip
                n += 1
                self.stop.wait(PAUSE_S)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.errors.append(err)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(120)


@pytest.fixture
def klab(clean_ledger):
    """The lab with the current plugin and the charge wrapper; afterwards mariadbd, the ledger
    and slurmdbd answer again (restarted here when the test left mariadbd dead)."""
    lab = clean_ledger
    lab.install_plugin(REPO / "lua" / "job_submit.lua")
    lab.set_jobcomp(True)
    for f in lab.spool_dir.glob("*.env"):
        f.unlink()
    try:
        yield lab
    finally:
        if "mariadbd" not in lab.daemon_pids():
            lab.restart_mariadb()
        assert lab._ledger_answers(), "the ledger does not answer after the test"
        assert lab._ok("sacctmgr", "-n", "list", "cluster"), "slurmdbd does not answer"
        lab.cancel_all()
        lab.wait_jobcomp_idle()
        for f in lab.spool_dir.glob("*.env"):
            f.unlink()


def _logged_policy(lab, name: str) -> bool:
    verdict = "ACCEPTED WITHOUT QUOTA CHECK (fail-open)" if FAIL_OPEN else "REFUSED (fail-closed)"
    needle = f'job="{name}" {verdict}'
    return any(needle in line for line in lab.logs("slurmctld").splitlines())


def test_mariadb_killed_mid_burst_loses_and_doubles_no_charge(klab):
    lab = klab
    t_test = time.monotonic()
    t0 = window_start()
    spooled: set[str] = set()
    with Burst(lab) as burst:
        time.sleep(BEFORE_KILL_S)
        # Kill while a jobcomp charge holds its connection to the ledger (it connects, then
        # asks scontrol for the job's allocation, then writes), else while a wrapper runs.
        deadline = time.monotonic() + 15
        mid_charge = False
        while time.monotonic() < deadline:
            mid_charge = charge_connected(lab)
            if mid_charge:
                break
        if not mid_charge:
            while not lab._wrapper_running() and time.monotonic() < deadline + 5:
                time.sleep(0.01)
        pid = lab.daemon_pids()["mariadbd"]
        recoveries = lab.logs("mysqld").count("Starting crash recovery")
        charge_log_at_kill = len(lab.logs("charge"))
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        while alive(pid):
            time.sleep(0.05)
        # The outage lasts until some jobcomp charge failed and was spooled, and at least one
        # breaker retry found the server away.
        deadline = killed_at + 60
        while time.monotonic() < deadline:
            spooled |= {f.name for f in lab.spool_dir.glob("*.env")}
            if spooled and time.monotonic() - killed_at >= MIN_OUTAGE_S:
                break
            time.sleep(0.2)
        restart_at = time.monotonic()
        restart_s = lab.restart_mariadb()
        back_at = time.monotonic()
        # Keep submitting across the breaker's window after the restart.
        time.sleep(RETRY_S + 1.0)
    assert not burst.errors, burst.errors
    # The restarted server recovered InnoDB from the crash before it answered.
    assert lab.logs("mysqld").count("Starting crash recovery") > recoveries
    spooled |= {f.name for f in lab.spool_dir.glob("*.env")}
    assert spooled, "no jobcomp charge failed while the server was away"
    assert "charge failed" in lab.logs("charge")[charge_log_at_kill:]

    # The breaker closed again: a submission now reserves (RETRY_S has passed since the last
    # failed attempt, made before the server answered again).
    after = lab.sbatch("-J", "after-restart", "--time=5", script="#!/bin/sh\nsleep 1\n")
    assert after.rc == 0, after.stderr
    assert has_token(lab, after.job_id), admin_comment(lab, after.job_id)

    records = sorted(burst.records, key=lambda r: r["began"])
    during = [r for r in records if r["began"] > killed_at and r["began"] + r["wall"] < restart_at]
    before = [r for r in records if r["began"] + r["wall"] < killed_at]
    assert before and len(during) >= 3, (len(before), len(during))
    walls = [r["wall"] for r in during]
    assert max(walls) < SBATCH_BOUND_S, walls
    for r in before:
        assert r["rc"] == 0, r
        assert has_token(lab, r["job_id"]), r
    for r in during:
        if FAIL_OPEN:
            assert r["rc"] == 0, r
            assert not has_token(lab, r["job_id"]), r
        else:
            assert r["rc"] != 0 and "could not be checked" in r["stderr"], r
        assert _logged_policy(lab, r["name"]), r["name"]

    ids = {r["name"]: r["job_id"] for r in records if r["job_id"] is not None}
    ids["after-restart"] = after.job_id
    runs = runs_of(lab, ids, len(ids), timeout=180)
    for job_id in ids.values():
        lab.wait_jobcomp(job_id, timeout=120)
    lab.wait_jobcomp_idle()
    spooled |= {f.name for f in lab.spool_dir.glob("*.env")}
    left_before = len(list(lab.spool_dir.glob("*.env")))

    def reconcile(since: str) -> dict:
        p = lab.run(lab.quota_bin, "reconcile", "--since", since, "--grace", "0", "--json",
                    "--spool", str(lab.spool_dir), check=False)  # fmt: skip
        assert p.returncode == 0, p.stdout + p.stderr
        return json.loads(p.stdout)

    # 1. The spool alone (a window after the burst: accounting adds nothing): every failed
    # charge is replayed from its spooled environment, each file removed once committed.
    spool_only = reconcile(str(int(time.time())))
    assert spool_only["charged"] == 0 and spool_only["spool_kept"] == [], spool_only
    assert spool_only["spool_replayed"] + spool_only["spool_removed"] == left_before
    assert spool_only["spool_replayed"] >= 1, spool_only
    assert list(lab.spool_dir.glob("*.env")) == []
    # 2. The burst's window: accounting finds no run left uncharged (every failed jobcomp
    # charge was spooled), and the reservations nobody charged any more are released.
    rep = reconcile(t0)
    assert rep["charged"] == 0 and rep["spool_replayed"] == 0, rep
    result = compare(lab, runs)
    assert_exact(result)
    assert result["runs"] == len(ids) and result["charges"] == len(ids)
    assert ledger_rows(lab, "SELECT COUNT(*) FROM jobs_preallocations") == [(0,)]
    assert_ledger_consistent(lab)
    # 3. Once more: nothing changes.
    charges = charged_runs(lab)
    rep2 = reconcile(t0)
    assert rep2["charged"] == 0 and rep2["spool_replayed"] == 0 and rep2["orphans"] == [], rep2
    assert charged_runs(lab) == charges
    assert compare(lab, runs) == result

    errors = [ln for ln in lab.logs("charge")[charge_log_at_kill:].splitlines()
              if ln.startswith("slurm-quota: error")]  # fmt: skip
    sources = {s for (s,) in ledger_rows(lab, "SELECT DISTINCT source FROM charges")}
    summary = {
        "jobs": len(ids), "before": len(before), "during": len(during),
        "during_max_sbatch_s": round(max(walls), 3), "spooled": len(spooled),
        "killed_mid_charge": mid_charge, "charge_errors": len(errors),
        "charge_errors_refused": sum("Connection refused" in e for e in errors),
        "spool_replayed": spool_only["spool_replayed"],
        "spool_removed": spool_only["spool_removed"],
        "orphans_released": len(rep["orphans"]), "sources": sorted(sources),
        "outage_s": round(back_at - killed_at, 1), "restart_s": round(restart_s, 1),
        "test_s": round(time.monotonic() - t_test, 1),
    }  # fmt: skip
    print("mariadb kill:", json.dumps(summary))
    if lab.daemon_pids().get("slurmdbd") is None:
        raise LabError("slurmdbd did not survive the MariaDB restart")
