"""Usage thresholds: the site command runs once per threshold, owner, resource and period,
with the numbers in its environment; a failing or hanging one never blocks a charge and is
retried later."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from slurm_quota import admin, db, periods, thresholds
from slurm_quota import charge as C
from slurm_quota.errors import InvalidInput
from tests.unit.cli_helpers import run_cli, snapshot


def hook(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "hook.sh"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


RECORDER = (
    'echo "$SLURM_QUOTA_EVENT_OWNER_KIND $SLURM_QUOTA_EVENT_OWNER $SLURM_QUOTA_EVENT_RESOURCE '
    '$SLURM_QUOTA_EVENT_THRESHOLD_PERCENT $SLURM_QUOTA_EVENT_CONSUMED_MINUTES '
    '$SLURM_QUOTA_EVENT_QUOTA_MINUTES" >> "$(dirname "$0")/calls"\n'
)


def charge(conn, job_id: int, minutes: int, user="alice", account="physics"):
    end = int(time.time()) - 10
    run = C.Run(job_id=job_id, start_time=end - minutes * 60, end_time=end, cpus=1,
                username=user, account=account, job_state="COMPLETED")  # fmt: skip
    return C.apply_charge(conn, run, C.Allocation(None), "test")


def calls(tmp_path: Path) -> list[str]:
    f = tmp_path / "calls"
    return f.read_text().splitlines() if f.exists() else []


@pytest.fixture
def ledger(conn):
    admin.set_quota(conn, "account", "physics", "cpu", 100)
    return conn


def test_each_threshold_runs_once_with_the_numbers(ledger, tmp_path):
    thresholds.set_config(ledger, str(hook(tmp_path, RECORDER)), "50,80,100", actor="t",
                          reason=None)  # fmt: skip
    charge(ledger, 1, 40)
    assert calls(tmp_path) == []
    charge(ledger, 2, 45)  # 85 of 100: 50 and 80 crossed
    assert calls(tmp_path) == ["account physics cpu 50 85 100", "account physics cpu 80 85 100"]
    charge(ledger, 3, 1)  # still between 80 and 100: nothing again
    thresholds.notify(ledger, None, int(time.time()))  # the reconcile timer's call
    assert len(calls(tmp_path)) == 2
    charge(ledger, 4, 20)
    assert calls(tmp_path)[-1] == "account physics cpu 100 106 100"


def test_a_new_period_fires_the_thresholds_again(ledger, tmp_path, monkeypatch):
    monkeypatch.setattr(periods, "now_s", lambda: int(time.time()))
    periods.set_rule(ledger, "site", "", "none", 0, time_zone="UTC", actor="t", reason=None,
                     now=int(time.time()))  # fmt: skip
    periods.set_rule(ledger, "account", "physics", "month", 0, actor="t", reason=None,
                     now=int(time.time()))  # fmt: skip
    thresholds.set_config(ledger, str(hook(tmp_path, RECORDER)), "80", actor="t", reason=None)
    charge(ledger, 1, 90)
    # closed 100 s ago: the next run (ended 10 s ago) counts in the new period
    periods.close_now(ledger, "account", "physics", actor="t", reason=None,
                      now=int(time.time()) - 100)  # fmt: skip
    charge(ledger, 2, 85)
    assert calls(tmp_path) == ["account physics cpu 80 90 100", "account physics cpu 80 85 100"]


def test_a_failing_command_never_blocks_the_charge_and_is_retried(ledger, tmp_path):
    flag = tmp_path / "fixed"
    body = f'[ -e "{flag}" ] || {{ echo "mail server down" >&2; exit 3; }}\n' + RECORDER
    thresholds.set_config(ledger, str(hook(tmp_path, body)), "80", actor="t", reason=None)
    result = charge(ledger, 1, 90)
    assert result.charged
    assert db.owner_consumed_exact(ledger, "account", "physics")[0] == 90 * 60
    (event,) = db.threshold_events(ledger, 5)
    assert (event["attempts"], event["done_at"]) == (1, None)
    assert "exit 3: mail server down" in event["last_error"]
    flag.touch()
    outcome = thresholds.notify(ledger, None, int(time.time()))
    assert (outcome.done, outcome.failed, outcome.pending) == (1, 0, 0)
    assert calls(tmp_path) == ["account physics cpu 80 90 100"]


def test_a_hanging_command_is_killed_within_the_budget(ledger, tmp_path, monkeypatch):
    monkeypatch.setattr(thresholds, "COMMAND_TIMEOUT_S", 1.0)
    thresholds.set_config(ledger, str(hook(tmp_path, "exec sleep 30\n")), "80", actor="t",
                          reason=None)  # fmt: skip
    t0 = time.monotonic()
    assert charge(ledger, 1, 90).charged
    assert time.monotonic() - t0 < 3  # the charge waited one command timeout, not 30 s
    t0 = time.monotonic()
    outcome = thresholds.run_pending(ledger, thresholds.config(ledger), budget_s=5,
                                     timeout_s=1)  # fmt: skip
    assert time.monotonic() - t0 < 4
    assert (outcome.failed, outcome.pending) == (1, 1)
    assert "killed" in db.threshold_events(ledger, 1)[0]["last_error"]


def test_a_missing_command_is_logged_not_raised(ledger, tmp_path, caplog):
    thresholds.set_config(ledger, str(tmp_path / "nope"), "80", actor="t", reason=None)
    assert charge(ledger, 1, 90).charged
    assert "cannot run" in db.threshold_events(ledger, 1)[0]["last_error"]
    assert "retried later" in caplog.text


@pytest.mark.parametrize("percents", ["", "80,,95", "0", "95,abc", "٨٠"])
def test_bad_thresholds_are_refused(ledger, percents):
    with pytest.raises(InvalidInput):
        thresholds.set_config(ledger, None, percents, actor="t", reason=None)


def test_set_thresholds_cli_refuses_a_relative_command_and_changes_nothing(db_path, capsys):
    before = snapshot(db_path)
    r = run_cli(capsys, db_path, "set-thresholds", "--command", "mail -s quota")
    assert r.code == 2 and "absolute path" in r.err
    assert snapshot(db_path) == before
    r = run_cli(capsys, db_path, "set-thresholds", "--command", "/bin/true", "--percents", "95,80")
    assert r.code == 0 and "80 %, 95 %" in r.out
    r = run_cli(capsys, db_path, "thresholds")
    assert r.code == 0 and "command: /bin/true" in r.out


def test_the_command_environment_has_no_leftover_event_variables(ledger, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_QUOTA_EVENT_STALE", "x")
    thresholds.set_config(ledger, str(hook(tmp_path, 'env > "$(dirname "$0")/env"\n')), "80",
                          actor="t", reason=None)  # fmt: skip
    charge(ledger, 1, 90)
    env = (tmp_path / "env").read_text()
    assert "SLURM_QUOTA_EVENT_STALE" not in env and "SLURM_QUOTA_EVENT_USAGE_PERCENT=90.0" in env
    assert os.environ["SLURM_QUOTA_EVENT_STALE"] == "x"
