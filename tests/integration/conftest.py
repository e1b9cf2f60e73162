"""Fixtures of the integration layer: one real Slurm lab per test session.

`lab` (session): if a lab of ours is already running in the lab directory (all five PID
files alive and carrying this lab's marker, e.g. after `make lab-up`), it is reused and left
running at the end. Otherwise the fixture brings a lab up from nothing and takes it down at
session end, on failures and Ctrl-C too, then checks that none of its processes is left.
Without root or apt-get the tests skip loudly (fail when SLURM_QUOTA_REQUIRE_SYSTEM=1).

The session's lab is parametrised on the ledger's engine: every test runs on a lab whose
ledger is a SQLite file, then on one whose ledger is in the lab's MariaDB (`Lab(ledger=...)`;
SLURM_QUOTA_LAB_LEDGER=sqlite or mariadb runs one of them only). A running lab is reused only
for its own engine.

`clean_ledger` (function): no job left active, empty ledger tables; yields the lab.

Every test in this folder is marked `integration`.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from pathlib import Path

import pytest

from tests import syspkgs
from tests.integration.lab import LEDGER_ENV, PACKAGES, Lab, LabError, alive, session_ledgers

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    """Mark everything collected from this folder as `integration`; drop the cases of a test
    marked `ledger(...)` whose lab has another engine (deselected: CI fails on any skip)."""
    kept, dropped = [], []
    for item in items:
        if str(Path(str(item.fspath)).resolve()).startswith(str(HERE) + os.sep):
            item.add_marker(pytest.mark.integration)
        marker = item.get_closest_marker("ledger")
        callspec = getattr(item, "callspec", None)
        engine = callspec.params.get("lab") if callspec is not None else None
        if marker is not None and engine is not None and engine not in marker.args:
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _say(config, text: str) -> None:
    """Print past pytest's capture: the lab's life cycle should be visible in every run."""
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is None:
        sys.stderr.write(f"[lab] {text}\n")
        return
    with capture.global_and_fixture_disabled():
        sys.stderr.write(f"\n[lab] {text}\n")


@pytest.fixture(scope="session", params=session_ledgers())
def lab(request):
    """The session's Slurm lab (reused when ours is already up, else up now and down at end)."""
    if os.geteuid() != 0:
        syspkgs.skip_or_fail("the Slurm lab needs root (daemons, useradd, sbatch --uid)")
    reason = syspkgs.ensure(PACKAGES)
    if reason:
        syspkgs.skip_or_fail(reason)
    the_lab = Lab(ledger=request.param)
    if the_lab.is_up():
        if the_lab.running_ledger() != request.param:
            pytest.skip(
                f"the lab running in {the_lab.root} has a {the_lab.running_ledger()} ledger, "
                f"not {request.param} (bring it down, or set {LEDGER_ENV})"
            )
        _say(
            request.config,
            f"reusing the lab already running in {the_lab.root} (left running at the end)",
        )
        yield the_lab
        return
    owned = True

    def stop() -> dict[str, int]:
        nonlocal owned
        if not owned:
            return {}
        owned = False
        return the_lab.down()

    # Safety nets: an interpreter exit that skips fixture finalization, and a SIGTERM (a CI
    # timeout), turned into KeyboardInterrupt so that the finalizer below runs.
    atexit.register(stop)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        took = the_lab.up()
    except LabError as err:
        stop()
        pytest.fail(f"the Slurm lab did not come up:\n{err}", pytrace=False)
    stages = ", ".join(f"{name} {at:.1f}" for name, at in the_lab.timings)
    _say(
        request.config,
        f"up in {took:.1f} s in {the_lab.root}, {request.param} ledger (cumulative s: {stages})",
    )
    try:
        yield the_lab
    finally:
        stopped = stop()
        left = {d: p for d, p in stopped.items() if alive(p)}
        _say(request.config, f"down: stopped {stopped}")
        assert not left, f"lab processes still running after down(): {left}"
        assert not the_lab.daemon_pids(), the_lab.daemon_pids()


@pytest.fixture
def clean_ledger(lab):
    """No job left active (their jobcomp runs done), and every ledger table empty."""
    cancelled = lab.cancel_all()
    for job_id in cancelled:
        lab.wait_jobcomp(job_id)
    lab.wait_jobcomp_idle()
    lab.reset_ledger()
    yield lab
