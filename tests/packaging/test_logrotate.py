"""The charge-log logrotate file parses cleanly and really rotates the wrapper's log."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests import syspkgs

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "packaging" / "logrotate" / "slurm-quota-charge"
LOG = "/var/log/slurm/charge/slurm-quota-charge.log"


@pytest.fixture(scope="module")
def logrotate() -> str:
    syspkgs.require(["logrotate"])
    try:
        pwd.getpwnam("slurm")
    except KeyError:
        # Debian creates its SlurmUser `slurm` in this package's preinst; the file names it.
        syspkgs.require(["slurm-wlm-basic-plugins"])
    path = shutil.which("logrotate") or "/usr/sbin/logrotate"
    if not os.path.exists(path):
        syspkgs.skip_or_fail("logrotate is not installed")
    return path


def _run(logrotate: str, conf: Path, state: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [logrotate, *flags, "-s", str(state), str(conf)],
        capture_output=True, text=True, timeout=60,
    )


def test_config_parses_without_errors(logrotate, tmp_path):
    proc = _run(logrotate, CONF, tmp_path / "state", "-d")
    assert proc.returncode == 0, proc.stderr
    assert "error" not in proc.stderr.lower(), proc.stderr
    assert f"rotating pattern: {LOG}" in proc.stderr


def test_debug_mode_reports_a_bad_directive(logrotate, tmp_path):
    # logrotate -d exits 0 on unknown directives: the test above must read stderr, as here.
    bad = tmp_path / "bad"
    bad.write_text(CONF.read_text().replace("weekly", "weeklyy"))
    proc = _run(logrotate, bad, tmp_path / "state", "-d")
    assert "unknown option 'weeklyy'" in proc.stderr


def test_rotation_keeps_the_old_log_and_creates_a_slurm_owned_one(logrotate):
    slurm = pwd.getpwnam("slurm")
    if os.geteuid() != 0:
        syspkgs.skip_or_fail("rotating as the slurm user needs root")
    # Not under pytest's 0700 tmp_path: logrotate switches to the slurm user (`su`).
    base = Path(tempfile.mkdtemp(prefix="slurm-quota-logrotate-"))
    try:
        os.chmod(base, 0o755)
        logdir = base / "charge"
        logdir.mkdir()
        os.chown(logdir, slurm.pw_uid, slurm.pw_gid)
        log = logdir / "slurm-quota-charge.log"
        log.write_text("2025-01-01T00:00:00+0000 job 42 (alice/hpc COMPLETED): charging\n")
        os.chown(log, slurm.pw_uid, slurm.pw_gid)
        conf = base / "conf"
        conf.write_text(CONF.read_text().replace(LOG, str(log)))

        proc = _run(logrotate, conf, base / "state", "-f")
        assert proc.returncode == 0, proc.stderr

        rotated = [p for p in logdir.iterdir() if p.name.startswith(log.name + "-")]
        assert len(rotated) == 1, sorted(p.name for p in logdir.iterdir())
        assert "job 42" in rotated[0].read_text()  # delaycompress: first rotation stays plain
        st = log.stat()
        assert log.read_text() == ""
        assert (st.st_uid, st.st_gid) == (slurm.pw_uid, slurm.pw_gid)
        assert st.st_mode & 0o777 == 0o640
    finally:
        shutil.rmtree(base)
