"""The shipped systemd units pass `systemd-analyze verify` without a single warning.

verify needs the ExecStart binary and the Documentation= man page to exist, so the units are
rendered into a temp dir with ExecStart pointing at this venv's slurm-quota and MANPATH at our
own man/ tree; the shipped files keep /usr/bin/slurm-quota.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import syspkgs

ROOT = Path(__file__).resolve().parents[2]
UNIT_DIR = ROOT / "packaging" / "systemd"
UNITS = [
    "slurm-quota.socket",
    "slurm-quota.service",
    "slurm-quota-reconcile.service",
    "slurm-quota-reconcile.timer",
]
SHIPPED_BIN = "/usr/bin/slurm-quota"


def _venv_cli() -> Path:
    return Path(sys.executable).parent / "slurm-quota"


def _parse(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read(UNIT_DIR / name)
    return parser


def _render(tmp_path: Path) -> tuple[Path, Path]:
    """Copy the units with ExecStart rewritten; build a MANPATH holding slurm-quota(1)."""
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    for name in UNITS:
        text = (UNIT_DIR / name).read_text(encoding="utf-8")
        (unit_dir / name).write_text(text.replace(SHIPPED_BIN, str(_venv_cli())), "utf-8")
    man1 = tmp_path / "man" / "man1"
    man1.mkdir(parents=True)
    for page in (ROOT / "man").glob("*.1"):
        shutil.copy(page, man1 / page.name)
    return unit_dir, tmp_path / "man"


def _verify(unit_dir: Path, manpath: Path, names: list[str]) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "MANPATH": str(manpath), "LANG": "C.UTF-8"}
    return subprocess.run(
        ["systemd-analyze", "verify", *[f"./{n}" for n in names]],
        cwd=unit_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def analyze() -> None:
    syspkgs.require(["systemd", "man-db"])
    if not shutil.which("systemd-analyze"):
        syspkgs.skip_or_fail("systemd-analyze is not on PATH after installing systemd")
    if not _venv_cli().exists():
        pytest.fail(f"{_venv_cli()} is missing: run `make venv`")


def test_units_verify_without_warnings(analyze, tmp_path):
    unit_dir, manpath = _render(tmp_path)
    proc = _verify(unit_dir, manpath, UNITS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == "", f"systemd-analyze verify warned:\n{proc.stderr}"


def test_verify_reports_a_misspelt_key(analyze, tmp_path):
    # The check above relies on verify printing unknown keys; prove it does here.
    unit_dir, manpath = _render(tmp_path)
    bad = unit_dir / "slurm-quota.service"
    bad.write_text(bad.read_text().replace("ProtectSystem=", "ProtectSytem="), "utf-8")
    proc = _verify(unit_dir, manpath, ["slurm-quota.service"])
    assert "Unknown key" in proc.stderr and "ProtectSytem" in proc.stderr


def test_shipped_units_run_the_installed_cli():
    service = _parse("slurm-quota.service")["Service"]
    reconcile = _parse("slurm-quota-reconcile.service")["Service"]
    assert service["ExecStart"] == f"{SHIPPED_BIN} serve --idle-timeout=600"
    assert reconcile["ExecStart"] == f"{SHIPPED_BIN} reconcile"
    assert reconcile["Type"] == "oneshot"


def test_socket_listens_on_9911_and_service_requires_it():
    assert _parse("slurm-quota.socket")["Socket"]["ListenStream"] == "9911"
    unit = _parse("slurm-quota.service")["Unit"]
    assert "slurm-quota.socket" in unit["Requires"].split()


def test_services_are_hardened():
    for name in ("slurm-quota.service", "slurm-quota-reconcile.service"):
        svc = _parse(name)["Service"]
        assert svc["NoNewPrivileges"] == "yes", name
        assert svc["ProtectSystem"] == "strict", name
        assert svc["PrivateTmp"] == "yes", name
        assert svc["ProtectHome"] == "yes", name
        assert svc["RestrictAddressFamilies"].split() == ["AF_UNIX", "AF_INET", "AF_INET6"], name
    serve = _parse("slurm-quota.service")["Service"]
    assert (serve["User"], serve["Group"]) == ("slurm", "slurm")
    assert serve["CapabilityBoundingSet"] == ""
    reconcile = _parse("slurm-quota-reconcile.service")["Service"]
    # reconcile runs as the ledger's owner, so it needs no capability at all.
    assert (reconcile["User"], reconcile["Group"]) == ("slurm", "slurm")
    assert reconcile["CapabilityBoundingSet"] == ""


def test_read_service_may_hold_thousands_of_connections():
    # serve cannot raise its own limit under the unit's syscall filter (no @resources).
    assert int(_parse("slurm-quota.service")["Service"]["LimitNOFILE"]) >= 8192


def test_service_writes_only_the_ledger_directory():
    svc = _parse("slurm-quota.service")["Service"]
    # Admin writes of Slurm operators on other hosts go through the service (issue 17): the
    # ledger's directory is the one writable path of an otherwise read-only system.
    assert "ReadOnlyPaths" not in svc
    assert svc["ProtectSystem"] == "strict"
    assert svc["ReadWritePaths"] == "/var/lib/state/slurm-quota"
    # munged's socket and Slurm's daemons
    assert svc["RestrictAddressFamilies"].split() == ["AF_UNIX", "AF_INET", "AF_INET6"]


def test_reconcile_timer_every_15_minutes_persistent():
    timer = _parse("slurm-quota-reconcile.timer")["Timer"]
    assert timer["OnCalendar"] == "*:0/15"
    assert timer["Persistent"] == "true"
    assert _parse("slurm-quota-reconcile.timer")["Install"]["WantedBy"] == "timers.target"


def _read_as_nobody(db_file: Path) -> subprocess.CompletedProcess:
    code = (
        "import sys; from slurm_quota import db; "
        "c = db.connect(sys.argv[1], readonly=True, check_schema=False); "
        "print(c.execute('PRAGMA user_version').fetchone()[0])"
    )
    return subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
         sys.executable, "-c", code, str(db_file)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )


def test_wal_reader_needs_a_writable_directory():
    """Why slurm-quota.service keeps the ledger's directory writable (ReadWritePaths).

    With no writer connected, SQLite has removed the -wal/-shm files; a read-only reader
    must create them, so in a read-only directory even a read fails.
    """
    import os
    import tempfile

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        syspkgs.skip_or_fail("needs root and setpriv to read the ledger as an unprivileged user")
    from slurm_quota import db

    # pytest's tmp_path lives in a 0700 directory; this one must be reachable by nobody.
    locked = Path(tempfile.mkdtemp(prefix="slurm-quota-walread-"))
    try:
        os.chmod(locked, 0o755)  # owned by root: not writable for nobody
        db.migrate(locked / "q.db")  # the last connection removed -wal/-shm
        assert not (locked / "q.db-wal").exists()
        refused = _read_as_nobody(locked / "q.db")
        assert refused.returncode != 0
        assert "readonly database" in refused.stderr, refused.stderr

        os.chown(locked, 65534, 65534)  # directory writable; the file is still root's 0644
        allowed = _read_as_nobody(locked / "q.db")
        assert allowed.returncode == 0, allowed.stderr
        assert int(allowed.stdout) == db.latest_version()
    finally:
        shutil.rmtree(locked)


def _fake_slurm(bindir: Path) -> None:
    """sacct/squeue/scontrol that answer at once with no jobs (a cluster with nothing to do)."""
    bindir.mkdir()
    for name in ("sacct", "squeue", "scontrol"):
        (bindir / name).write_text("#!/bin/sh\nexit 0\n")
        (bindir / name).chmod(0o755)


def _as_unit(unit: str) -> list[str]:
    """setpriv arguments reproducing a unit's User/Group, capability bound and no_new_privs."""
    import pwd

    svc = _parse(unit)["Service"]
    pw = pwd.getpwnam(svc.get("User", "root"))
    caps = [c.lower().removeprefix("cap_") for c in svc.get("CapabilityBoundingSet", "").split()]
    args = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups",
            "--bounding-set=" + ",".join(["-all", *("+" + c for c in caps)]), "--inh-caps=-all"]
    if svc.get("NoNewPrivileges") == "yes":
        args.append("--no-new-privs")
    return args


