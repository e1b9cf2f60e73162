"""Admin commands through the real CLI entry point: outputs, DB rows, journal rows, refusals."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest

from slurm_quota import db
from tests.unit.cli_helpers import (
    journal,
    owner_row,
    remove_dir,
    run_as_nobody,
    run_cli,
    shared_dir,
    snapshot,
)


@pytest.fixture(autouse=True)
def _no_sudo(monkeypatch):
    """The actor is `root` unless a test sets SUDO_USER itself."""
    monkeypatch.delenv("SUDO_USER", raising=False)


# ---------------------------------------------------------------------------------------
# user-quota, user-gpu-quota, account-quota, account-gpu-quota
# ---------------------------------------------------------------------------------------


def test_user_quota_creates_the_row_with_the_default_gpu_quota(db_path, capsys):
    result = run_cli(capsys, db_path, "user-quota", "alice", "50000")

    assert result.code == 0, result.err
    assert result.out == (
        "User alice created: CPU quota 50000 minutes; GPU quota ∞ (unlimited) "
        "(default for new users).\n"
    )
    assert owner_row(db_path, "user", "alice") == ("alice", 0, 50000, 0, -1)
    rows = journal(db_path)
    assert [(r["actor"], r["action"], r["target_kind"], r["target"]) for r in rows] == [
        ("root", "create", "user", "alice"),
        ("root", "set-quota", "user", "alice"),
    ]
    assert (rows[0]["field"], rows[0]["old_value"], rows[0]["new_value"]) == (
        "quota_gpu_minutes",
        None,
        "-1",
    )
    assert (rows[1]["field"], rows[1]["old_value"], rows[1]["new_value"]) == (
        "quota_cpu_minutes",
        None,
        "50000",
    )
    assert rows[1]["reason"] is None
    assert rows[1]["at"]  # CURRENT_TIMESTAMP filled


def test_user_quota_changes_an_existing_row_and_keeps_its_gpu_quota(db_path, capsys):
    assert run_cli(capsys, db_path, "user-gpu-quota", "alice", "300").code == 0
    assert run_cli(capsys, db_path, "set-default-quotas", "--user-gpu", "999").code == 0

    result = run_cli(capsys, db_path, "user-quota", "alice", "1000", "--reason", "grant 42")

    assert result.code == 0, result.err
    assert result.out == "User alice: CPU quota ∞ (unlimited) -> 1000 minutes.\n"
    assert owner_row(db_path, "user", "alice") == ("alice", 0, 1000, 0, 300)
    last = journal(db_path)[-1]
    assert (last["action"], last["field"], last["old_value"], last["new_value"]) == (
        "set-quota",
        "quota_cpu_minutes",
        "-1",
        "1000",
    )
    assert last["reason"] == "grant 42"


def test_user_quota_minus_one_means_unlimited(db_path, capsys):
    assert run_cli(capsys, db_path, "user-quota", "bob", "10").code == 0

    result = run_cli(capsys, db_path, "user-quota", "bob", "-1")

    assert result.code == 0, result.err
    assert result.out == "User bob: CPU quota 10 minutes -> ∞ (unlimited).\n"
    assert owner_row(db_path, "user", "bob") == ("bob", 0, -1, 0, -1)


def test_setting_the_same_quota_again_is_reported_unchanged_and_journaled(db_path, capsys):
    assert run_cli(capsys, db_path, "user-quota", "bob", "10").code == 0
    result = run_cli(capsys, db_path, "user-quota", "bob", "10")
    assert result.out == "User bob: CPU quota unchanged at 10 minutes.\n"
    assert [r["action"] for r in journal(db_path)] == ["create", "set-quota", "set-quota"]


def test_new_rows_get_the_configured_defaults_of_their_kind(db_path, capsys):
    assert (
        run_cli(
            capsys,
            db_path,
            "set-default-quotas",
            "--user-cpu",
            "11",
            "--user-gpu",
            "22",
            "--account-cpu",
            "33",
            "--account-gpu",
            "44",
        ).code
        == 0
    )
    assert run_cli(capsys, db_path, "user-quota", "u1", "5").code == 0
    assert run_cli(capsys, db_path, "user-gpu-quota", "u2", "6").code == 0
    assert run_cli(capsys, db_path, "account-quota", "a1", "7").code == 0
    result = run_cli(capsys, db_path, "account-gpu-quota", "a2", "8")

    assert result.out == (
        "Account a2 created: GPU quota 8 minutes; CPU quota 33 minutes "
        "(default for new accounts).\n"
    )
    assert owner_row(db_path, "user", "u1") == ("u1", 0, 5, 0, 22)
    assert owner_row(db_path, "user", "u2") == ("u2", 0, 11, 0, 6)
    assert owner_row(db_path, "account", "a1") == ("a1", 0, 7, 0, 44)
    assert owner_row(db_path, "account", "a2") == ("a2", 0, 33, 0, 8)


def test_account_gpu_quota_changes_only_the_gpu_quota(db_path, capsys):
    assert run_cli(capsys, db_path, "account-quota", "projx", "200000").code == 0

    result = run_cli(capsys, db_path, "account-gpu-quota", "projx", "50000", "--reason", "q3")

    assert result.code == 0, result.err
    assert result.out == "Account projx: GPU quota ∞ (unlimited) -> 50000 minutes.\n"
    assert owner_row(db_path, "account", "projx") == ("projx", 0, 200000, 0, 50000)
    last = journal(db_path)[-1]
    assert (last["target_kind"], last["target"], last["field"], last["reason"]) == (
        "account",
        "projx",
        "quota_gpu_minutes",
        "q3",
    )


def test_sudo_user_is_recorded_in_the_actor(db_path, capsys, monkeypatch):
    monkeypatch.setenv("SUDO_USER", "alice")
    assert run_cli(capsys, db_path, "user-quota", "zed", "1").code == 0
    assert {r["actor"] for r in journal(db_path)} == {"root (sudo alice)"}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc", "is not a whole number of minutes"),
        ("-2", "Quota -2 is below -1"),
        ("1e9999", "is not a whole number of minutes"),
        ("1.5", "is not a whole number of minutes"),
        ("", "is not a whole number of minutes"),
        ("99999999999999999999", "is larger than the maximum"),
        ("NaN", "is not a whole number of minutes"),
    ],
)
@pytest.mark.parametrize(
    "command", ["user-quota", "user-gpu-quota", "account-quota", "account-gpu-quota"]
)
def test_quota_commands_refuse_bad_numbers(db_path, capsys, command, value, message):
    before = snapshot(db_path)

    result = run_cli(capsys, db_path, command, "alice", value)

    assert result.code == 2
    assert message in result.err
    assert result.err.startswith("slurm-quota: error: ")
    assert snapshot(db_path) == before


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "name is empty"),
        ("al ice", "contains whitespace"),
        ("al\tice", "contains a control character"),
        ("bob\n", "contains a control character"),
        ("a\x1b[31m", "contains a control character"),
        ("x" * 129, "is longer than 128 characters"),
        ("-alice", "is not valid"),
        ("al,ice", "is not valid"),
        ("al/ice", "is not valid"),
        ("al'ice", "is not valid"),
    ],
)
@pytest.mark.parametrize("command", ["user-quota", "account-gpu-quota"])
def test_quota_commands_refuse_bad_names(db_path, capsys, command, name, message):
    before = snapshot(db_path)

    result = run_cli(capsys, db_path, command, name, "10")

    assert result.code == 2, result
    assert message in result.err
    assert snapshot(db_path) == before


def test_names_are_kept_exactly_case_and_domain_included(db_path, capsys):
    for name in ("alice", "Alice", "alice@example.org", "host01$", "x" * 128):
        assert run_cli(capsys, db_path, "user-quota", name, "10").code == 0, name
    conn = sqlite3.connect(str(db_path))
    names = sorted(r[0] for r in conn.execute("SELECT username FROM users"))
    conn.close()
    assert names == sorted(["alice", "Alice", "alice@example.org", "host01$", "x" * 128])


def test_quota_command_with_a_bad_reason_changes_nothing(db_path, capsys):
    before = snapshot(db_path)
    result = run_cli(capsys, db_path, "user-quota", "alice", "5", "--reason", "two\nlines")
    assert result.code == 2
    assert "--reason contains a control character" in result.err
    assert snapshot(db_path) == before


# ---------------------------------------------------------------------------------------
# adjust
# ---------------------------------------------------------------------------------------


@pytest.fixture
def alice(db_path, capsys):
    """alice and projx exist (quotas 1000), nothing consumed."""
    assert run_cli(capsys, db_path, "user-quota", "alice", "1000").code == 0
    assert run_cli(capsys, db_path, "account-quota", "projx", "1000").code == 0
    return db_path


@pytest.mark.parametrize(
    ("args", "expected_row", "line"),
    [
        (
            ["--user", "alice", "--cpu", "--minutes=+30"],
            ("alice", 30, 1000, 0, -1),
            "User alice: consumed CPU minutes 0 -> 30 (+30).\n",
        ),
        (
            ["--user", "alice", "--gpu", "--minutes", "+7"],
            ("alice", 0, 1000, 7, -1),
            "User alice: consumed GPU minutes 0 -> 7 (+7).\n",
        ),
        (
            ["--user", "alice", "--cpu", "--hours=+2"],
            ("alice", 120, 1000, 0, -1),
            "User alice: consumed CPU minutes 0 -> 120 (+120).\n",
        ),
        (
            ["--user", "alice", "--gpu", "--hours=+1.5"],
            ("alice", 0, 1000, 90, -1),
            "User alice: consumed GPU minutes 0 -> 90 (+90).\n",
        ),
    ],
)
def test_adjust_adds_signed_minutes(alice, capsys, args, expected_row, line):
    result = run_cli(capsys, alice, "adjust", *args)

    assert result.code == 0, result.err
    assert result.out == line
    assert result.err == ""
    assert owner_row(alice, "user", "alice") == expected_row
    last = journal(alice)[-1]
    assert last["action"] == "adjust"
    assert last["old_value"] == "0"
    assert last["new_value"] == str(max(expected_row[1], expected_row[3]))


def test_adjust_subtracts_and_journals_old_and_new(alice, capsys):
    assert run_cli(capsys, alice, "adjust", "--account", "projx", "--cpu", "--hours=+3").code == 0

    result = run_cli(
        capsys, alice, "adjust", "--account", "projx", "--cpu", "--minutes=-30", "--reason", "r"
    )

    assert result.out == "Account projx: consumed CPU minutes 180 -> 150 (-30).\n"
    assert owner_row(alice, "account", "projx") == ("projx", 150, 1000, 0, -1)
    last = journal(alice)[-1]
    assert (last["target_kind"], last["target"], last["field"]) == (
        "account",
        "projx",
        "total_consumed_cpu_minutes",
    )
    assert (last["old_value"], last["new_value"], last["reason"]) == ("180", "150", "r")


def test_adjust_clamps_at_zero_and_says_so(alice, capsys):
    assert run_cli(capsys, alice, "adjust", "--user", "alice", "--gpu", "--minutes=+40").code == 0

    result = run_cli(capsys, alice, "adjust", "--user", "alice", "--gpu", "--hours=-1")

    assert result.code == 0
    assert result.out == "User alice: consumed GPU minutes 40 -> 0 (-60, clamped at 0).\n"
    assert "clamped at 0 (applied -40)" in result.err
    assert "to -20" in result.err
    assert owner_row(alice, "user", "alice") == ("alice", 0, 1000, 0, -1)
    last = journal(alice)[-1]
    assert (last["old_value"], last["new_value"]) == ("40", "0")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--user", "alice", "--cpu", "--minutes=30"], "must be an explicitly signed"),
        (["--user", "alice", "--cpu", "--minutes", "abc"], "must be an explicitly signed"),
        (["--user", "alice", "--cpu", "--minutes=+1.5"], "must be an explicitly signed"),
        (["--user", "alice", "--cpu", "--minutes=+1e9999"], "must be an explicitly signed"),
        (["--user", "alice", "--cpu", "--hours=2"], "must be an explicitly signed"),
        (["--user", "alice", "--cpu", "--hours=+0.001"], "not a whole number of minutes"),
        (["--user", "alice", "--cpu", "--minutes=+99999999999999"], "exceeds the maximum"),
        (["--user", "alice", "--account", "projx", "--cpu", "--minutes=+1"], "exactly one of"),
        (["--cpu", "--minutes=+1"], "exactly one of --user or --account"),
        (["--user", "alice", "--minutes=+1"], "exactly one of --cpu or --gpu"),
        (["--user", "alice", "--cpu", "--gpu", "--minutes=+1"], "exactly one of --cpu or --gpu"),
        (["--user", "alice", "--cpu"], "exactly one of --minutes or --hours"),
        (
            ["--user", "alice", "--cpu", "--minutes=+1", "--hours=+1"],
            "exactly one of --minutes or --hours",
        ),
        (["--user", "al ice", "--cpu", "--minutes=+1"], "contains whitespace"),
    ],
)
def test_adjust_refuses_bad_usage(alice, capsys, args, message):
    before = snapshot(alice)

    result = run_cli(capsys, alice, "adjust", *args)

    assert result.code == 2, result
    assert message in result.err
    assert snapshot(alice) == before


def test_adjust_of_an_unknown_user_is_not_found_and_creates_nothing(alice, capsys):
    before = snapshot(alice)

    result = run_cli(capsys, alice, "adjust", "--user", "mallory", "--cpu", "--minutes=+5")

    assert result.code == 1
    assert "User mallory is not in the ledger; nothing was adjusted" in result.err
    assert snapshot(alice) == before
    assert owner_row(alice, "user", "mallory") is None


# ---------------------------------------------------------------------------------------
# default-quotas, set-default-quotas
# ---------------------------------------------------------------------------------------


def test_default_quotas_show_infinity_when_unset(db_path, capsys):
    result = run_cli(capsys, db_path, "default-quotas")

    assert result.code == 0
    lines = result.out.splitlines()
    assert lines[0].split() == ["SETTING", "MINUTES"]
    assert [ln.split() for ln in lines[2:]] == [
        ["default_user_quota_cpu_minutes", "∞"],
        ["default_user_quota_gpu_minutes", "∞"],
        ["default_account_quota_cpu_minutes", "∞"],
        ["default_account_quota_gpu_minutes", "∞"],
    ]


def test_set_default_quotas_then_show_them_as_table_and_json(db_path, capsys):
    result = run_cli(
        capsys,
        db_path,
        "set-default-quotas",
        "--user-cpu",
        "50000",
        "--account-gpu",
        "-1",
        "--reason",
        "policy 2025",
    )
    assert result.code == 0, result.err
    assert result.out == (
        "default_user_quota_cpu_minutes: ∞ -> 50000\n"
        "default_account_quota_gpu_minutes: ∞ -> ∞\n"
        "Applies to users/accounts created from now on; existing rows are unchanged.\n"
    )

    table = run_cli(capsys, db_path, "default-quotas").out.splitlines()
    assert table[2].split() == ["default_user_quota_cpu_minutes", "50000"]
    data = json.loads(run_cli(capsys, db_path, "default-quotas", "--json").out)
    assert data == {
        "default_user_quota_cpu_minutes": 50000,
        "default_user_quota_gpu_minutes": -1,
        "default_account_quota_cpu_minutes": -1,
        "default_account_quota_gpu_minutes": -1,
    }
    rows = journal(db_path)
    got = [(r["action"], r["target"], r["old_value"], r["new_value"], r["reason"]) for r in rows]
    assert got == [
        ("set-default-quota", "default_user_quota_cpu_minutes", "-1", "50000", "policy 2025"),
        ("set-default-quota", "default_account_quota_gpu_minutes", "-1", "-1", "policy 2025"),
    ]
    conn = sqlite3.connect(str(db_path))
    assert dict(conn.execute("SELECT key, value FROM settings").fetchall()) == {
        "default_user_quota_cpu_minutes": "50000",
        "default_account_quota_gpu_minutes": "-1",
    }
    conn.close()


def test_set_default_quotas_does_not_touch_existing_rows(db_path, capsys):
    assert run_cli(capsys, db_path, "user-quota", "alice", "10").code == 0
    assert run_cli(capsys, db_path, "set-default-quotas", "--user-gpu", "77").code == 0
    assert owner_row(db_path, "user", "alice") == ("alice", 0, 10, 0, -1)


def test_set_default_quotas_needs_at_least_one_value(db_path, capsys):
    before = snapshot(db_path)
    result = run_cli(capsys, db_path, "set-default-quotas")
    assert result.code == 2
    assert "Give at least one of --user-cpu, --user-gpu, --account-cpu, --account-gpu" in (
        result.err
    )
    assert snapshot(db_path) == before


@pytest.mark.parametrize("value", ["abc", "-2", "1e9999", "2.5"])
def test_set_default_quotas_refuses_bad_numbers_and_changes_nothing(db_path, capsys, value):
    before = snapshot(db_path)
    result = run_cli(
        capsys, db_path, "set-default-quotas", "--user-cpu", "10", "--account-cpu", value
    )
    assert result.code == 2
    assert "slurm-quota: error: Quota" in result.err
    assert snapshot(db_path) == before


def test_a_corrupt_default_setting_is_reported_not_used(db_path, capsys):
    conn = sqlite3.connect(str(db_path))
    conn.execute("INSERT INTO settings VALUES ('default_user_quota_gpu_minutes', 'lots')")
    conn.commit()
    conn.close()
    before = snapshot(db_path)

    result = run_cli(capsys, db_path, "user-quota", "alice", "10")

    assert result.code == 1
    assert "default_user_quota_gpu_minutes holds 'lots'" in result.err
    assert snapshot(db_path) == before


# ---------------------------------------------------------------------------------------
# gpu-factors, set-gpu-factor
# ---------------------------------------------------------------------------------------


def test_gpu_factors_without_rows_show_the_built_in_default(db_path, capsys):
    result = run_cli(capsys, db_path, "gpu-factors")
    assert result.code == 0
    assert result.out.splitlines()[2].split() == ["default", "1.0", "(built-in,", "not", "set)"]
    assert json.loads(run_cli(capsys, db_path, "gpu-factors", "--json").out) == [
        {"gpu_type": "default", "factor": 1.0, "configured": False}
    ]


def test_set_gpu_factor_and_list_default_first_then_sorted(db_path, capsys):
    for gpu_type, factor in [("h100", "0.5"), ("a100", "1.25"), ("default", "2"), ("L40S", "0")]:
        result = run_cli(capsys, db_path, "set-gpu-factor", gpu_type, factor)
        assert result.code == 0, result.err
    result = run_cli(capsys, db_path, "set-gpu-factor", "h100", "0.75", "--reason", "new price")
    assert result.out == "GPU factor of h100: 0.5 -> 0.75.\n"

    table = run_cli(capsys, db_path, "gpu-factors").out.splitlines()
    assert table[0].split() == ["GPU", "TYPE", "FACTOR"]
    assert [ln.split() for ln in table[2:]] == [
        ["default", "2.0"],
        ["L40S", "0.0"],
        ["a100", "1.25"],
        ["h100", "0.75"],
    ]
    data = json.loads(run_cli(capsys, db_path, "gpu-factors", "--json").out)
    assert data == [
        {"gpu_type": "default", "factor": 2.0, "configured": True},
        {"gpu_type": "L40S", "factor": 0.0, "configured": True},
        {"gpu_type": "a100", "factor": 1.25, "configured": True},
        {"gpu_type": "h100", "factor": 0.75, "configured": True},
    ]
    rows = journal(db_path)
    assert [(r["target"], r["old_value"], r["new_value"]) for r in rows] == [
        ("h100", None, "0.5"),
        ("a100", None, "1.25"),
        ("default", None, "2.0"),
        ("L40S", None, "0.0"),
        ("h100", "0.5", "0.75"),
    ]
    assert rows[-1]["reason"] == "new price"
    assert {r["target_kind"] for r in rows} == {"gpu_factor"}


def test_first_gpu_factor_of_a_type_says_not_set_before(db_path, capsys):
    result = run_cli(capsys, db_path, "set-gpu-factor", "h200", "0.8")
    assert result.out == "GPU factor of h200: not set -> 0.8.\n"


@pytest.mark.parametrize(
    ("factor", "message"),
    [
        ("NaN", "is not finite"),
        ("nan", "is not finite"),
        ("inf", "is not finite"),
        ("-inf", "is not finite"),
        ("1e9999", "is not finite"),
        ("-1", "is negative"),
        ("abc", "is not a number"),
        ("", "is not a number"),
        ("1e7", "implausibly large"),
    ],
)
def test_set_gpu_factor_refuses_bad_factors(db_path, capsys, factor, message):
    before = snapshot(db_path)
    result = run_cli(capsys, db_path, "set-gpu-factor", "h100", factor)
    assert result.code == 2, result
    assert message in result.err
    assert snapshot(db_path) == before


@pytest.mark.parametrize("gpu_type", ["", "h 100", "a/b", "x" * 65, "h100\n", "tesla:v100"])
def test_set_gpu_factor_refuses_bad_types(db_path, capsys, gpu_type):
    before = snapshot(db_path)
    result = run_cli(capsys, db_path, "set-gpu-factor", gpu_type, "1")
    assert result.code == 2
    assert "GPU type" in result.err
    assert snapshot(db_path) == before


# ---------------------------------------------------------------------------------------
# Root only: really non-root processes (setpriv), the DB untouched
# ---------------------------------------------------------------------------------------

ADMIN_COMMANDS = [
    ["user-quota", "alice", "5"],
    ["user-gpu-quota", "alice", "5"],
    ["account-quota", "projx", "5"],
    ["account-gpu-quota", "projx", "5"],
    ["adjust", "--user", "alice", "--cpu", "--minutes=+5"],
    ["set-default-quotas", "--user-cpu", "5"],
    ["set-gpu-factor", "h100", "0.5"],
]


@pytest.fixture
def world_writable_db(capsys):
    """A migrated ledger that uid 65534 could write (0666 in a 0777 dir): only our root
    check can stop it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to uid 65534")
    folder = shared_dir()
    path = folder / "ledger.db"
    db.migrate(path)
    assert run_cli(capsys, path, "user-quota", "alice", "100").code == 0
    assert run_cli(capsys, path, "account-quota", "projx", "100").code == 0
    os.chmod(path, 0o666)
    yield path
    remove_dir(folder)


