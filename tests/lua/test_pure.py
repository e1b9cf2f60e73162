"""Section 1 of the plugin: the pure functions, on every Lua runtime."""

from __future__ import annotations

import re

import pytest

from tests.lua.harness import Plugin


@pytest.fixture
def m(runtime):
    return Plugin(runtime, None).m


@pytest.mark.parametrize(
    "spec, count",
    [
        (None, 1),
        ("", 1),
        ("0", 1),
        ("0-9", 10),
        ("1-3", 3),
        ("0-15:4", 4),
        ("0-15:4%2", 4),
        ("0-9%1", 10),
        ("1,3,5-7", 5),
        ("1,1,1", 1),
        ("0-5,3-7", 8),
        ("0-10:2,0-10:5", 7),  # {0,2,4,6,8,10} + {5}
        ("[0-3]", 4),
        ("7-7", 1),
        ("0-4000000", 4000001),
        ("5-5:100", 1),
    ],
)
def test_array_count(m, spec, count):
    assert m.parse_array_inx(spec) == count


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("a-b", "cannot read"),
        ("1-", "cannot read"),
        ("1,,2", "cannot read"),
        ("5-3", "ends before it starts"),
        ("0-9:0", "step"),
        ("0-9%x", "throttle"),
        ("0-9%", "throttle"),
        ("%4", "lists no index"),
        ("0-4000001", "larger than 4000000"),
        ("99999999999999", "larger than 4000000"),
        (" 1", "cannot read"),
        ("-1", "cannot read"),
    ],
)
def test_malformed_array_is_a_message_not_an_error(m, spec, fragment):
    count, message = m.parse_array_inx(spec)
    assert count is None
    assert fragment in message


@pytest.mark.parametrize(
    "text, expected",
    [
        ("gres:gpu:h100:2", [("h100", 2)]),
        ("gres:gpu:2", [(None, 2)]),
        ("gres/gpu:h100:2", [("h100", 2)]),
        ("gres/gpu:2", [(None, 2)]),
        ("gres/gpu=2", [(None, 2)]),
        ("gres/gpu:a100=3", [("a100", 3)]),
        ("gres:gpu:a100", [("a100", 1)]),
        ("gres/gpu", [(None, 1)]),
        ("gpu:h100:1", [("h100", 1)]),
        ("gres:gpu:1g.10gb:3", [("1g.10gb", 3)]),
        ("gres:gpu:h100:2,gres:gpu:a100:1", [("h100", 2), ("a100", 1)]),
        ("gres:shard:4,gres:gpu:1,license/matlab=2,gres/mps:100", [(None, 1)]),
        ("gres:gpu:2k", [(None, 2048)]),
        ("gres:gpu:0", [(None, 0)]),
        ("", []),
        (None, []),
        ("gres:shard:2", []),
    ],
)
def test_parse_gpus_every_spelling(m, text, expected):
    items = m.parse_gpus(text)
    got = [(g.type or None, g.count) for g in items.values()]
    assert got == expected


@pytest.mark.parametrize(
    "text", ["gres:gpu:h100:x", "gres:gpu:h100:2:3", "gres/gpu=", "gres:gpu::2"]
)
def test_unreadable_gpu_entry_is_a_message(m, text):
    items, message = m.parse_gpus(text)
    assert items is None
    assert "cannot read the GPU request" in message


def test_resolve_time(runtime):
    p = Plugin(runtime, None)
    lua = p.lua
    m = p.m
    main = lua.table_from({"name": "main", "default_time": 30, "max_time": 240})
    big = lua.table_from({"name": "big", "default_time": 60, "max_time": 1440})
    nomax = lua.table_from({"name": "nomax"})
    nodef = lua.table_from({"name": "nodef", "max_time": 120})

    def t(**kw):
        return lua.table_from(kw)

    def parts(*ps):
        return lua.table_from(list(ps))

    assert m.resolve_time(t(minutes=10), parts(main), None) == (10, "--time")
    assert m.resolve_time(t(unset=True), parts(main), None) == (30, "DefaultTime of partition main")
    assert m.resolve_time(t(infinite=True), parts(main), None) == (240, "MaxTime of partition main")
    assert m.resolve_time(t(unset=True), parts(main, big), None)[0] == 60
    assert m.resolve_time(t(infinite=True), parts(main, big), None)[0] == 1440
    assert m.resolve_time(t(unset=True), parts(nodef), None) == (120, "MaxTime of partition nodef")
    assert m.resolve_time(t(unset=True), parts(nomax), None) == (None, "unbounded")
    assert m.resolve_time(t(unset=True), parts(), None) == (None, "unbounded")
    assert m.resolve_time(t(unset=True), parts(nomax), 90) == (90, "default_time_minutes setting")
    # unbounded among several: the setting, unless a bounded candidate is larger
    assert m.resolve_time(t(unset=True), parts(nomax, big), 30)[0] == 60
    assert m.resolve_time(t(unset=True), parts(nomax, main), 45)[0] == 45


