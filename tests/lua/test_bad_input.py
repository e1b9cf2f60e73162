"""Issue 19 in the plugin: counts it cannot read are refused, long specifications are refused
before they cost time, a job without user_name is still checked, and a ledger path that is
not a regular file is never opened."""

from __future__ import annotations

import os
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slurm_quota import admin, validate
from slurm_quota.errors import InvalidInput
from tests.lua.harness import Plugin, prealloc, rows, submit_case
from tests.lua.test_submit import set_setting, set_user_quota

# -- defect 8: what cannot be a GPU count is refused, not read as a GPU type ----------------


@pytest.mark.parametrize(
    "text",
    ["gres/gpu:9999999999999999", "gres/gpu:1e5", "gres/gpu:0x10", "gres:gpu:1.5",
     "gpu:-1", "gres/gpu:+2", "gres/gpu:99999999999999999k", "gres/gpu:.5"],
)
def test_a_number_that_is_not_a_count_is_refused(plugin, text):
    got = plugin.m.parse_gpus(text)
    assert got[0] is None
    assert "is not a GPU count" in got[1]


@pytest.mark.parametrize(
    ("text", "gpu_type", "count"),
    [("gres/gpu:1g.5gb", "1g.5gb", 1), ("gres/gpu:h100", "h100", 1), ("gres/gpu:2", False, 2),
     ("gres/gpu:3g.20gb:2", "3g.20gb", 2)],
)
def test_gpu_types_that_start_with_a_digit_are_still_types(plugin, text, gpu_type, count):
    got = plugin.m.parse_gpus(text)
    assert (got[1].type, got[1].count) == (gpu_type, count)


def test_a_job_asking_gres_gpu_1e5_is_refused_with_a_message(plugin, db_path):
    res = plugin.submit(submit_case("c01_plain", tres_per_node="gres/gpu:1e5"))
    assert res.rc == -1
    assert "1e5 is not a GPU count" in res.user_lines[0]
    assert rows(db_path, "SELECT COUNT(*) FROM jobs_preallocations") == [(0,)]


# -- defect 2: both sides read every stored setting the same way -----------------------------


@pytest.mark.parametrize("value", ["٣", "0x10", "1e5", "inf", "nan", " 12.5", "１"])
def test_numeric_settings_read_ascii_integers_only(plugin, value):
    s = plugin.m.parse_settings(plugin.lua.table_from(
        [plugin.lua.table_from(["default_time_minutes", value]),
         plugin.lua.table_from(["default_user_quota_cpu_minutes", value])]))
    assert s.default_time_minutes is None
    assert s.default_user_quota_cpu_minutes is None


def test_node_gpus_with_a_unicode_digit_is_one_gpu_of_type_٣_in_lua_and_refused_in_python(
    plugin,
):
    got = plugin.m.parse_gpus("gpu:٣")
    assert (got[1].type, got[1].count) == ("٣", 1)  # what a stored "gpu:٣" would have meant
    with pytest.raises(InvalidInput):
        admin.parse_setting("node_gpus", "gpu:٣")


node_gpu_entries = st.builds(
    lambda t, c: f"gpu:{t + ':' if t else ''}{c}",
    st.one_of(st.just(""), st.text(alphabet="abh0123456789_.-xeE٣", min_size=1, max_size=6)),
    st.one_of(st.integers(0, 12000).map(str), st.text(alphabet="0123456789٣²ex+-.", max_size=5)),
)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.lists(node_gpu_entries, min_size=1, max_size=3).map(",".join))
def test_every_node_gpus_value_python_stores_reads_the_same_in_lua(plugin, value):
    try:
        _, stored = admin.parse_setting("node_gpus", value)
    except InvalidInput:
        return  # never stored
    expected = validate.parse_node_gpus(stored)
    got = plugin.m.parse_gpus(stored)
    assert not isinstance(got, tuple), got
    assert [(g.type or None, int(g.count)) for g in got.values()] == expected


# -- defect 7: the array parse is bounded ------------------------------------------------------


def test_an_array_spec_over_the_length_bound_is_refused_with_a_message(plugin, db_path):
    spec = ",".join(str(i) for i in range(200_000))  # 1.3 MB
    res = plugin.submit(submit_case("c01_plain", array_inx=spec))
    assert res.rc == -1
    assert "is longer than 65536 characters" in res.user_lines[0]
    assert len(res.user_lines[0]) < 400  # the message does not carry the megabytes
    assert rows(db_path, "SELECT COUNT(*) FROM jobs_preallocations") == [(0,)]


