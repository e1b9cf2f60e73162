"""Install the Debian packages a test layer needs, or skip (fail in CI) loudly.

Tests that need real system components (lua5.1 + LuaDBI, the Slurm lab) call `require()`.
On a root Debian machine the packages are installed on first use; elsewhere the test is
skipped with the reason, and when SLURM_QUOTA_REQUIRE_SYSTEM=1 (set by .ci/run) a skip
becomes a failure, so CI can never pass by skipping.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading

import pytest

REQUIRE_ENV = "SLURM_QUOTA_REQUIRE_SYSTEM"
_lock = threading.Lock()
_apt_updated = False


def required() -> bool:
    """True when skipping a system-level test must fail the run (CI)."""
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0", "false", "no")


def skip_or_fail(reason: str) -> None:
    """Skip the calling test, or fail it when system tests are required."""
    if required():
        pytest.fail(f"{reason} ({REQUIRE_ENV} is set, so this cannot be skipped)", pytrace=False)
    pytest.skip(f"SKIPPED LOUDLY: {reason}")


def missing(packages: list[str]) -> list[str]:
    """Return the Debian packages of the list that are not installed."""
    if not shutil.which("dpkg-query"):
        return list(packages)
    absent = []
    for pkg in packages:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True
        )
        if "install ok installed" not in out.stdout:
            absent.append(pkg)
    return absent


def ensure(packages: list[str]) -> str | None:
    """Install what is missing of packages; return None on success or the reason it failed."""
    global _apt_updated
    with _lock:
        absent = missing(packages)
        if not absent:
            return None
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            return f"Debian packages missing and not root with apt-get: {' '.join(absent)}"
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        if not _apt_updated:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
            _apt_updated = True
        proc = subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *absent],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            return f"apt-get install {' '.join(absent)} failed: {proc.stderr.strip()[-500:]}"
        still = missing(absent)
        if still:
            return f"packages still missing after apt-get install: {' '.join(still)}"
        return None


def require(packages: list[str]) -> None:
    """Make sure packages are installed, else skip (or fail under CI) with the reason."""
    reason = ensure(packages)
    if reason:
        skip_or_fail(reason)