def _file_bytes(path) -> dict[str, bytes | None]:
    out = {}
    for suffix in ("", "-wal", "-shm"):
        p = f"{path}{suffix}"
        out[suffix] = open(p, "rb").read() if os.path.exists(p) else None
    return out


def test_migrate_refuses_a_non_root_real_uid(world_writable_db):
    before_bytes = _file_bytes(world_writable_db)
    proc = run_as_nobody(world_writable_db, "migrate")
    assert proc.returncode == 1, proc
    assert "`slurm-quota migrate` changes the ledger and is restricted to root" in proc.stderr
    assert "(you are uid 65534); nothing was changed." in proc.stderr
    assert _file_bytes(world_writable_db) == before_bytes


@pytest.mark.parametrize("args", ADMIN_COMMANDS, ids=lambda a: a[0])
def test_admin_writes_of_a_non_root_uid_never_open_the_ledger(world_writable_db, args):
    # Not root: the write goes to the service as the user MUNGE vouches for, never to the
    # file, even one this uid could write. Here munged is absent: exit 75, nothing written.
    before_rows = snapshot(world_writable_db)
    before_bytes = _file_bytes(world_writable_db)

    proc = run_as_nobody(
        world_writable_db, *args,
        env_extra={"SLURM_QUOTA_MUNGE_SOCKET": "/nonexistent/munge.socket.2"},
    )

    assert proc.returncode == 75, proc
    assert "slurm-quota: error: Cannot prove who you are to the service: " in proc.stderr
    # libmunge says which socket it could not reach (or that it is not installed at all).
    assert "/nonexistent/munge.socket.2" in proc.stderr or "libmunge is not installed" in (
        proc.stderr)
    assert proc.stdout == ""
    assert _file_bytes(world_writable_db) == before_bytes
    assert snapshot(world_writable_db) == before_rows