def test_reconcile_unit_identity_may_run_reconcile_on_a_slurm_owned_ledger():
    """The unit's user and capabilities are enough for `reconcile` to do its job, and the
    ledger's files stay slurm's (the plugin in slurmctld must keep writing them)."""
    import os
    import pwd
    import tempfile

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        syspkgs.skip_or_fail("needs root and setpriv to run as the unit's user")
    try:
        slurm = pwd.getpwnam("slurm")
    except KeyError:
        syspkgs.require(["slurm-wlm-basic-plugins"])  # creates Debian's SlurmUser `slurm`
        slurm = pwd.getpwnam("slurm")
    from slurm_quota import db

    base = Path(tempfile.mkdtemp(prefix="slurm-quota-reconcile-unit-"))
    try:
        os.chmod(base, 0o755)
        state, spool = base / "state", base / "spool"
        state.mkdir()
        spool.mkdir()
        ledger = state / "slurm-quota.db"
        db.migrate(ledger)
        for p in (state, spool, *state.iterdir()):
            os.chown(p, slurm.pw_uid, slurm.pw_gid)
        _fake_slurm(base / "bin")

        exec_start = _parse("slurm-quota-reconcile.service")["Service"]["ExecStart"].split()
        assert exec_start[0] == SHIPPED_BIN
        argv = [str(_venv_cli()), "--db", str(ledger), *exec_start[1:]]
        env = {"PATH": f"{base / 'bin'}:/usr/bin:/bin", "SLURM_QUOTA_SPOOL": str(spool),
               "LANG": "C.UTF-8"}
        proc = subprocess.run([*_as_unit("slurm-quota-reconcile.service"), *argv], env=env,
                              cwd=base, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        for f in state.iterdir():
            st = f.stat()
            assert (st.st_uid, st.st_gid) == (slurm.pw_uid, slurm.pw_gid), f.name
    finally:
        shutil.rmtree(base)


def test_reconcile_syscall_filter_denies_privileged_calls(analyze, tmp_path):
    """The reconcile service runs as the ledger's owner: no chown, setuid or setrlimit."""
    unit_dir, manpath = _render(tmp_path)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "MANPATH": str(manpath),
           "SYSTEMD_LOG_LEVEL": "debug"}
    proc = subprocess.run(["systemd-analyze", "verify", "./slurm-quota-reconcile.service"],
                          cwd=unit_dir, env=env, capture_output=True, text=True, timeout=120)
    dump = proc.stdout.split("-> Unit slurm-quota-reconcile.service:", 1)[1]
    allowed = next(line for line in dump.splitlines()
                   if line.strip().startswith("SystemCallFilter:")).split()[1:]
    assert "read" in allowed and "fsync" in allowed
    for call in ("fchown", "setuid", "setrlimit"):
        assert call not in allowed, call
