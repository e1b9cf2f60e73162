"""scripts/slurm-quota-charge-wrapper run for real, the way slurmctld's jobcomp/script runs it:
`env -i` with only the jobcomp variables, no arguments, TERM & co. blocked, config from a file.

Slurm itself is replaced by small executables on the config's PATH that print a captured real
scontrol/sacct output (tests/fixtures/slurm-22.05/charge/); the charge is the real
`slurm-quota charge` of this venv against a real temp ledger.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_quota import db
from tests.unit.slurm_fixtures import CHARGE, case

REPO = Path(__file__).resolve().parents[2]
WRAPPER = REPO / "scripts" / "slurm-quota-charge-wrapper"
QUOTA_BIN = Path(sys.executable).parent / "slurm-quota"
JOBCOMP_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"  # what slurmctld passes
# slurmctld's blocked signals as seen in a jobcomp script (SigBlk 0000000000887a27)
BLOCKED = {
    signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGABRT, signal.SIGUSR1,
    signal.SIGUSR2, signal.SIGPIPE, signal.SIGALRM, signal.SIGTERM, signal.SIGTSTP,
}  # fmt: skip


def _fake_slurm(bindir: Path, name: str, *, fail: bool = False) -> None:
    """scontrol/sacct that print the captured real output of job `name` (or fail)."""
    bindir.mkdir(exist_ok=True)
    capture = CHARGE / f"{name}.json"
    for cmd in ("scontrol", "sacct"):
        exe = bindir / cmd
        if fail:
            body = (
                f"import sys\nsys.stderr.write('{cmd}: error: Unable to contact slurm "
                "controller\\n')\nsys.exit(1)\n"
            )
        else:
            body = (
                f"import json, sys\nd = json.load(open({str(capture)!r}))[{cmd!r}]\n"
                "sys.stdout.write(d['stdout']); sys.stderr.write(d['stderr'])\n"
                "sys.exit(d['returncode'])\n"
            )
        exe.write_text(f"#!{sys.executable}\n{body}")
        exe.chmod(0o755)


def _config(tmp_path: Path, *, db_path: Path, bindir: Path, quota_bin: Path = QUOTA_BIN,
            timeout: int = 30, spool: Path | None = None) -> Path:  # fmt: skip
    conf = tmp_path / "slurm-quota.conf"
    conf.write_text(
        f"SLURM_QUOTA_DB={db_path}\n"
        f"SLURM_QUOTA_BIN={quota_bin}\n"
        f"SLURM_QUOTA_LOG={tmp_path / 'log' / 'charge.log'}\n"
        f"SLURM_QUOTA_SPOOL={spool or tmp_path / 'spool'}\n"
        f"SLURM_QUOTA_TIMEOUT={timeout}\n"
        f"SLURM_CONF={tmp_path / 'slurm.conf'}\n"
        f"PATH={bindir}:$PATH\n"
    )
    return conf


def _run_wrapper(conf: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    argv = ["env", "-i", f"SLURM_QUOTA_CONFIG={conf}", f"PATH={JOBCOMP_PATH}"]
    argv += [f"{k}={v}" for k, v in env.items()]
    argv.append(str(WRAPPER))
    return subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd="/tmp",
        timeout=120,
        preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED),
    )


def _log(tmp_path: Path) -> str:
    return (tmp_path / "log" / "charge.log").read_text()


def test_wrapper_charges_a_job_logs_it_and_exits_0(tmp_path, db_path):
    bindir = tmp_path / "bin"
    _fake_slurm(bindir, "gpus2_split")
    conf = _config(tmp_path, db_path=db_path, bindir=bindir)
    proc = _run_wrapper(conf, case("gpus2_split")["env"])
    assert proc.returncode == 0
    assert proc.stdout == "" and proc.stderr == ""  # everything goes to the log
    lines = _log(tmp_path).splitlines()
    assert lines[0].endswith(" job 17 (alice/research COMPLETED): charging")
    assert lines[1].startswith("job 17 run 17:1795265568 (COMPLETED): charged alice/research")
    assert len(lines) == 2
    conn = db.connect(db_path)
    row = conn.execute("SELECT charge_key, gpus, source FROM charges").fetchone()
    conn.close()
    assert tuple(row) == ("17:1795265568", "a100=1,h100=1", "jobcomp:scontrol")
    assert not (tmp_path / "spool").exists() or not any((tmp_path / "spool").iterdir())


def test_wrapper_spools_the_job_when_the_database_is_missing(tmp_path):
    bindir = tmp_path / "bin"
    _fake_slurm(bindir, "plain")
    conf = _config(tmp_path, db_path=tmp_path / "absent.db", bindir=bindir)
    env = case("plain")["env"]
    proc = _run_wrapper(conf, env)
    assert proc.returncode == 0
    spooled = tmp_path / "spool" / "5.1795265535.env"
    assert spooled.is_file()
    kept = dict(line.split("=", 1) for line in spooled.read_text().splitlines())
    for key in ("JOBID", "START", "END", "PROCS", "USERNAME", "ACCOUNT", "JOBSTATE",
                "ARRAYJOBID", "ARRAYTASKID", "PARTITION", "UID"):  # fmt: skip
        assert kept[key] == env[key]
    log = _log(tmp_path)
    assert "does not exist" in log
    assert "job 5: charge failed (exit 1); spooled for reconcile" in log


def test_wrapper_spools_when_slurm_does_not_answer(tmp_path, db_path):
    bindir = tmp_path / "bin"
    _fake_slurm(bindir, "plain", fail=True)
    conf = _config(tmp_path, db_path=db_path, bindir=bindir)
    assert _run_wrapper(conf, case("plain")["env"]).returncode == 0
    assert "job 5: charge failed (exit 75); spooled for reconcile" in _log(tmp_path)
    assert (tmp_path / "spool" / "5.1795265535.env").is_file()
    conn = db.connect(db_path)
    assert conn.execute("SELECT COUNT(*) FROM charges").fetchone()[0] == 0
    conn.close()


def test_wrapper_kills_a_hung_charge_despite_blocked_signals_and_spools(tmp_path, db_path):
    hung = tmp_path / "hung-slurm-quota"
    hung.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(600)\n")
    hung.chmod(0o755)
    conf = _config(tmp_path, db_path=db_path, bindir=tmp_path, quota_bin=hung, timeout=1)
    proc = _run_wrapper(conf, case("plain")["env"])  # subprocess timeout 120 s bounds it
    assert proc.returncode == 0
    assert "job 5: charge failed (exit 137); spooled for reconcile" in _log(tmp_path)
    assert (tmp_path / "spool" / "5.1795265535.env").is_file()


def test_wrapper_reports_when_it_cannot_spool(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    conf = _config(tmp_path, db_path=tmp_path / "absent.db", bindir=tmp_path,
                   spool=blocker / "spool")  # fmt: skip
    assert _run_wrapper(conf, case("plain")["env"]).returncode == 0
    assert f"job 5: charge failed (exit 1); could not spool to {blocker / 'spool'}" in _log(
        tmp_path
    )


@pytest.mark.parametrize("name", ["array_meta_cancelled", "het_cancelled_component1"])
def test_wrapper_charges_never_started_jobs(tmp_path, db_path, name):
    bindir = tmp_path / "bin"
    _fake_slurm(bindir, name)
    conf = _config(tmp_path, db_path=db_path, bindir=bindir)
    assert _run_wrapper(conf, case(name)["env"]).returncode == 0
    job_id = case(name)["job_id"]
    assert f"job {job_id} run {job_id}:" in _log(tmp_path)
    conn = db.connect(db_path)
    row = conn.execute("SELECT cpu_minutes, gpu_minutes FROM charges").fetchone()
    conn.close()
    assert tuple(row) == (0, 0)


def test_capture_files_are_json_with_real_commands():
    # guard: fixtures used above are what capture.py wrote (argv of the real commands)
    d = json.loads((CHARGE / "plain.json").read_text())
    assert d["scontrol"]["argv"] == ["scontrol", "show", "job", "-o", "5"]
    assert d["sacct"]["argv"][:3] == ["sacct", "-j", "5"]


def test_fast_entry_charges_like_the_cli_and_maps_errors_the_same(tmp_path, db_path):
    # `python -m slurm_quota.charge` (no click) must print the same line and use the same codes
    bindir = tmp_path / "bin"
    _fake_slurm(bindir, "gres_h100")
    env = dict(case("gres_h100")["env"], PATH=f"{bindir}:{JOBCOMP_PATH}",
               SLURM_QUOTA_DB=str(db_path))  # fmt: skip
    fast = subprocess.run([sys.executable, "-m", "slurm_quota.charge"], env=env,
                          capture_output=True, text=True, cwd=str(REPO))  # fmt: skip
    assert fast.returncode == 0, fast.stderr
    assert fast.stdout.startswith("job 8 run 8:1795265544 (COMPLETED): charged alice/research")
    again = subprocess.run([str(QUOTA_BIN), "charge"], env=env, capture_output=True, text=True)
    assert again.returncode == 0
    assert again.stdout.startswith("job 8 run 8:1795265544 (COMPLETED): already charged")
    env["SLURM_QUOTA_DB"] = str(tmp_path / "absent.db")
    missing = subprocess.run([sys.executable, "-m", "slurm_quota.charge"], env=env,
                             capture_output=True, text=True, cwd=str(REPO))  # fmt: skip
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    env["SLURM_QUOTA_DB"] = str(db_path)
    del env["JOBID"]
    bad = subprocess.run([sys.executable, "-m", "slurm_quota.charge"], env=env,
                         capture_output=True, text=True, cwd=str(REPO))  # fmt: skip
    assert bad.returncode == 2 and "no JOBID" in bad.stderr
