"""`make rpm` builds the three packages, each holding its key files, and the payload runs."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import slurm_quota
from tests import syspkgs

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "packaging" / "rpm" / "slurm-quota.spec"
RPMS = ROOT / "rpmbuild" / "RPMS" / "noarch"
VERSION = slurm_quota.__version__


def _rpm(*args: str) -> str:
    proc = subprocess.run(["rpm", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def packages() -> dict[str, Path]:
    """Build with `make rpm` once; return {package name: path of the .rpm}."""
    # python3-packaging lets rpm's python generator turn the wheel metadata into Requires.
    syspkgs.require(["rpm", "python3-packaging"])
    if not shutil.which("rpmbuild"):
        syspkgs.skip_or_fail("rpmbuild is not on PATH after installing rpm")
    proc = subprocess.run(
        ["make", "rpm"], cwd=ROOT, capture_output=True, text=True, timeout=540,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    built = {}
    for name in ("slurm-quota", "slurm-quota-controller", "slurm-quota-web"):
        path = RPMS / f"{name}-{VERSION}-1.noarch.rpm"
        assert path.exists(), sorted(p.name for p in RPMS.iterdir())
        built[name] = path
    return built


def _files(path: Path) -> list[str]:
    return _rpm("-qlp", str(path)).splitlines()


def _has(files: list[str], pattern: str) -> bool:
    return any(re.fullmatch(pattern, f) for f in files)


def test_spec_version_is_the_package_version():
    m = re.search(r"^Version:\s*(\S+)$", SPEC.read_text(), re.M)
    assert m and m.group(1) == VERSION


def test_common_package_holds_cli_man_page_and_completion(packages):
    files = _files(packages["slurm-quota"])
    assert "/usr/bin/slurm-quota" in files
    assert _has(files, r"/usr/lib/python3\.\d+/site-packages/slurm_quota/cli/__init__\.py")
    assert _has(files, r"/usr/lib/python3\.\d+/site-packages/slurm_quota/_data/job_submit\.lua")
    assert _has(files, r"/usr/lib/python3\.\d+/site-packages/slurm_quota/_data/migrations/"
                       r"0001_\w+\.sql")
    assert _has(files, r"/usr/share/man/man1/slurm-quota\.1(\.gz)?")
    assert "/usr/share/bash-completion/completions/slurm-quota" in files
    # Controller-only and web-only files stay out of the common package.
    assert not any("systemd" in f or "libexec" in f for f in files)
    assert not _has(files, r".*/slurm_quota/web(/.*)?")


def test_controller_package_holds_plugin_wrapper_units_logrotate_and_dirs(packages):
    files = _files(packages["slurm-quota-controller"])
    for path in (
        "/usr/share/slurm-quota/job_submit.lua",
        "/usr/share/slurm-quota/slurm_quota.lua",
        "/usr/libexec/slurm-quota/slurm-quota-charge-wrapper",
        "/etc/default/slurm-quota",
        "/etc/logrotate.d/slurm-quota-charge",
        "/usr/lib/systemd/system/slurm-quota.socket",
        "/usr/lib/systemd/system/slurm-quota.service",
        "/usr/lib/systemd/system/slurm-quota-reconcile.service",
        "/usr/lib/systemd/system/slurm-quota-reconcile.timer",
        "/var/lib/state/slurm-quota",
        "/var/log/slurm/charge",
        "/var/spool/slurm-quota/charge",
    ):
        assert path in files, path
    # Never over a site's own plugin.
    assert "/etc/slurm/job_submit.lua" not in files


def test_controller_dirs_and_modes(packages):
    listing = _rpm("-qlvp", str(packages["slurm-quota-controller"])).splitlines()
    by_path = {line.split()[-1]: line.split() for line in listing}
    for path in ("/var/lib/state/slurm-quota", "/var/log/slurm/charge",
                 "/var/spool/slurm-quota/charge"):
        mode, _, owner, group = by_path[path][:4]
        assert mode.startswith("d") and (owner, group) == ("slurm", "slurm"), by_path[path]
    assert by_path["/usr/libexec/slurm-quota/slurm-quota-charge-wrapper"][0] == "-rwxr-xr-x"
    configs = _rpm("-qcp", str(packages["slurm-quota-controller"])).split()
    assert sorted(configs) == ["/etc/default/slurm-quota", "/etc/logrotate.d/slurm-quota-charge"]


def test_controller_requires_lua_dbi_lua_posix_and_the_cli(packages):
    requires = _rpm("-qp", "--requires", str(packages["slurm-quota-controller"])).splitlines()
    names = {r.split()[0] for r in requires}
    assert {"lua-dbi", "lua-posix"} <= names
    assert f"slurm-quota = {VERSION}-1" in requires


def test_common_requires_come_from_the_wheel_metadata(packages):
    requires = _rpm("-qp", "--requires", str(packages["slurm-quota"])).splitlines()
    # The floors are EL9's versions (RHEL 9 requests, EPEL 9 click and tabulate), no higher.
    for dist, floor in (("click", "8.0.3"), ("tabulate", "0.8.10"), ("requests", "2.25.1")):
        wanted = rf"python3\.\d+dist\({dist}\) >= {re.escape(floor)}"
        assert any(re.fullmatch(wanted, r) for r in requires), (dist, requires)
    assert "python3-waitress >= 2.1" in requires
    assert any(re.fullmatch(r"python3\.\d+dist\(waitress\) >= 2\.1", r) for r in requires), requires
    assert any(r.startswith("python(abi) = 3.") for r in requires), requires


def test_controller_post_migrates_an_existing_ledger(packages):
    scripts = _rpm("-qp", "--scripts", str(packages["slurm-quota-controller"]))
    post = scripts.split("postinstall scriptlet")[1].split("scriptlet (using")[0]
    assert 'if [ -f "$SLURM_QUOTA_DB" ]' in post
    assert '/usr/bin/slurm-quota --db "$SLURM_QUOTA_DB" migrate' in post
    assert "getent passwd slurm" in scripts.split("preinstall scriptlet")[1]


def test_web_package_holds_its_man_page(packages):
    files = _files(packages["slurm-quota-web"])
    assert _has(files, r"/usr/share/man/man1/slurm-quota-web\.1(\.gz)?")
    web_dir = ROOT / "slurm_quota" / "web"
    if web_dir.is_dir():
        assert _has(files, r"/usr/lib/python3\.\d+/site-packages/slurm_quota/web/__init__\.py")
    if re.search(r"^slurm-quota-web\s*=", (ROOT / "pyproject.toml").read_text(), re.M):
        assert "/usr/bin/slurm-quota-web" in files
        assert "/usr/bin/slurm-quota-web" not in _files(packages["slurm-quota"])


def _extract(rpm_path: Path, dest: Path) -> None:
    dest.mkdir()
    archive = subprocess.run(["rpm2archive", "-"], stdin=rpm_path.open("rb"),
                             capture_output=True, timeout=60)
    assert archive.returncode == 0, archive.stderr
    subprocess.run(["tar", "-xzf", "-", "-C", str(dest)], input=archive.stdout, check=True)


def test_packaged_cli_migrates_a_new_ledger(packages, tmp_path):
    """The payload of the common package runs on its own: migrations come from the wheel."""
    if os.geteuid() != 0:
        syspkgs.skip_or_fail("`slurm-quota migrate` is restricted to root")
    root = tmp_path / "root"
    _extract(packages["slurm-quota"], root)
    (sitelib,) = root.glob("usr/lib/python3.*/site-packages")
    script = root / "usr" / "bin" / "slurm-quota"
    assert script.read_text().startswith("#!/usr/bin/python3 -s\n")
    env = dict(os.environ, PYTHONPATH=str(sitelib))
    where = subprocess.run(
        [sys.executable, "-c", "import slurm_quota; print(slurm_quota.__file__)"],
        env=env, cwd=tmp_path, capture_output=True, text=True, check=True,
    )
    assert where.stdout.startswith(str(sitelib))  # not the editable checkout
    ledger = tmp_path / "ledger.db"
    proc = subprocess.run(
        [sys.executable, str(script), "--db", str(ledger), "migrate"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    migrations = sorted((sitelib / "slurm_quota" / "_data" / "migrations").glob("*.sql"))
    with sqlite3.connect(ledger) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(migrations)


def test_packaged_wrapper_is_valid_sh(packages, tmp_path):
    root = tmp_path / "root"
    _extract(packages["slurm-quota-controller"], root)
    wrapper = root / "usr" / "libexec" / "slurm-quota" / "slurm-quota-charge-wrapper"
    assert subprocess.run(["sh", "-n", str(wrapper)]).returncode == 0
    default = root / "etc" / "default" / "slurm-quota"
    assert subprocess.run(["sh", "-n", str(default)]).returncode == 0


def _scriptlets(rpm_path: Path) -> dict[str, str]:
    """{"preinstall": body, "postinstall": body, ...} from `rpm -qp --scripts`."""
    text = _rpm("-qp", "--scripts", str(rpm_path))
    parts = re.split(r"^(\w+) scriptlet \(using /bin/sh\):\n", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_controller_scriptlets_are_valid_sh(packages):
    scripts = _scriptlets(packages["slurm-quota-controller"])
    assert {"preinstall", "postinstall", "preuninstall", "postuninstall"} <= set(scripts)
    for name, body in scripts.items():
        proc = subprocess.run(["sh", "-n"], input=body, capture_output=True, text=True)
        assert proc.returncode == 0, (name, proc.stderr)


def _run_post(packages, tmp_path: Path, config: str, arg: str) -> subprocess.CompletedProcess:
    """Run the controller's %post with our CLI and a config file of ours in place of /etc."""
    body = _scriptlets(packages["slurm-quota-controller"])["postinstall"]
    conf = tmp_path / "default-slurm-quota"
    conf.write_text(config)
    body = body.replace("/etc/default/slurm-quota", str(conf))
    body = body.replace("/usr/bin/slurm-quota", str(Path(sys.executable).parent / "slurm-quota"))
    env = dict(os.environ, PATH=f"{tmp_path}:/usr/bin:/bin")
    (tmp_path / "systemctl").write_text("#!/bin/sh\nexit 0\n")  # no systemd as PID 1 here
    (tmp_path / "systemctl").chmod(0o755)
    return subprocess.run(["sh", "-c", body, "post", arg], capture_output=True, text=True,
                          env=env, timeout=120)


