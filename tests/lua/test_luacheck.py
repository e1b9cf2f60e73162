"""luacheck (Debian lua-check) finds nothing in the plugin, with its globals declared."""

from __future__ import annotations

import subprocess

from tests import syspkgs
from tests.lua.harness import MODULE, PLUGIN


def luacheck(path, *globals_):
    proc = subprocess.run(
        ["luacheck", "--no-color", "--std", "lua51", "--no-max-line-length",
         "--read-globals", "slurm", *(["--globals", *globals_] if globals_ else []),
         "--", str(path)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 warnings / 0 errors" in proc.stdout


def test_module_is_luacheck_clean_and_sets_no_globals():
    syspkgs.require(["lua-check"])
    luacheck(MODULE)


def test_wiring_is_luacheck_clean_and_sets_only_the_entry_points():
    syspkgs.require(["lua-check"])
    luacheck(PLUGIN, "slurm_job_submit", "slurm_job_modify")