@pytest.mark.parametrize(
    "fields, cpus",
    [
        ({}, 1),
        ({"min_cpus": 1}, 1),
        ({"num_tasks": 4, "min_cpus": 4}, 4),
        ({"cpus_per_task": 32, "min_cpus": 32}, 32),
        ({"cpus_per_task": 32}, 32),  # -c 32 even if min_cpus were missing
        ({"num_tasks": 2, "cpus_per_task": 3, "min_cpus": 6}, 6),
        ({"min_nodes": 2, "ntasks_per_node": 2, "num_tasks": 4, "min_cpus": 4}, 4),
        ({"min_nodes": 2, "ntasks_per_node": 4, "cpus_per_task": 2}, 16),
        ({"pn_min_cpus": 8, "min_nodes": 2}, 16),
        ({"exclusive": True, "node_cpus": 16}, 16),
        ({"exclusive": True, "node_cpus": 16, "min_nodes": 2}, 32),
        ({"exclusive": True, "node_cpus": 16, "num_tasks": 20, "min_cpus": 20}, 32),
        ({"exclusive": True}, 1),  # no partition shape known: what was asked
    ],
)
def test_resolve_cpus(runtime, fields, cpus):
    p = Plugin(runtime, None)
    got = p.m.resolve_cpus(p.lua.table_from(fields))
    assert got[0] == cpus


def test_decide_first_failure_wins_and_unlimited_is_skipped(runtime):
    p = Plugin(runtime, None)
    lua, m = p.lua, p.m
    r = m.set_amounts(lua.table_from({"cpus": 4, "gpu_weight": 1, "array_count": 2}), 30)
    assert (r.cpu_total, r.gpu_total) == (240, 60)

    def ledger(name, qc, cc, rc, qg, cg, rg, jobs=0):
        return lua.table_from({
            "name": name, "quota_cpu": qc, "consumed_cpu": cc, "reserved_cpu": rc,
            "quota_gpu": qg, "consumed_gpu": cg, "reserved_gpu": rg, "open_jobs": jobs,
        })

    ok = lua.table_from({"user": ledger("alice", -1, 0, 0, -1, 0, 0),
                         "account": ledger("research", 240, 0, 0, 60, 0, 0)})
    assert m.decide(r, ok) is None
    f = m.decide(r, lua.table_from({"user": ledger("alice", 1000, 500, 300, 50, 0, 0, 3),
                                    "account": ledger("research", 0, 0, 0, 0, 0, 0)}))
    assert (f.owner, f.resource, f.requested, f.available) == ("user", "cpu", 240, 200)
    assert (f.quota, f.consumed, f.reserved, f.open_jobs) == (1000, 500, 300, 3)
    f = m.decide(r, lua.table_from({"user": ledger("alice", -1, 0, 0, 59, 0, 0),
                                    "account": ledger("research", 0, 0, 0, 0, 0, 0)}))
    assert (f.owner, f.resource) == ("user", "gpu")
    f = m.decide(r, lua.table_from({"user": ledger("alice", -1, 0, 0, -1, 0, 0),
                                    "account": ledger("research", 239, 0, 0, -1, 0, 0)}))
    assert (f.owner, f.resource, f.name) == ("account", "cpu", "research")


def test_job_without_gpus_is_never_refused_on_gpu_quota(runtime):
    p = Plugin(runtime, None)
    lua, m = p.lua, p.m
    r = m.set_amounts(lua.table_from({"cpus": 1, "gpu_weight": 0, "array_count": 1}), 30)
    exhausted = lua.table_from({"name": "x", "quota_cpu": -1, "quota_gpu": 0,
                                "consumed_gpu": 500, "reserved_gpu": 0})
    assert m.decide(r, lua.table_from({"user": exhausted, "account": exhausted})) is None


