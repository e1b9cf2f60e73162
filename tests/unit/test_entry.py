"""The console script sends the jobcomp call `slurm-quota charge` past click, and only it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from slurm_quota import db

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "slurm-22.05" / "charge" / "plain.json"
SCRIPT = Path(sys.executable).parent / "slurm-quota"


def _fake_scontrol(bin_dir: Path, stdout: str) -> None:
    bin_dir.mkdir()
    (bin_dir / "scontrol.out").write_text(stdout)
    script = bin_dir / "scontrol"
    script.write_text(f"#!/bin/sh\ncat '{bin_dir / 'scontrol.out'}'\n")
    script.chmod(0o755)


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-X", "importtime", str(SCRIPT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _imported(stderr: str) -> set[str]:
    return {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if "|" in line}


def test_jobcomp_charge_call_skips_click_and_charges(tmp_path: Path) -> None:
    case = json.loads(FIXTURE.read_text())
    _fake_scontrol(tmp_path / "bin", case["scontrol"]["stdout"])
    path = tmp_path / "ledger.db"
    db.migrate(path)
    env = dict(case["env"], PATH=f"{tmp_path / 'bin'}:/usr/bin:/bin", SLURM_QUOTA_DB=str(path))

    proc = _run(["charge"], env)

    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "click" not in _imported(proc.stderr)
    conn = db.connect(path)
    try:
        rows = conn.execute("SELECT job_id, username, cpus, elapsed_s FROM charges").fetchall()
    finally:
        conn.close()
    assert [tuple(r) for r in rows] == [(5, "alice", 1, 2)]


def test_other_command_lines_go_through_click(tmp_path: Path) -> None:
    env = dict(os.environ, SLURM_QUOTA_DB=str(tmp_path / "absent.db"))
    proc = _run(["charge", "--help"], env)
    assert proc.returncode == 0
    assert "click" in _imported(proc.stderr)
    assert "Charge one finished job run" in proc.stdout
