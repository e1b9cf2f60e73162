"""A real wheel, installed into a new venv, works without the source tree.

Built and installed once per module (about 30 s: pip fetches hatchling, click, tabulate and
requests from PyPI); every check then runs the installed `slurm-quota` from `/` with a
clean environment. Deselect with `-m 'not wheel'`.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from slurm_quota import db
from tests.unit.fixtures_seed import SEED_ROWS, make_seed_db, read_rows

pytestmark = pytest.mark.wheel

SOURCE = Path(__file__).resolve().parents[2]
# Both engines' migrations: NNNN_name.sql (SQLite) and mariadb/NNNN_name.sql.
MIGRATIONS = sorted(
    p.relative_to(SOURCE / "migrations").as_posix() for p in (SOURCE / "migrations").rglob("*.sql")
)
LATEST = db.latest_version()
APPLIED_ALL = (
    f"Applied migrations {', '.join(str(v) for v in range(1, LATEST + 1))}; "
    f"schema version {LATEST}.\n"
)


def _run(cmd: list[str], *, env: dict[str, str], timeout: int = 600) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/", timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel path, venv dir, clean env) of slurm-quota built from this tree and installed."""
    work = tmp_path_factory.mktemp("wheel")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "LANG": "C.UTF-8"}
    build_env = dict(env, PIP_DISABLE_PIP_VERSION_CHECK="1")
    # What the wheel must carry, read just before the build (others may edit lua/ meanwhile).
    expected = {
        f"migrations/{name}": (SOURCE / "migrations" / name).read_bytes() for name in MIGRATIONS
    }
    expected["job_submit.lua"] = (SOURCE / "lua" / "job_submit.lua").read_bytes()
    expected["slurm_quota.lua"] = (SOURCE / "lua" / "slurm_quota.lua").read_bytes()
    dist = work / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(SOURCE)],
        env=build_env,
    )
    wheels = list(dist.glob("slurm_quota-*.whl"))
    assert len(wheels) == 1, wheels
    venv = work / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], env=env)
    _run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheels[0])], env=build_env
    )
    return wheels[0], venv, env, expected


def test_wheel_contains_the_migrations_and_the_plugin(installed):
    wheel, _, _, expected = installed
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        prefix = "slurm_quota/_data/migrations/"
        shipped = sorted(n[len(prefix) :] for n in names if n.startswith(prefix))
        assert shipped == MIGRATIONS
        for name, data in expected.items():
            assert zf.read(f"slurm_quota/_data/{name}") == data, name


def test_installed_package_reads_its_data_from_the_install_not_the_source(installed):
    _, venv, env, _ = installed
    out = _run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import slurm_quota, slurm_quota.db as d; "
            "print(slurm_quota.__file__); print(d.migrations_dir())",
        ],
        env=env,
    )
    package_file, migrations = out.split()
    assert package_file.startswith(str(venv)), package_file
    assert migrations.startswith(str(venv)), migrations
    assert migrations.endswith("slurm_quota/_data/migrations")
    installed_sql = sorted(
        p.relative_to(migrations).as_posix() for p in Path(migrations).rglob("*.sql")
    )
    assert installed_sql == MIGRATIONS
    assert (Path(package_file).parent / "_data" / "job_submit.lua").is_file()
    assert str(SOURCE) not in out


def test_installed_cli_reports_its_version(installed):
    _, venv, env, _ = installed
    out = _run([str(venv / "bin" / "slurm-quota"), "--version"], env=env)
    assert out.startswith("slurm-quota, version ")


def test_installed_cli_migrates_a_new_database_and_runs_admin_commands(installed, tmp_path):
    _, venv, env, _ = installed
    path = tmp_path / "new.db"
    sq = [str(venv / "bin" / "slurm-quota"), "--db", str(path)]

    assert _run([*sq, "migrate"], env=env) == APPLIED_ALL
    assert _run([*sq, "user-quota", "alice", "-1"], env=env).startswith("User alice created")
    out = _run([*sq, "gpu-factors"], env=env)  # tabulate comes from the installed deps
    assert out.splitlines()[2].split()[:2] == ["default", "1.0"]

    conn = sqlite3.connect(str(path))
    assert conn.execute("PRAGMA user_version").fetchone()[0] == LATEST
    assert conn.execute("SELECT quota_cpu_minutes FROM users").fetchall() == [(-1,)]
    conn.close()


def test_installed_cli_upgrades_a_seed_database_in_place(installed, tmp_path):
    _, venv, env, _ = installed
    path = make_seed_db(tmp_path / "seed.db")
    sq = [str(venv / "bin" / "slurm-quota"), "--db", str(path)]

    assert _run([*sq, "migrate"], env=env) == APPLIED_ALL
    again = _run([*sq, "migrate"], env=env)
    assert again == f"Schema already at version {LATEST}; nothing to do.\n"

    for table, rows in SEED_ROWS.items():
        kept = [r[: len(rows[0])] for r in read_rows(path, table)]  # 0003 appends columns
        assert kept == sorted(rows, key=lambda r: r[0]), table
    conn = sqlite3.connect(str(path))
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    assert {"charges", "journal"} <= tables
    assert os.stat(path).st_mode & 0o777 == 0o644
