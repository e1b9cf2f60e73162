"""Run tests/lua/driver.lua under a real Lua (5.1: Debian's Slurm; 5.4: EL9's) with the real
LuaDBI (Debian packages)."""

from __future__ import annotations

import math
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests import syspkgs
from tests.lua.harness import PLUGIN

DRIVER = Path(__file__).resolve().parent / "driver.lua"
# The interpreters slurmctld links: liblua5.1 (Debian, every release) and Lua 5.4 (EL9).
INTERPRETERS = ("lua5.1", "lua5.4")
PACKAGES = [*INTERPRETERS, "lua-dbi-sqlite3", "lua-dbi-mysql", "lua-posix"]
# The interpreter run_cases() uses; tests/lua/test_real_lua.py runs every test under each.
current = "lua5.1"


def require_real_lua() -> None:
    """Install lua5.1, lua5.4 + LuaDBI SQLite3 and MySQL + luaposix, or skip (fail in CI)
    loudly."""
    syspkgs.require(PACKAGES)


def lua_literal(value: Any) -> str:
    """A Python value as a Lua literal (dicts -> tables, None -> nil)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        v = float(value)
        if math.isnan(v):
            return "(0/0)"
        if math.isinf(v):
            return "(1/0)" if v > 0 else "(-1/0)"
        return repr(v)
    if isinstance(value, str):
        return '"' + "".join(
            chr(b) if b < 128 and (chr(b).isalnum() or chr(b) in " -_:,/.=%[]()") else f"\\{b:03d}"
            for b in value.encode("utf-8")
        ) + '"'
    if isinstance(value, dict):
        items = ", ".join(f"[{lua_literal(k)}] = {lua_literal(v)}" for k, v in value.items()
                          if v is not None)
        return "{" + items + "}"
    if isinstance(value, (list, tuple)):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    raise TypeError(type(value))


@dataclass
class Call:
    rc: int
    ms: float
    admin_comment: str | None
    logs: list[tuple[str, str]] = field(default_factory=list)

    @property
    def uuid(self) -> str | None:
        m = re.findall(r"slurm-quota:([0-9a-f-]{36})", self.admin_comment or "")
        return m[-1] if m else None

    def log_text(self, level: str | None = None) -> str:
        return "\n".join(m for lv, m in self.logs if level is None or lv == level)


@dataclass
class Run:
    load_rc: str
    calls: list[Call]
    globals: list[str]
    stderr: str
    db_fds: int = -1  # descriptors still open on the ledger after drop_connection()


def run_cases(cases: list[dict[str, Any]], tmp_path: Path, db_path: Path | str | None,
              plugin: Path = PLUGIN, timeout: float = 60,
              env_extra: dict[str, str] | None = None,
              argv_prefix: list[str] | None = None) -> Run:
    """Write the cases as Lua, run the driver under the current interpreter with
    SLURM_QUOTA_DB=db_path (unset when None: e.g. a MariaDB ledger named by SLURM_QUOTA_CONF
    in env_extra)."""
    cases_file = tmp_path / "cases.lua"
    cases_file.write_text("return " + lua_literal(cases) + "\n")
    env = dict(os.environ)
    env.pop("SLURM_QUOTA_DB", None)
    if db_path is not None:
        env["SLURM_QUOTA_DB"] = str(db_path)
    env.update(env_extra or {})
    proc = subprocess.run([*(argv_prefix or []), current, str(DRIVER), str(plugin),
                           str(cases_file)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    calls: dict[int, Call] = {}
    logs: dict[int, list[tuple[str, str]]] = {}
    load_rc, globs, db_fds = "", [], -1
    for line in proc.stdout.splitlines():
        if line.startswith("LOAD "):
            load_rc = line.split("rc=", 1)[1]
        elif line.startswith("LOG "):
            _, n, level, msg = line.split(" ", 3)
            logs.setdefault(int(n), []).append((level, msg))
        elif line.startswith("CALL "):
            m = re.match(r"CALL (\d+) rc=(-?\d+) ms=([\d.]+) admin_comment=\"(.*)\"$", line)
            assert m, line
            ac = m.group(4)
            calls[int(m.group(1))] = Call(int(m.group(2)), float(m.group(3)),
                                          None if ac == "nil" else ac)
        elif line.startswith("GLOBALS "):
            globs = [g for g in line[len("GLOBALS "):].split(",") if g]
        elif line.startswith("DBFDS "):
            db_fds = int(line.split()[1])
    out = []
    for n in sorted(calls):
        c = calls[n]
        c.logs = logs.get(n, [])
        out.append(c)
    return Run(load_rc, out, globs, proc.stderr, db_fds)
