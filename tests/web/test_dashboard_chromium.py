"""The dashboard in a real headless Chromium, against a live `serve` on a seeded ledger.

Chain under test: seeded SQLite file -> `slurm-quota serve` (process) -> `slurm-quota-web`
(process, standalone) -> Chromium (renders, runs the page's script) -> DOM and screenshot.
Set SLURM_QUOTA_SCREENSHOT_DIR to keep the screenshot (docs/img/dashboard.png comes from it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import struct
import subprocess
from pathlib import Path

import pytest

from tests import syspkgs
from tests.web.dom import table_rows
from tests.web.readside import SLURM_QUOTA_WEB_BIN, seed_ledger, serve_process


def _chromium() -> str:
    syspkgs.require(["chromium"])
    path = shutil.which("chromium")
    if not path:
        syspkgs.skip_or_fail("the chromium package is installed but `chromium` is not on PATH")
    return path


def _run_chromium(tmp_path: Path, *args: str) -> str:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    profile.mkdir()
    proc = subprocess.run(
        [
            _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", *args,
        ],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@contextlib.contextmanager
def _dashboard(db_path: Path):
    seed_ledger(db_path)
    with _dashboard_for(db_path) as url:
        yield url


@contextlib.contextmanager
def _dashboard_for(db_path: Path):
    """serve on db_path as it is, and slurm-quota-web asking it; yields the page's URL."""
    with serve_process(db_path, "--idle-timeout", "0") as (_serve, api_url):
        env = dict(os.environ, SLURM_QUOTA_URL=api_url, SLURM_QUOTA_WEB_PORT="0")
        web = subprocess.Popen([SLURM_QUOTA_WEB_BIN], stderr=subprocess.PIPE, text=True, env=env)
        try:
            line = web.stderr.readline()
            port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
            yield f"http://127.0.0.1:{port}/"
        finally:
            web.send_signal(signal.SIGTERM)
            web.wait(timeout=20)


@pytest.fixture(scope="module")
def chromium():
    return _chromium()


def test_dashboard_renders_the_ledger_numbers_in_chromium(chromium, db_path, tmp_path):
    with _dashboard(db_path) as url:
        dom = _run_chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", url)
        hours_dom = _run_chromium(
            tmp_path, "--virtual-time-budget=5000", "--dump-dom", url + "?unit=hours&user=alice"
        )
    parsed = table_rows(dom)
    users, accounts = parsed.sections["users"], parsed.sections["accounts"]
    assert list(users) == ["alice", "bob", "carol", "dave"]
    assert (users["alice"]["cpu-consumed"], users["alice"]["cpu-prealloc"]) == ("1,200", "250(3)")
    assert (users["alice"]["cpu-quota"], users["alice"]["cpu-usage"]) == ("5,000", "29.0%")
    assert users["bob"]["cpu-prealloc"] == "307(2)"
    assert users["bob"]["cpu-usage"] == "93.1%"
    assert "warn" in parsed.classes["users"]["bob"]
    assert "crit" in parsed.classes["users"]["dave"]
    assert users["carol"]["gpu-quota"] == "∞"
    assert accounts["hpc"]["cpu-prealloc"] == "507(4)"
    assert accounts["phys"]["cpu-usage"] == "100.0%"
    # The page's script ran in the browser: it gave every <time> its UTC value as a title.
    assert "2024-05-01T10:00:00Z" in parsed.titles

    hours = table_rows(hours_dom)
    assert list(hours.sections["users"]) == ["alice"]
    assert hours.sections["users"]["alice"]["cpu-consumed"] == "20.00"
    assert list(hours.sections["accounts"]) == ["hpc", "phys"]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_dashboard_screenshot(chromium, db_path, tmp_path):
    shot = tmp_path / "dashboard.png"
    with _dashboard(db_path) as url:
        _run_chromium(
            tmp_path, "--hide-scrollbars", "--window-size=1400,900",
            "--virtual-time-budget=5000", f"--screenshot={shot}", url,
        )
    assert _png_size(shot) == (1400, 900)
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank canvas
    keep = os.environ.get("SLURM_QUOTA_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "dashboard.png")
