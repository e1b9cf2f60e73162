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


def test_services_run_as_slurm_hardened():
    for name in ("slurm-quota.service", "slurm-quota-reconcile.service"):
        svc = _parse(name)["Service"]
        assert (svc["User"], svc["Group"]) == ("slurm", "slurm"), name
        assert svc["NoNewPrivileges"] == "yes", name
        assert svc["ProtectSystem"] == "strict", name
        assert svc["PrivateTmp"] == "yes", name
        assert svc["ProtectHome"] == "yes", name
        assert svc["RestrictAddressFamilies"].split() == ["AF_UNIX", "AF_INET", "AF_INET6"], name
        assert svc["CapabilityBoundingSet"] == "", name


def test_read_service_cannot_write_the_ledger_file():
    svc = _parse("slurm-quota.service")["Service"]
    # The database file is read-only inside the service; its directory stays writable only so
    # SQLite can create the WAL index files a reader needs (see the unit's header comment).
    assert svc["ReadOnlyPaths"] == "-/var/lib/state/slurm-quota/slurm-quota.db"
    assert svc["ReadWritePaths"] == "/var/lib/state/slurm-quota"


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
