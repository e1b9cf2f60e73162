"""Read models: the /stats payload, the terminal tables and the Prometheus text."""

from __future__ import annotations

import json
import re
import time

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from slurm_quota import db, metrics, stats, tables
from slurm_quota.errors import InvalidInput
from tests.web.readside import (
    ACCOUNTS_OF,
    EXPECTED_ACCOUNTS,
    EXPECTED_USERS,
    SEED_ACCOUNT_KEYS,
    SEED_USER_KEYS,
    numbers,
    seed_ledger,
)

ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture
def seeded(db_path):
    seed_ledger(db_path)
    conn = db.connect(db_path, readonly=True)
    yield conn
    conn.close()


# --- payload ---------------------------------------------------------------------------


def test_payload_rows_start_with_the_seed_keys_in_order(seeded):
    payload = stats.stats_payload(seeded)
    assert list(payload) == ["users", "accounts"]
    for row in payload["users"]:
        assert list(row)[: len(SEED_USER_KEYS)] == SEED_USER_KEYS
    for row in payload["accounts"]:
        assert list(row)[: len(SEED_ACCOUNT_KEYS)] == SEED_ACCOUNT_KEYS


def test_all_users_and_accounts_ordered_by_name_with_prealloc_times_array_size(seeded):
    payload = stats.stats_payload(seeded, all_=True)
    assert [r["username"] for r in payload["users"]] == ["alice", "bob", "carol", "dave"]
    assert [r["account"] for r in payload["accounts"]] == ["bio", "hpc", "phys"]
    assert {r["username"]: numbers(r) for r in payload["users"]} == EXPECTED_USERS
    assert {r["account"]: numbers(r) for r in payload["accounts"]} == EXPECTED_ACCOUNTS


def test_last_updated_is_the_stored_value(seeded):
    payload = stats.stats_payload(seeded, username="bob")
    assert payload["users"][0]["last_updated"] == "2024-05-02 11:00:00"


@pytest.mark.parametrize("user", sorted(ACCOUNTS_OF))
def test_username_selects_the_user_and_accounts_with_jobs_or_charges(seeded, user):
    payload = stats.stats_payload(seeded, username=user)
    assert [numbers(r) for r in payload["users"]] == [EXPECTED_USERS[user]]
    assert [r["account"] for r in payload["accounts"]] == ACCOUNTS_OF[user]
    for row in payload["accounts"]:
        assert numbers(row) == EXPECTED_ACCOUNTS[row["account"]]


def test_account_selects_that_account_only_and_no_users(seeded):
    payload = stats.stats_payload(seeded, account="hpc")
    assert payload["users"] == []
    assert [(r["account"], numbers(r)) for r in payload["accounts"]] == [
        ("hpc", EXPECTED_ACCOUNTS["hpc"])
    ]


def test_unknown_user_and_account_give_empty_lists(seeded):
    assert stats.stats_payload(seeded, username="zed") == {"users": [], "accounts": []}
    assert stats.stats_payload(seeded, account="zed") == {"users": [], "accounts": []}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"username": "alice", "account": "hpc"},
        {"username": "alice", "all_": True},
        {"account": "hpc", "all_": True},
        {"username": " "},
        {"account": ""},
    ],
)
def test_contradictory_or_empty_selectors_are_refused(seeded, kwargs):
    with pytest.raises(InvalidInput):
        stats.stats_payload(seeded, **kwargs)


def test_extra_keys_give_available_minutes_and_percent_null_when_unlimited(seeded):
    rows = {r["username"]: r for r in stats.stats_payload(seeded)["users"]}
    alice, bob, dave = rows["alice"], rows["bob"], rows["dave"]
    assert alice["available_cpu_minutes"] == 5000 - 1200 - 250
    assert alice["available_gpu_minutes"] == 100 - 30 - 20
    assert alice["usage_cpu_percent"] == 29.0
    assert alice["usage_gpu_percent"] == 50.0
    assert bob["available_gpu_minutes"] is None
    assert bob["usage_gpu_percent"] is None
    assert dave["available_cpu_minutes"] == 0
    assert dave["usage_cpu_percent"] == 100.0  # a zero quota is full


def test_validate_payload_rejects_a_row_missing_a_seed_key(seeded):
    payload = stats.stats_payload(seeded)
    assert stats.validate_payload(payload) is payload
    del payload["accounts"][0]["job_count"]
    with pytest.raises(ValueError, match="job_count"):
        stats.validate_payload(payload)
    with pytest.raises(ValueError):
        stats.validate_payload({"users": "x", "accounts": []})
    with pytest.raises(ValueError):
        stats.validate_payload([1, 2])


