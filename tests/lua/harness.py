"""Run lua/job_submit.lua under lupa the way slurmctld runs it.

- `slurm` is a fake table with the exact constants dumped by a real Slurm 22.05 slurmctld
  (fixtures/lua_constants.txt) and log functions (printf semantics) that record.
- `require "DBI"` returns a Python-backed adapter: DBI.Connect/prepare/execute/fetch/close run
  the plugin's own SQL with Python's sqlite3 on the real migrated file (a real temp file). It
  keeps LuaDBI 0.7's (dbd/sqlite3) rules that matter to a plugin re-using statements: execute()
  re-runs a statement; after a failed execute() the next one of that statement reports the same
  error again (sqlite3_reset returns it); a closed statement cannot execute; closing a
  connection with statements still open leaves it open (sqlite3_close: SQLITE_BUSY).
- job_desc, job_rec and part_list entries are proxy tables: pairs() yields nothing and fields
  come through __index, from the captured 22.05 values (fixtures/job_desc_table*.md,
  fixtures/job_modify_full.txt). Numbers are passed as floats, as lua_pushnumber does.
"""

from __future__ import annotations

import os
import re
import sqlite3
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# What slurmctld loads (the two entry points) and the module holding the logic.
PLUGIN = ROOT / "lua" / "job_submit.lua"
MODULE = ROOT / "lua" / "slurm_quota.lua"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

RUNTIMES = ["lua51", "lua52", "lua53", "lua54", "luajit21"]

NO_VAL = 4294967294
NO_VAL16 = 65534
INFINITE = 4294967295

# The partition of the real lab (SLURM-FACTS §3 "part_list entry").
MAIN_PARTITION = {
    "name": "main", "default_time": 30, "max_time": 240, "max_nodes": 4294967295,
    "min_nodes": 0, "max_cpus_per_node": 4294967295, "total_cpus": 16, "total_nodes": 1,
    "nodes": "localhost", "flag_default": 1, "flags": 1, "state_up": 3, "max_share": 1,
    "priority_tier": 1,
}


def lua_module(name: str):
    """The lupa module of one Lua runtime (lupa.lua51 ... lupa.luajit21)."""
    import importlib

    return importlib.import_module(f"lupa.{name}")


def _value(text: str) -> Any:
    text = text.strip()
    if text == "nil":
        return None
    if text.startswith('"') and text.endswith('"'):
        return text[1:-1]
    if text.startswith("boolean:"):
        return text == "boolean:true"
    try:
        return float(text)
    except ValueError:
        return text


@cache
def constants() -> dict[str, Any]:
    """slurm.* constants dumped by the probe inside a real slurmctld (functions excluded)."""
    out: dict[str, Any] = {}
    for line in (FIXTURES / "lua_constants.txt").read_text().splitlines():
        m = re.match(r"CONST slurm\.(\w+)=(.*)$", line)
        if not m or m.group(2).startswith(("function:", "table:")):
            continue
        out[m.group(1)] = _value(m.group(2))
    return out


def _md_tables(path: Path) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    header: list[str] = []
    for line in path.read_text().splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "case":
            header = cells
            continue
        rows[cells[0]] = {h: _value(c) for h, c in zip(header[1:], cells[1:])}
    return rows


# Slurm series whose job_desc captures exist: 22.05 in fixtures/job_desc_table*.md (the
# first study), the later ones in tests/fixtures/slurm-<series>/job_desc.tsv (capture.py).
SERIES = ("22.05", "24.11", "26.05")
SERIES_FIXTURES = ROOT / "tests" / "fixtures"


@cache
def captured_submits(series: str = "22.05") -> dict[str, dict[str, Any]]:
    """job_desc field values per captured submission, keyed like 'c04_c4 (#4)'."""
    if series != "22.05":
        out: dict[str, dict[str, Any]] = {}
        path = SERIES_FIXTURES / f"slurm-{series}" / "job_desc.tsv"
        for line in path.read_text().splitlines():
            if line and not line.startswith("#"):
                case, field, value = line.split("\t")
                out.setdefault(case, {})[field] = _value(value)
        return out
    t1 = _md_tables(FIXTURES / "job_desc_table1.md")
    t2 = _md_tables(FIXTURES / "job_desc_table2.md")
    out = {}
    for case, fields in t1.items():
        merged = dict(fields)
        merged.update(t2.get(case, {}))
        merged.pop("script_len", None)
        out[case] = merged
    return out


