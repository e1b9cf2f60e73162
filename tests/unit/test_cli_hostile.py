"""Property (issue 19): whatever hostile strings and numbers a command's options get, the CLI
answers with a message and exit status 1 or 2 (never a traceback: cli.main lets anything but
SlurmQuotaError and click errors escape) and the ledger is unchanged.

Every generated command line carries at least one value no command can accept (a number in
non-ASCII digits, nan, a 5000-digit number, ...) in a parameter that must be a number, so
the expected outcome is always a refusal; the other parameters get hostile text that may or
may not be valid. `serve` is included: an accepted line would start a server and hang.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slurm_quota.cli import cli, main
from tests.unit.cli_helpers import snapshot

HOSTILE = settings(max_examples=100, deadline=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture])

UNICODE_DIGITS = "²³¹٠١٢٣٤٥٦٧٨٩۰۱۲۳０１２３４５６７８９߀०१२३๑๒༢᠑⁴₅①"

# Never a valid number anywhere in the CLI.
poison = st.one_of(
    st.text(alphabet=UNICODE_DIGITS, min_size=1, max_size=6),
    st.tuples(st.sampled_from(["", "+", "-"]),
              st.text(alphabet=UNICODE_DIGITS, min_size=1, max_size=4),
              st.text(alphabet="0123456789", max_size=3)).map("".join),
    st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1_0", "0x10", "", " ",
                     "+", "-", "--", "1.2.3", "١e٣", "\x00", "1\x00", "9" * 5000, "-" + "9" * 5000,
                     "+" + "9" * 5000, "²h", "٣d", "99999999999999d", "9" * 30 + "d"]),
)
# Anything: valid-looking or not.
anything = st.one_of(
    poison,
    st.integers(min_value=-(2**80), max_value=2**80).map(str),
    st.sampled_from(["alice", "physics", "h100", "default", "0", "1", "-1", "+30", "60",
                     "gpu:h100:2", "1e5", "1\n", "a b", "x\ty", "é", "💥",
                     "'; DROP TABLE users; --", "../../etc/passwd", "%s%n", "\u202e", "a" * 300]),
    st.text(max_size=12),
)


def _check(db_path, capsys, argv: list[str]) -> None:
    before = snapshot(db_path)
    capsys.readouterr()
    code = main(["--db", str(db_path), *argv])
    out, err = capsys.readouterr()
    assert code in (1, 2), (argv, code, out, err)
    assert err.strip(), (argv, code)
    assert "Traceback" not in err and "Traceback" not in out
    assert snapshot(db_path) == before, argv


def _opt(name: str, value: str) -> list[str]:
    return [f"{name}={value}"]  # `=` so a value starting with - stays a value


def _maybe(name: str, values=anything):
    return st.one_of(st.just([]), values.map(lambda v: _opt(name, v)))


def _shuffle(parts):
    return st.permutations(parts).map(lambda ps: [a for p in ps for a in p])


def _line(required: list, optional: list):
    """One command line: optional parts in any order, then the poisoned ones. Last, because
    click keeps the last of a repeated option: an optional `--port=0` after a poisoned
    `--port` would make the line valid (and start a server)."""
    return st.tuples(st.tuples(*optional).flatmap(lambda parts: _shuffle(list(parts))),
                     st.tuples(*required)).map(lambda t: t[0] + [a for p in t[1] for a in p])


QUOTA_COMMANDS = ["user-quota", "user-gpu-quota", "account-quota", "account-gpu-quota"]


@HOSTILE
@given(command=st.sampled_from(QUOTA_COMMANDS), name=anything, n=poison,
       reason=_maybe("--reason"))
def test_quota_commands(db_path, capsys, command, name, n, reason):
    if name.startswith("-"):
        name = "x" + name
    _check(db_path, capsys, [command, *reason, "--", name, n])


@HOSTILE
@given(who=st.sampled_from(["--user", "--account"]), name=anything,
       res=st.sampled_from([["--cpu"], ["--gpu"], ["--cpu", "--gpu"], []]),
       unit=st.sampled_from(["--minutes", "--hours"]), sign=st.sampled_from(["+", "-", ""]),
       n=poison, reason=_maybe("--reason"))
def test_adjust(db_path, capsys, who, name, res, unit, sign, n, reason):
    _check(db_path, capsys, ["adjust", *_opt(who, name), *res, *_opt(unit, sign + n), *reason])


@HOSTILE
@given(line=_line(
    [st.sampled_from(["--user-cpu", "--user-gpu", "--account-cpu", "--account-gpu"]).flatmap(
        lambda o: poison.map(lambda v: _opt(o, v)))],
    [_maybe("--user-cpu"), _maybe("--account-gpu"), _maybe("--reason")],
))
def test_set_default_quotas(db_path, capsys, line):
    _check(db_path, capsys, ["set-default-quotas", *line])


@HOSTILE
@given(key=st.sampled_from(["default_time_minutes", "node_gpus", "node_gpus.gpu"]),
       template=st.sampled_from(["{}", "gpu:{}", "gpu:h100:{}", "gpu:2,gpu:{}"]),
       n=poison, reason=_maybe("--reason"))
def test_set_setting(db_path, capsys, key, template, n, reason):
    value = template.format(n)
    if key != "default_time_minutes" and template == "{}" and n == "":
        value = "gpu:"
    _check(db_path, capsys, ["set-setting", *reason, "--", key, value])


@HOSTILE
@given(gpu_type=anything, factor=poison, reason=_maybe("--reason"))
def test_set_gpu_factor(db_path, capsys, gpu_type, factor, reason):
    if gpu_type.startswith("-"):
        gpu_type = "x" + gpu_type
    _check(db_path, capsys, ["set-gpu-factor", *reason, "--", gpu_type, factor])


@HOSTILE
@given(line=_line(
    [st.sampled_from(["--job", "--limit"]).flatmap(lambda o: poison.map(lambda v: _opt(o, v)))],
    [_maybe("--user"), _maybe("--account"), _maybe("--job"),
     st.sampled_from([[], ["--json"]])],
))
def test_history(db_path, capsys, line):
    _check(db_path, capsys, ["history", *line])


@HOSTILE
@given(command=st.sampled_from(["reconcile", "prune"]), dry_run=st.booleans(),
       poisoned=st.sampled_from(["--since", "--grace"]), value=poison,
       grace=_maybe("--grace"), who=_maybe("--user"))
def test_reconcile_and_prune(db_path, capsys, command, dry_run, poisoned, value, grace, who):
    if command == "prune":
        poisoned = "--grace"
        extra = who
    else:
        extra = grace if poisoned == "--since" else []
    argv = [command, *(["--dry-run"] if dry_run else []), *_opt(poisoned, value), *extra]
    _check(db_path, capsys, argv)


@HOSTILE
@given(line=_line(
    [st.sampled_from(["--port", "--idle-timeout", "--threads", "--max-stale"]).flatmap(
        lambda o: poison.map(lambda v: _opt(o, v)))],
    [_maybe("--port"), _maybe("--threads"), _maybe("--host")],
))
def test_serve(db_path, capsys, line):
    _check(db_path, capsys, ["serve", *line])


@HOSTILE
@given(user=_maybe("--user"), color=anything.filter(lambda c: c not in ("auto", "always",
                                                                         "never")))
def test_stats_local(db_path, capsys, user, color):
    _check(db_path, capsys, ["stats", "--local", *user, *_opt("--color", color)])


@pytest.mark.parametrize("command", ["migrate", "check", "default-quotas", "settings",
                                     "gpu-factors"])
@HOSTILE
@given(extra=anything)
def test_commands_without_values_refuse_an_extra_argument(db_path, capsys, command, extra):
    _check(db_path, capsys, [command, "--", extra])


@HOSTILE
@given(who=st.sampled_from([["--default"], ["--user", "alice"], ["--account", "physics"]]),
       spec=anything, pct=poison, tz=_maybe("--time-zone"), reason=_maybe("--reason"))
def test_set_period(db_path, capsys, who, spec, pct, tz, reason):
    _check(db_path, capsys, ["set-period", *who, *tz, *reason, *_opt("--carry-over", pct),
                             "--", spec])


@HOSTILE
@given(who=st.sampled_from(["--user", "--account"]), name=anything, reason=_maybe("--reason"))
def test_close_period(db_path, capsys, who, name, reason):
    _check(db_path, capsys, ["close-period", *_opt(who, name), *reason])


@HOSTILE
@given(at=poison, who=_maybe("--user"), json_=st.sampled_from([[], ["--json"]]))
def test_periods(db_path, capsys, at, who, json_):
    _check(db_path, capsys, ["periods", *_opt("--at", at), *who, *json_])


@HOSTILE
@given(percents=poison, command=_maybe("--command", st.sampled_from(["/bin/true", "x", ""])),
       reason=_maybe("--reason"))
def test_set_thresholds(db_path, capsys, percents, command, reason):
    _check(db_path, capsys, ["set-thresholds", *command, *reason, *_opt("--percents", percents)])


@HOSTILE
@given(limit=poison)
def test_thresholds(db_path, capsys, limit):
    _check(db_path, capsys, ["thresholds", *_opt("--limit", limit)])


JOBCOMP = {"JOBID": "7", "START": "1700000000", "END": "1700000060", "PROCS": "2",
           "USERNAME": "alice", "ACCOUNT": "physics", "JOBSTATE": "COMPLETED"}
implausible = st.sampled_from([str(2**70), str(2**64), str(2**40), "-5", "9" * 30])


@HOSTILE
@given(key=st.sampled_from(["JOBID", "START", "END", "PROCS", "ARRAYJOBID", "HETJOBID"]),
       value=st.one_of(poison.filter(lambda v: v.strip() != "" and "\x00" not in v),
                       implausible),
       other=st.dictionaries(st.sampled_from(list(JOBCOMP)), anything, max_size=2))
def test_charge_environment(db_path, capsys, key, value, other):
    env = {**JOBCOMP, **{k: v.replace("\x00", "") for k, v in other.items()}, key: value}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        _check(db_path, capsys, ["charge"])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@HOSTILE
@given(source=anything, prefix=st.sampled_from(["", "sqlite:", "mariadb:"]))
def test_copy_ledger_sources(db_path, capsys, tmp_path, source, prefix):
    target = tmp_path / "copy-target.db"
    _check(db_path, capsys, ["copy-ledger", "--", prefix + source, str(target)])
    assert not target.exists()  # nothing is created when the source cannot be read


def test_every_command_is_covered():
    covered = {*QUOTA_COMMANDS, "adjust", "set-default-quotas", "set-setting", "set-gpu-factor",
               "copy-ledger", "history", "reconcile", "prune", "serve", "stats", "migrate",
               "check", "default-quotas", "settings", "gpu-factors", "charge", "set-period",
               "close-period", "periods", "set-thresholds", "thresholds"}
    assert set(cli.commands) == covered