# --- terminal tables -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("consumed", "prealloc", "quota", "cells", "percent"),
    [
        (0, 0, 100, 0, "  0.0%"),
        (20, 30, 100, 10, " 50.0%"),
        (1, 1, 40, 1, "  5.0%"),  # 0.05 × 20 = 1 cell
        (100, 0, 100, 20, "100.0%"),
        (200, 50, 100, 20, "250.0%"),  # over quota: full bar, true percentage
        (0, 0, 0, 20, "100.0%"),  # zero quota = full
    ],
)
def test_usage_bar_cells_and_percentage(consumed, prealloc, quota, cells, percent):
    bar = tables.usage_bar(consumed, prealloc, quota, color=False)
    assert bar == "█" * cells + "░" * (20 - cells) + " " + percent


def test_usage_bar_of_an_unlimited_quota_is_a_dash():
    assert tables.usage_bar(500, 10, -1, color=True) == "-"


@pytest.mark.parametrize(
    ("used", "colour"),
    [
        (0, "\x1b[32m"),
        (800, "\x1b[32m"),  # exactly 80 %: still green
        (801, "\x1b[38;5;208m"),  # above 80 %: orange
        (950, "\x1b[38;5;208m"),  # exactly 95 %: still orange
        (951, "\x1b[31m"),  # above 95 %: red
        (1500, "\x1b[31m"),
    ],
)
def test_usage_bar_colour_thresholds(used, colour):
    bar = tables.usage_bar(used, 0, 1000, color=True)
    assert bar.startswith(colour)
    assert bar.endswith("\x1b[0m")