def submit_case(prefix: str, series: str = "22.05", **overrides: Any) -> dict[str, Any]:
    """A captured job_desc (first case whose name starts with prefix), with overrides."""
    for case, fields in captured_submits(series).items():
        if case.startswith(prefix):
            out = dict(fields)
            out.setdefault("name", case.split(" ")[0])
            out.update(overrides)
            return out
    raise KeyError(prefix)


@cache
def captured_modifies() -> list[tuple[int, dict[str, Any], dict[str, Any]]]:
    """(modify_uid, job_desc, job_rec) of each captured slurm_job_modify call."""
    calls = []
    cur = None
    for line in (FIXTURES / "job_modify_full.txt").read_text().splitlines():
        m = re.match(r"== MODIFY#\d+ modify_uid=(\d+)", line)
        if m:
            cur = (int(m.group(1)), {}, {})
            calls.append(cur)
            continue
        m = re.match(r"\s+(job_desc|job_rec)\.(\w+) = (.*)$", line)
        if m and cur is not None:
            target = cur[1] if m.group(1) == "job_desc" else cur[2]
            target[m.group(2)] = _value(m.group(3))
    return calls


def modify_case(**desc_overrides: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The captured 'alice lowers TimeLimit' update: an update with nothing set except
    desc_overrides (time_limit=NO_VAL unless given), over the captured job_rec."""
    _, desc, rec = captured_modifies()[0]
    desc = dict(desc)
    desc["time_limit"] = float(NO_VAL)
    desc.update(desc_overrides)
    return desc, dict(rec)


_LUA_SETUP = r"""
local py, consts = ...
local slurm = {}
for k, v in pairs(consts) do slurm[k] = v end
local function logger(level)
    return function(fmt, ...) py.log(level, string.format(fmt, ...)) end
end
slurm.log_info = logger("info")
slurm.log_verbose = logger("verbose")
slurm.log_debug = logger("debug")
slurm.log_error = logger("error")
slurm.error = logger("error")
slurm.log_user = logger("user")
slurm.user_msg = logger("user")
_G.slurm = slurm

local DBI = {}
function DBI.Connect(driver, path)
    assert(driver == "SQLite3", "driver " .. tostring(driver))
    local cid, err = py.connect(path)
    if not cid then return nil, err end
    local conn = {}
    function conn:autocommit(on) return py.autocommit(cid, on) end
    function conn:prepare(sql)
        local sid, perr = py.prepare(cid, sql)
        if not sid then return nil, perr end
        local st = {}
        function st:execute(...)
            return py.execute(sid, { ... }, select("#", ...))
        end
        function st:fetch(named)
            assert(named == false, "the plugin must fetch rows as arrays")
            return py.fetch(sid)
        end
        function st:close() return py.close_stmt(sid) end
        return st
    end
    function conn:close() return py.close_conn(cid) end
    return conn
end
package.preload["DBI"] = function() return DBI end
"""

_LUA_POSIX_STAT = r"""
local py = ...
package.preload["posix.sys.stat"] = function()
    return { stat = function(path)
        local dev, ino, mode = py.stat(path)
        if not dev then return nil end
        return { st_dev = dev, st_ino = ino, st_mode = mode }
    end }
end
"""

_LUA_HELPERS = r"""
local function proxy(fields, writes)
    return setmetatable({}, {
        __index = function(_, k) return fields[k] end,
        __newindex = function(_, k, v) fields[k] = v; writes[k] = v end,
    })
end
local function call_submit(desc, parts, uid, writes)
    local part_list = {}
    for name, p in pairs(parts) do part_list[name] = proxy(p, {}) end
    return slurm_job_submit(proxy(desc, writes), part_list, uid)
end
local function call_modify(desc, rec, parts, uid, writes)
    local part_list = {}
    for name, p in pairs(parts) do part_list[name] = proxy(p, {}) end
    return slurm_job_modify(proxy(desc, writes), proxy(rec, {}), part_list, uid)
end
local function globals()
    local g = {}
    for k in pairs(_G) do g[#g + 1] = k end
    return g
end
return call_submit, call_modify, globals
"""


@dataclass
class Result:
    """What one entry point call did."""

    rc: int
    writes: dict[str, Any]
    user_lines: list[str]
    logs: list[tuple[str, str]]

    @property
    def admin_comment(self) -> str | None:
        return self.writes.get("admin_comment")

    @property
    def uuid(self) -> str | None:
        ac = self.admin_comment
        if not ac:
            return None
        m = re.findall(r"slurm-quota:([0-9a-f-]{36})", ac)
        return m[-1] if m else None

    def log_text(self, level: str | None = None) -> str:
        return "\n".join(m for lv, m in self.logs if level is None or lv == level)


@dataclass
class _Bridge:
    """The Python side of the fake slurm table and DBI module."""

    logs: list[tuple[str, str]] = field(default_factory=list)
    conns: dict[int, sqlite3.Connection] = field(default_factory=dict)
    stmts: dict[int, list] = field(default_factory=dict)
    next_id: int = 1
    lua: Any = None
    # SQL of every execute() in order, and of every prepare()
    statements: list[str] = field(default_factory=list)
    prepared: list[str] = field(default_factory=list)
    # connections whose close() found unfinalized statements (left open, as SQLite does)
    leaked: list[int] = field(default_factory=list)

    def stat(self, path: str):
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_dev, st.st_ino, st.st_mode

    def log(self, level: str, msg: str) -> None:
        self.logs.append((level, msg))

    def connect(self, path: str):
        try:
            conn = sqlite3.connect(path, timeout=0, isolation_level=None)
        except sqlite3.Error as err:
            return None, f"Failed to connect to database: {err}"
        self.next_id += 1
        self.conns[self.next_id] = conn
        return self.next_id

    def autocommit(self, cid: int, on: bool) -> bool:
        return True

    def prepare(self, cid: int, sql: str):
        if cid not in self.conns:
            return None, "Database not available"
        self.next_id += 1
        # [connection id, sql, pending rows, error a failed execute left behind]
        self.stmts[self.next_id] = [cid, sql, [], None]
        self.prepared.append(sql)
        return self.next_id

    def execute(self, sid: int, args, n: int):
        if sid not in self.stmts:
            return False, "Execute called on a closed or invalid statement"
        cid, sql, _, pending = self.stmts[sid]
        if cid not in self.conns:
            raise RuntimeError("Database handle has been closed")
        if pending is not None:
            self.stmts[sid][3] = None
            return False, pending
        values = []
        for i in range(1, int(n) + 1):
            v = args[i]
            values.append(v)
        self.statements.append(sql)
        try:
            cur = self.conns[cid].execute(sql, values)
            self.stmts[sid][2] = list(cur.fetchall())
        except sqlite3.Error as err:
            self.stmts[sid][2] = []
            self.stmts[sid][3] = f"Execute failed {err}"
            return False, f"Execute failed {err}"
        return True

    def fetch(self, sid: int):
        if sid not in self.stmts:
            raise RuntimeError("Fetch called on a closed or invalid statement")
        rows = self.stmts[sid][2]
        if not rows:
            return None
        row = rows.pop(0)
        t = self.lua.table()
        for i, v in enumerate(row, start=1):
            if v is not None:
                t[i] = v
        return t

    def close_stmt(self, sid: int) -> bool:
        self.stmts.pop(sid, None)
        return True

    def close_conn(self, cid: int) -> bool:
        if any(st[0] == cid for st in self.stmts.values()):
            self.leaked.append(cid)  # sqlite3_close() -> SQLITE_BUSY: the connection stays
            return True
        conn = self.conns.pop(cid, None)
        if conn is not None:
            conn.close()
        return True

    def open_statements(self) -> int:
        """Statements prepared and not yet closed, over every connection."""
        return len(self.stmts)


class Plugin:
    """lua/job_submit.lua loaded in one lupa runtime with the fake slurm and DBI."""

    def __init__(self, runtime: str, db_path: Path | str | None, *, fail_open: bool = True,
                 source: str | None = None, preload_posix_stat: bool = False):
        self.runtime = runtime
        self.bridge = _Bridge()
        self.lua = lua_module(runtime).LuaRuntime(unpack_returned_tuples=True)
        self.bridge.lua = self.lua
        self.lua.execute(_LUA_SETUP, self.bridge, self.lua.table_from(constants()))
        if preload_posix_stat:
            self.lua.execute(_LUA_POSIX_STAT, self.bridge)
        self.call_submit, self.call_modify, self._globals = self.lua.execute(_LUA_HELPERS)
        self.globals_before = set(self._globals().values())
        # slurmctld loads job_submit.lua from a file; here the module is loaded first from its
        # text (source replaces it) so that the wiring finds it in package.loaded.
        self.lua.execute("package.loaded.slurm_quota = assert(loadstring or load)(...)()",
                         source if source is not None else MODULE.read_text())
        self.load_rc = self.lua.execute(PLUGIN.read_text())
        self.m = self.lua.eval("package.loaded.slurm_quota")
        if db_path is not None:
            self.m.config.db_path = str(db_path)
        self.m.config.fail_open = fail_open

    @property
    def logs(self) -> list[tuple[str, str]]:
        return self.bridge.logs

    def new_globals(self) -> set[str]:
        return set(self._globals().values()) - self.globals_before

    def _table(self, d: dict[str, Any]):
        t = self.lua.table()
        for k, v in d.items():
            if v is None:
                continue
            if isinstance(v, bool) or isinstance(v, str):
                t[k] = v
            elif isinstance(v, (int, float)):
                t[k] = float(v)
            else:
                t[k] = v
        return t

    def _parts(self, parts: list[dict[str, Any]] | None):
        t = self.lua.table()
        for p in [MAIN_PARTITION] if parts is None else parts:
            t[p["name"]] = self._table(p)
        return t

    def _run(self, fn, *args) -> Result:
        start = len(self.bridge.logs)
        writes = self.lua.table()
        rc = fn(*args, writes)
        new_logs = self.bridge.logs[start:]
        return Result(
            rc=int(rc),
            writes=dict(writes.items()),
            user_lines=[m for lv, m in new_logs if lv == "user"],
            logs=new_logs,
        )

    def submit(self, desc: dict[str, Any], parts: list[dict[str, Any]] | None = None,
               submit_uid: int = 1001) -> Result:
        """Call slurm_job_submit(job_desc, part_list, submit_uid) with proxies."""
        return self._run(self.call_submit, self._table(desc), self._parts(parts),
                         float(submit_uid))

    def modify(self, desc: dict[str, Any], rec: dict[str, Any],
               parts: list[dict[str, Any]] | None = None, modify_uid: int = 1001) -> Result:
        """Call slurm_job_modify(job_desc, job_rec, part_list, modify_uid) with proxies."""
        return self._run(self.call_modify, self._table(desc), self._table(rec),
                         self._parts(parts), float(modify_uid))


def rows(db_path: Path | str, sql: str, *args: Any) -> list[tuple]:
    """Read the ledger with a separate connection (what other processes see)."""
    conn = sqlite3.connect(str(db_path))
    try:
        return list(conn.execute(sql, args).fetchall())
    finally:
        conn.close()


def execute(db_path: Path | str, sql: str, *args: Any) -> None:
    """Write to the ledger (test setup)."""
    conn = sqlite3.connect(str(db_path), isolation_level=None)
    try:
        conn.execute(sql, args)
    finally:
        conn.close()


def prealloc(db_path: Path | str, uuid: str) -> tuple | None:
    """(username, account, cpu, gpu, array_size) of a preallocation row."""
    found = rows(
        db_path,
        "SELECT username, account, preallocated_cpu_minutes, preallocated_gpu_minutes, "
        "array_size FROM jobs_preallocations WHERE job_uuid = ?",
        uuid,
    )
    return found[0] if found else None
