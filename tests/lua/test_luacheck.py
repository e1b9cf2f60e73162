"""luacheck (Debian lua-check) finds nothing in the plugin, with its globals declared."""

from __future__ import annotations

import subprocess

from tests import syspkgs
from tests.lua.harness import PLUGIN


def test_plugin_is_luacheck_clean():
    syspkgs.require(["lua-check"])
    proc = subprocess.run(
        ["luacheck", "--no-color", "--std", "lua51", "--no-max-line-length",
         "--globals", "slurm", "slurm_job_submit", "slurm_job_modify", "slurm_quota",
         "--", str(PLUGIN)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 warnings / 0 errors" in proc.stdout
