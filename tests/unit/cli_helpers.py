"""Helpers for CLI tests: run the real entry point in-process or as a non-root process."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from slurm_quota.cli import main

NOBODY_UID = 65534
NOBODY_GID = 65534
SLURM_QUOTA_BIN = Path(sys.executable).with_name("slurm-quota")
LEDGER_TABLES = (
    "users",
    "accounts",
    "jobs_preallocations",
    "gpu_factors",
    "settings",
    "charges",
    "journal",
)


@dataclass(frozen=True)
class Result:
    """Exit status and captured output of one CLI run."""

    code: int
    out: str
    err: str


def run_cli(capsys, db_path: Path | str, *args: str) -> Result:
    """Run `slurm-quota --db DB ARGS...` through cli.main (the one error mapping)."""
    capsys.readouterr()
    code = main(["--db", str(db_path), *args])
    out, err = capsys.readouterr()
    return Result(code, out, err)


def snapshot(db_path: Path | str) -> dict[str, object]:
    """Every row of every ledger table plus user_version: equal snapshots = nothing changed."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        snap: dict[str, object] = {
            "user_version": conn.execute("PRAGMA user_version").fetchone()[0]
        }
        for table in LEDGER_TABLES:
            if table in names:
                snap[table] = sorted(
                    (tuple(r) for r in conn.execute(f"SELECT * FROM {table}")), key=repr
                )
        return snap
    finally:
        conn.close()


def journal(db_path: Path | str) -> list[dict[str, object]]:
    """Journal rows in insertion order, as dicts."""
    conn = sqlite3.connect(str(db_path))
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM journal ORDER BY id")]
    finally:
        conn.close()


def owner_row(db_path: Path | str, kind: str, name: str) -> tuple | None:
    """(name, consumed cpu, quota cpu, consumed gpu, quota gpu) of a users/accounts row."""
    table, key = {"user": ("users", "username"), "account": ("accounts", "account")}[kind]
    conn = sqlite3.connect(str(db_path))
    try:
        row = conn.execute(
            f"SELECT {key}, total_consumed_cpu_minutes, quota_cpu_minutes, "
            f"total_consumed_gpu_minutes, quota_gpu_minutes FROM {table} WHERE {key} = ?",
            (name,),
        ).fetchone()
        return None if row is None else tuple(row)
    finally:
        conn.close()


def shared_dir() -> Path:
    """A world-writable temp dir (pytest's tmp_path is 0700 root: nobody could not enter)."""
    path = Path(tempfile.mkdtemp(prefix="sq-nonroot-", dir="/tmp"))
    os.chmod(path, 0o777)
    return path


def remove_dir(path: Path) -> None:
    """Remove a dir made by shared_dir."""
    shutil.rmtree(path, ignore_errors=True)


def run_as_nobody(
    db_path: Path | str, *args: str, env_extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the installed `slurm-quota` with real uid/gid 65534 (really non-root)."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/",
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        **(env_extra or {}),
    }
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY_UID}",
            f"--regid={NOBODY_GID}",
            "--clear-groups",
            str(SLURM_QUOTA_BIN),
            "--db",
            str(db_path),
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=60,
    )