def test_gpu_minutes_round_up_without_float_noise(runtime):
    p = Plugin(runtime, None)
    lua, m = p.lua, p.m
    r = m.set_amounts(lua.table_from({"cpus": 1, "gpu_weight": 0.1 * 3, "array_count": 1}), 10)
    assert r.gpu_minutes == 3  # 3 x 0.1 x 10 is 3.0000000000000004 in floats
    r = m.set_amounts(lua.table_from({"cpus": 1, "gpu_weight": 0.5, "array_count": 1}), 3)
    assert r.gpu_minutes == 2  # 1.5 rounds up


def test_amounts_are_clamped_and_exact_for_huge_requests(runtime):
    p = Plugin(runtime, None)
    lua, m = p.lua, p.m
    r = m.set_amounts(lua.table_from({"cpus": 4294967293, "gpu_weight": 0, "array_count": 3}),
                      4294967293)
    assert r.cpu_minutes == 1e15
    assert r.cpu_total == 3e15


def test_tokens(m):
    u = "0f8fad5b-d9cb-469f-a165-70867728950e"
    assert m.find_token(f"slurm-quota:{u}") == (u, f"slurm-quota:{u}")
    assert m.find_token(f"note by admin slurm-quota:{u} more")[0] == u
    other = "1f8fad5b-d9cb-469f-a165-70867728950e"
    assert m.find_token(f"slurm-quota:{other} slurm-quota:{u}")[0] == u  # the last, like charge
    assert m.find_token(u) == (u, u)  # the seed system's bare UUID
    assert m.find_token(f"text {u}") is None
    assert m.find_token(None) is None
    assert m.append_token(None, "slurm-quota:x") == "slurm-quota:x"
    assert m.append_token("", "slurm-quota:x") == "slurm-quota:x"
    assert m.append_token("keep me", "slurm-quota:x") == "keep me slurm-quota:x"
    assert m.append_token("keep slurm-quota:x", "slurm-quota:x") == "keep slurm-quota:x"


def test_uuid4_is_random_and_well_formed(m):
    seen = {m.uuid4() for _ in range(200)}
    assert len(seen) == 200
    pattern = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
    assert all(pattern.match(u) for u in seen)


def test_plugin_does_not_use_math_random_or_sleep_or_fork():
    from tests.lua.harness import MODULE, PLUGIN

    def code_of(path):
        text = re.sub(r"--\[\[.*?\]\]", "", path.read_text(), flags=re.S)
        return "\n".join(line.split("--", 1)[0] for line in text.splitlines())

    module, wiring = code_of(MODULE), code_of(PLUGIN)
    for forbidden in ("math.random", "os.execute", "io.popen", "sleep", "fork", "os.exit"):
        assert forbidden not in module, forbidden
        assert forbidden not in wiring, forbidden
    assert "/dev/urandom" in module
    assert "BEGIN IMMEDIATE" in module
    assert module.rstrip().endswith("return M")
    assert wiring.rstrip().endswith("return slurm.SUCCESS")


def test_settings_parse(runtime):
    p = Plugin(runtime, None)
    s = p.m.parse_settings(p.lua.table_from([
        p.lua.table_from(["default_user_quota_cpu_minutes", "600"]),
        p.lua.table_from(["default_time_minutes", "not a number"]),
        p.lua.table_from(["node_gpus", "gpu:h100:2"]),
    ]))
    assert s.default_user_quota_cpu_minutes == 600
    assert s.default_time_minutes is None
    assert s.node_gpus == "gpu:h100:2"


def test_user_may_raise_time(runtime):
    p = Plugin(runtime, None)
    lua, m = p.lua, p.m
    main = lua.table_from([lua.table_from({"name": "main", "max_time": 240})])
    free = lua.table_from([lua.table_from({"name": "free"})])
    none = lua.table_from([])
    t = lua.table_from({"minutes": 200})
    inf = lua.table_from({"infinite": True})
    assert m.user_may_raise_time(True, t, 200, main) is True
    assert m.user_may_raise_time(True, t, 241, main) is False
    assert m.user_may_raise_time(False, t, 200, main) is False  # running
    assert m.user_may_raise_time(True, inf, 240, main) is False
    assert m.user_may_raise_time(True, inf, None, free) is True
    assert m.user_may_raise_time(True, t, 200, none) is False  # unsure: no