def test_post_on_upgrade_migrates_a_seed_database(packages, tmp_path):
    if os.geteuid() != 0:
        syspkgs.skip_or_fail("`slurm-quota migrate` is restricted to root")
    from slurm_quota import db
    from tests.unit.fixtures_seed import make_seed_db, read_rows

    ledger = make_seed_db(tmp_path / "seed.db")
    before = read_rows(ledger, "users")
    proc = _run_post(packages, tmp_path, f"SLURM_QUOTA_DB={ledger}\n", "2")
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr
    with sqlite3.connect(ledger) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == db.latest_version()
    # (migration 0003 appends the reserved_* totals to each user row)
    assert [r[: len(before[0])] for r in read_rows(ledger, "users")] == before


@pytest.mark.mariadb
def test_post_on_upgrade_migrates_the_mariadb_ledger_of_the_configuration(
    packages, tmp_path, mariadb_ledger
):
    if os.geteuid() != 0:
        syspkgs.skip_or_fail("`slurm-quota migrate` is restricted to root")
    from slurm_quota import db

    conf = tmp_path / "slurm-quota.conf"
    conf.write_text(
        f"ledgertype = MariaDB\nStorageHost={mariadb_ledger.host}\n"
        f"StoragePort={mariadb_ledger.port}\nStorageLoc={mariadb_ledger.database}\n"
        f"StorageUser={mariadb_ledger.user}\nStoragePass={mariadb_ledger.password}\n"
    )
    conf.chmod(0o600)
    sqlite_file = tmp_path / "left-behind.db"
    proc = _run_post(
        packages, tmp_path, f"SLURM_QUOTA_DB={sqlite_file}\nSLURM_QUOTA_CONF={conf}\n", "2"
    )
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr
    assert db.schema_version(mariadb_ledger) == db.latest_version()
    assert not sqlite_file.exists()


def test_post_on_first_install_without_ledger_creates_nothing(packages, tmp_path):
    ledger = tmp_path / "state" / "slurm-quota.db"
    proc = _run_post(packages, tmp_path, f"SLURM_QUOTA_DB={ledger}\n", "1")
    assert proc.returncode == 0, proc.stderr
    assert f"slurm-quota --db {ledger} migrate" in proc.stderr
    assert not ledger.exists() and not ledger.parent.exists()


def test_pre_refuses_without_the_slurm_user(packages, tmp_path):
    body = _scriptlets(packages["slurm-quota-controller"])["preinstall"]
    fake = tmp_path / "getent"
    fake.write_text("#!/bin/sh\nexit 2\n")  # getent's status for "no such key"
    fake.chmod(0o755)
    proc = subprocess.run(["sh", "-c", body, "pre", "1"], capture_output=True, text=True,
                          env=dict(os.environ, PATH=f"{tmp_path}:/usr/bin:/bin"))
    assert proc.returncode == 1
    assert "the user 'slurm' (SlurmUser) does not exist" in proc.stderr