def test_non_root_can_read_factors_defaults_and_history(world_writable_db):
    # The same setup lets a non-root process open the file: the refusals above come from
    # the root check, not from file permissions.
    proc = run_as_nobody(world_writable_db, "history", "--user", "alice", "--json")
    assert proc.returncode == 0, proc.stderr
    assert [e["action"] for e in json.loads(proc.stdout)] == ["set-quota", "create"]
    proc = run_as_nobody(world_writable_db, "gpu-factors", "--json")
    assert proc.returncode == 0, proc.stderr
    proc = run_as_nobody(world_writable_db, "default-quotas")
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------
# Start-up cost and help
# ---------------------------------------------------------------------------------------


def test_cli_import_does_not_load_sqlite_or_tabulate():
    code = (
        "import sys, slurm_quota.cli; "
        "print(sorted(m for m in ('sqlite3', 'tabulate', 'requests') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/"
    )
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "command",
    [
        "user-quota",
        "user-gpu-quota",
        "account-quota",
        "account-gpu-quota",
        "adjust",
        "default-quotas",
        "set-default-quotas",
        "gpu-factors",
        "set-gpu-factor",
        "history",
    ],
)
def test_every_admin_command_has_help_with_an_example(db_path, capsys, command):
    result = run_cli(capsys, db_path, command, "--help")
    assert result.code == 0
    assert "Example" in result.out
    assert f"slurm-quota {command}" in result.out