def test_color_wanted_honours_no_color_and_the_terminal(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert tables.color_wanted("auto", isatty=True) is True
    assert tables.color_wanted("auto", isatty=False) is False
    monkeypatch.setenv("NO_COLOR", "1")
    assert tables.color_wanted("auto", isatty=True) is False
    assert tables.color_wanted("always", isatty=False) is True
    monkeypatch.setenv("NO_COLOR", "")  # empty = unset (no-color.org)
    assert tables.color_wanted("auto", isatty=True) is True
    assert tables.color_wanted("never", isatty=True) is False


def _table_lines(text: str, title: str) -> list[str]:
    block = next(b for b in text.split("\n\n") if f"\n{title} " in b)
    return block.splitlines()


def test_tables_show_values_prealloc_jobs_infinity_and_groups(seeded):
    text = tables.render_tables(stats.stats_payload(seeded), color=False)
    users = _table_lines(text, "USER")
    assert "CPU (minutes)" in users[0] and "GPU (minutes)" in users[0]
    assert users[1].split() == [
        "USER", "│", "CONSUMED", "PREALLOC(JOBS)", "QUOTA", "STATUS", "│",
        "CONSUMED", "PREALLOC(JOBS)", "QUOTA", "STATUS", "│", "LAST", "UPDATED",
    ]
    alice = next(line for line in users if line.startswith("alice "))
    cells = alice.split()
    assert cells[:4] == ["alice", "│", "1200", "250(3)"]
    assert cells[4] == "5000"
    assert cells[6] == "29.0%"
    bob = next(line for line in users if line.startswith("bob "))
    assert bob.split()[2:4] == ["9000", "307(2)"]
    assert bob.split()[8:12] == ["0", "0(2)", "∞", "-"]
    accounts = _table_lines(text, "ACCOUNT")
    assert [line.split()[0] for line in accounts[3:]] == ["bio", "hpc", "phys"]
    assert "\x1b[" not in text


def test_tables_align_columns_even_with_colour_codes(seeded):
    text = tables.render_tables(stats.stats_payload(seeded), color=True)
    assert "\x1b[31m" in text and "\x1b[32m" in text and "\x1b[38;5;208m" in text
    for title in ("USER", "ACCOUNT"):
        lines = [ANSI.sub("", line) for line in _table_lines(text, title)]
        bars = {tuple(i for i, ch in enumerate(line) if ch in "│┼") for line in lines}
        assert len(bars) == 1, f"separators move between lines of {title}: {bars}"


def test_hours_divide_displayed_values_by_60_with_two_decimals(seeded):
    payload = stats.stats_payload(seeded, username="alice")
    text = tables.render_tables(payload, hours=True, color=False)
    alice = next(line for line in text.splitlines() if line.startswith("alice "))
    assert alice.split()[2:5] == ["20.00", "4.17(3)", "83.33"]
    assert "CPU (hours)" in text
    assert payload["users"][0]["total_consumed_cpu_minutes"] == 1200  # data unchanged


def test_last_updated_is_shown_in_local_time(seeded, monkeypatch):
    monkeypatch.setenv("TZ", "XXX-02")  # POSIX TZ: two hours east of UTC, no tzdata needed
    time.tzset()
    try:
        text = tables.render_tables(stats.stats_payload(seeded, username="bob"), color=False)
    finally:
        monkeypatch.undo()
        time.tzset()
    bob = next(line for line in text.splitlines() if line.startswith("bob "))
    assert bob.endswith("2024-05-02 13:00:00")


def test_empty_answers_say_what_was_not_found():
    empty = {"users": [], "accounts": []}
    assert tables.render_tables(empty, selector=("user", "zed")) == "No data found for user: zed\n"
    assert (
        tables.render_tables(empty, selector=("account", "x1")) == "No data found for account: x1\n"
    )
    assert tables.render_tables(empty) == "No data found.\n"


def test_user_without_row_but_with_accounts_reports_user_and_shows_accounts(seeded):
    payload = stats.stats_payload(seeded, username="alice")
    payload["users"] = []
    text = tables.render_tables(payload, color=False, selector=("user", "alice"))
    assert text.startswith("No data found for user: alice\n")
    assert "\nACCOUNT " in text


# --- metrics ---------------------------------------------------------------------------

SAMPLE = re.compile(r'^([a-z_]+)(\{(?:[a-z_]+="(?:[^"\\]|\\.)*",?)*\})? (\S+)$')


def _samples(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, f"not a valid sample line: {line!r}"
        out[(m.group(1) + (m.group(2) or ""))] = m.group(3)
    return out


def test_metrics_have_help_and_type_before_samples_of_each_family(seeded, db_path):
    text = metrics.metrics_text(seeded, db_path=db_path)
    assert text.endswith("\n")
    seen_help, seen_type = set(), set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            seen_help.add(line.split()[2])
        elif line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            assert kind in ("gauge", "counter")
            assert name in seen_help
            seen_type.add(name)
        else:
            name = re.split(r"[{ ]", line, maxsplit=1)[0]
            assert name in seen_type, f"sample before its TYPE line: {line}"
    assert len(seen_help) == len(seen_type)


def test_metrics_values_from_the_seeded_ledger(seeded, db_path):
    s = _samples(metrics.metrics_text(seeded, db_path=db_path))
    assert s['slurm_quota_user_consumed_minutes{username="alice",resource="cpu"}'] == "1200"
    assert s['slurm_quota_user_preallocated_minutes{username="alice",resource="cpu"}'] == "250"
    assert s['slurm_quota_user_preallocated_minutes{username="bob",resource="cpu"}'] == "307"
    assert s['slurm_quota_user_quota_minutes{username="bob",resource="gpu"}'] == "+Inf"
    assert s['slurm_quota_user_open_jobs{username="alice"}'] == "3"
    assert s['slurm_quota_account_preallocated_minutes{account="hpc",resource="gpu"}'] == "20"
    assert s['slurm_quota_account_open_jobs{account="hpc"}'] == "4"
    assert s["slurm_quota_charges_total"] == "1"
    assert s['slurm_quota_charged_minutes_total{resource="cpu"}'] == "1"
    assert s['slurm_quota_ledger_rows{table="jobs_preallocations"}'] == "4"
    assert s['slurm_quota_ledger_rows{table="users"}'] == "4"
    assert int(s['slurm_quota_ledger_file_bytes{file="db"}']) == db_path.stat().st_size
    assert s["slurm_quota_schema_version"] == str(db.latest_version())


def test_metrics_escape_label_values(db_path):
    conn = db.connect(db_path)
    conn.execute(
        "INSERT INTO users (username, total_consumed_cpu_minutes) VALUES (?, 5)",
        ('we"ird\\name\nx',),
    )
    text = metrics.metrics_text(conn)
    conn.close()
    assert (
        'slurm_quota_user_consumed_minutes{username="we\\"ird\\\\name\\nx",resource="cpu"} 5'
        in text.splitlines()
    )
    _samples(text)  # every line still parses


# --- the whole-ledger JSON without dicts -------------------------------------------------

_minutes = st.one_of(
    st.integers(min_value=0, max_value=10**12),
    st.floats(min_value=0, max_value=1e9, allow_nan=False),  # seed ledgers hold REAL minutes
)
_quota = st.one_of(st.just(-1), st.just(0), st.integers(min_value=1, max_value=10**12))
_usage_row = st.tuples(
    st.text(min_size=1, max_size=12),  # quotes, backslashes, control and non-ASCII characters
    _minutes, _minutes, _quota, _minutes, _minutes, _quota,
    st.one_of(st.none(), st.text(max_size=20)),
    st.integers(min_value=0, max_value=10**6),
)


@settings(max_examples=300, deadline=None)
@given(name_key=st.sampled_from(["username", "account"]), rows=st.lists(_usage_row, max_size=8))
# 23/160 is 14.37 % as (used / quota) * 100 rounds it, 14.38 % as used * 100 / quota would.
@example(name_key="username", rows=[("u", 23, 0, 160, 49, 0, 160, None, 1)])
def test_rows_json_is_byte_for_byte_what_json_dumps_writes_for_the_payload_rows(name_key, rows):
    expected = json.dumps(
        [stats.payload_row(name_key, r) for r in rows], separators=(",", ":"), ensure_ascii=False
    )
    assert stats.rows_json(name_key, rows) == expected


def test_whole_stats_json_is_the_payload_as_json(seeded):
    expected = json.dumps(stats.stats_payload(seeded), separators=(",", ":"), ensure_ascii=False)
    assert stats.whole_stats_json(seeded) == (expected + "\n").encode()
    assert json.loads(stats.whole_stats_json(seeded))["users"][0]["username"] == "alice"