def test_an_array_spec_at_the_length_bound_is_still_counted(plugin):
    items = [str(1_000_000 + 3 * i) for i in range(8000)]
    need = 65536 - len(",".join(items))
    dups, zeros = divmod(need, len(",1000000-1000000:1"))
    items[:zeros] = ["0" + i for i in items[:zeros]]  # 01000000 is index 1000000 still
    spec = ",".join(items) + ",1000000-1000000:1" * dups  # index 1000000 again
    assert len(spec) == 65536
    assert plugin.m.parse_array_inx(spec) == 8000


def test_an_array_spec_with_more_than_10000_items_is_refused(plugin):
    got = plugin.m.parse_array_inx(",".join(["0"] * 10_001))
    assert got[0] is None and "lists more than 10000 indices or ranges" in got[1]
    assert plugin.m.parse_array_inx(",".join(["0"] * 10_000)) == 1


def test_a_long_tres_field_is_refused_with_a_message(plugin):
    got = plugin.m.parse_gpus("gres/gpu:1," * 1000)
    assert got[0] is None and "longer than 4096 characters" in got[1]


# -- defect 6: no user_name -> the name of user_id, else the failure policy ---------------------

FAKE_PWD = """
local names = ...
package.loaded["posix.pwd"] = nil
package.preload["posix.pwd"] = function()
    return { getpwuid = function(uid)
        local n = names[uid]
        if n then return { pw_name = n, pw_uid = uid } end
        return nil
    end }
end
"""


def _with_passwd(plugin: Plugin, names: dict[int, str]) -> None:
    plugin.lua.execute(FAKE_PWD, plugin.lua.table_from({float(k): v for k, v in names.items()}))


@pytest.mark.parametrize("user_name", [None, ""])
def test_a_job_without_user_name_is_reserved_for_its_user_id(plugin, db_path, user_name):
    _with_passwd(plugin, {1001: "alice"})
    set_user_quota(db_path, "alice", cpu=1000)
    res = plugin.submit(submit_case("c01_plain", user_name=user_name, user_id=1001.0))
    assert res.rc == 0
    assert prealloc(db_path, res.uuid)[0] == "alice"
    assert "user_id 1001 is alice" in res.log_text("info")


def test_a_job_without_user_name_over_its_users_quota_is_refused(plugin, db_path):
    _with_passwd(plugin, {1001: "alice"})
    set_user_quota(db_path, "alice", cpu=5)
    res = plugin.submit(submit_case("c01_plain", user_name=None, user_id=1001.0))
    assert res.rc == 2050
    assert "user alice" in res.user_lines[0]


@pytest.mark.parametrize(("fail_open", "rc"), [(True, 0), (False, -1)])
def test_a_job_whose_user_id_has_no_name_gets_the_failure_policy(plugin, db_path, fail_open, rc):
    _with_passwd(plugin, {})
    plugin.m.config.fail_open = fail_open
    res = plugin.submit(submit_case("c01_plain", user_name=None, user_id=4242.0))
    assert res.rc == rc
    assert "user_id 4242 has no passwd entry" in res.log_text("error")


# -- defect 5: a FIFO at the ledger path is never opened ----------------------------------------


def _submit_with_deadline(plugin: Plugin):
    box: dict[str, object] = {}
    thread = threading.Thread(
        target=lambda: box.update(res=plugin.submit(submit_case("c01_plain"))), daemon=True
    )
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the plugin blocked on the FIFO"
    return box["res"]


@pytest.mark.parametrize("with_posix", [True, False])
def test_a_fifo_at_the_ledger_path_is_not_opened(runtime, tmp_path, with_posix):
    fifo = tmp_path / "ledger.db"
    os.mkfifo(fifo)
    p = Plugin(runtime, fifo, preload_posix_stat=with_posix)
    res = _submit_with_deadline(p)
    assert res.rc == 0  # fail-open, with the reason logged
    assert "is not a regular file" in res.log_text("error")


def test_a_fifo_at_the_wal_path_is_not_opened(runtime, db_path):
    wal = db_path.with_name(db_path.name + "-wal")
    if wal.exists():
        wal.unlink()
    os.mkfifo(wal)
    p = Plugin(runtime, db_path, preload_posix_stat=True)
    res = _submit_with_deadline(p)
    assert "-wal is not a regular file" in res.log_text("error")


def test_a_node_gpus_setting_lua_cannot_count_is_not_taken(plugin, db_path):
    # written behind slurm-quota's back (the CLI refuses it): the plugin ignores it rather
    # than reading it as a GPU type
    set_setting(db_path, "node_gpus", "gpu:1e5")
    res = plugin.submit(submit_case("c06_exclusive"))
    assert res.rc == 0
    assert prealloc(db_path, res.uuid)[3] == 0  # GPU minutes
