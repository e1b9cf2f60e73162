"""Issue 19: bad input gets a message and an exit status, never a traceback.

Each test reproduces one case of the adversarial pass; cli.main lets any exception that is
not a SlurmQuotaError or a click error escape, so a traceback fails the test.
"""

from __future__ import annotations

import click
import pytest

from slurm_quota import charge, ledger, numbers, slurm, validate
from slurm_quota.cli import cli
from slurm_quota.errors import InvalidInput
from tests.unit.cli_helpers import run_cli, snapshot


@pytest.mark.parametrize(
    "args",
    [
        ("history", "--job", "²"),
        ("history", "--job", "٣"),
        ("history", "--limit", "٣"),
        ("history", "--limit", "²"),
        ("reconcile", "--dry-run", "--since", "²h"),
        ("reconcile", "--dry-run", "--since", "٣d"),
        ("reconcile", "--dry-run", "--since", "99999999999999d"),
        ("reconcile", "--dry-run", "--since", "9" * 30 + "d"),
        ("reconcile", "--dry-run", "--since", "9" * 5000),
        ("reconcile", "--dry-run", "--since", "２０２４-01-01"),
        ("reconcile", "--dry-run", "--since", "99999999999"),
        ("reconcile", "--dry-run", "--grace", "٣"),
        ("reconcile", "--dry-run", "--grace", "9" * 40),
        ("prune", "--dry-run", "--grace", "9" * 40),
    ],
)
def test_hostile_numbers_are_usage_errors(db_path, capsys, args):
    before = snapshot(db_path)
    result = run_cli(capsys, db_path, *args)
    assert result.code == 2, result
    assert "Traceback" not in result.err
    assert result.err.strip()
    assert snapshot(db_path) == before


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--idle-timeout", "nan"),
        ("--idle-timeout", "inf"),
        ("--idle-timeout", "٣"),
        ("--max-stale", "٣"),
        ("--max-stale", "1_0"),
        ("--port", "٣"),
        ("--threads", "²"),
    ],
)
def test_serve_options_refuse_hostile_numbers(option, value):
    # Converted by the option itself: a value it accepted would start a server.
    param = next(p for p in cli.commands["serve"].params if option in p.opts)
    with pytest.raises(click.BadParameter):
        param.type.convert(value, param, None)


@pytest.mark.parametrize("value", ["gpu:٣", "gpu:h100:٣", "gpu:h100:²", "gpu:１", "gpu:1_0"])
def test_set_setting_refuses_non_ascii_gpu_counts(db_path, capsys, value):
    before = snapshot(db_path)
    result = run_cli(capsys, db_path, "set-setting", "node_gpus", value)
    assert result.code == 2
    assert "is not a GPU entry" in result.err
    assert snapshot(db_path) == before


@pytest.mark.parametrize("value", ["٣", "１0", "²", "9" * 5000])
def test_set_setting_refuses_non_ascii_default_time(db_path, capsys, value):
    before = snapshot(db_path)
    result = run_cli(capsys, db_path, "set-setting", "default_time_minutes", value)
    assert result.code == 2
    assert "whole number of minutes" in result.err
    assert snapshot(db_path) == before


def test_parse_node_gpus_reads_what_the_setting_stores():
    assert validate.parse_node_gpus("gpu:h100:2,gpu:4") == [("h100", 2), (None, 4)]


@pytest.mark.parametrize(
    "command", ["user-quota", "user-gpu-quota", "account-quota", "account-gpu-quota"]
)
@pytest.mark.parametrize("value", ["٣", "9" * 5000, "-" + "9" * 5000, "1_000"])
def test_quota_commands_refuse_hostile_numbers(db_path, capsys, command, value):
    before = snapshot(db_path)
    result = run_cli(capsys, db_path, command, "alice", value)
    assert result.code == 2
    assert "is not a whole number" in result.err
    assert snapshot(db_path) == before


@pytest.mark.parametrize("value", ["+" + "9" * 5000, "+٣", "-²"])
def test_adjust_refuses_hostile_numbers(db_path, capsys, value):
    before = snapshot(db_path)
    result = run_cli(
        capsys, db_path, "adjust", "--user", "alice", "--cpu", f"--minutes={value}"
    )
    assert result.code == 2
    assert "explicitly signed whole number" in result.err
    assert snapshot(db_path) == before


@pytest.mark.parametrize("text", ["٣", "²", "１２", "1_0", "0x10", "1e5", "", " ", "+", "-1"])
def test_int_or_none_reads_ascii_digits_only(text):
    assert numbers.int_or_none(text) is None


def test_int_or_none_bounds_the_length():
    assert numbers.int_or_none("9" * numbers.MAX_DIGITS) == int("9" * numbers.MAX_DIGITS)
    assert numbers.int_or_none("9" * (numbers.MAX_DIGITS + 1)) is None


def test_parse_quota_refuses_a_5000_digit_number():
    with pytest.raises(InvalidInput, match="not a whole number"):
        ledger.parse_quota("9" * 5000)


def test_tres_gpu_counts_read_ascii_digits_only():
    assert slurm.gpus_by_type("gres/gpu:h100=٣,gres/gpu=٣") == {}
    assert slurm.gpus_by_type("gres/gpu:h100=3") == {"h100": 3}
    assert slurm.cpus_in("cpu=٣") is None


def test_sacct_unicode_digit_fields_are_not_numbers():
    row = slurm._sacct_row(
        ["²", "²_1", "alice", "a", "p", "COMPLETED", "٣", "1", "1", "2", "", ""]
    )
    assert row is None


@pytest.mark.parametrize("key", ["JOBID", "START", "END", "PROCS"])
def test_jobcomp_variables_read_ascii_digits_only(key):
    env = {"JOBID": "7", "START": "100", "END": "160", "PROCS": "2", "USERNAME": "alice"}
    env[key] = "٣"
    with pytest.raises(InvalidInput, match=f"{key}='٣' is not a number"):
        charge.run_from_env(env)
