"""Usage thresholds: a site command run once per threshold, owner, resource and period.

Owns the site's threshold settings (`threshold_command`, `threshold_percents` in `settings`),
finding the thresholds an owner's consumption has crossed (consumed / quota, the current
allocation period's consumption), recording each once (threshold_events, UNIQUE per owner,
period, resource and threshold), and running the command for each recorded event not yet
done, with the numbers in its environment.

Never from the plugin, never inside a charge's transaction: `charge` calls notify() after its
transaction committed, `reconcile` at its end. A command that fails or runs past its time
limit is logged and its event stays pending: the next charge or reconcile tries it again
(at most MAX_ATTEMPTS times). Charging never waits for more than a bounded time
(BUDGET_S per call).

This is the one module besides slurm.py that runs a subprocess: the command is the site's,
not Slurm's, and keeping it out of slurm.py keeps that module about Slurm only.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from slurm_quota import db, numbers
from slurm_quota.errors import InvalidInput
from slurm_quota.ledger import UNLIMITED

log = logging.getLogger(__name__)

SETTING_COMMAND = "threshold_command"
SETTING_PERCENTS = "threshold_percents"
DEFAULT_PERCENTS = (80, 95, 100)
COMMAND_TIMEOUT_S = 10.0
BUDGET_S = 15.0  # whole notify() call; the rest waits for the next charge or reconcile
MAX_ATTEMPTS = 20
RECORD_BATCH = 500  # threshold rows inserted per write transaction
ACTION_SET = "set-thresholds"


@dataclass(frozen=True)
class Config:
    """The site's threshold settings (command None: thresholds off)."""

    command: str | None
    percents: tuple[int, ...]


def parse_percents(text: str) -> tuple[int, ...]:
    """'80,95,100' -> (80, 95, 100): whole percentages 1..1000, sorted, no duplicates."""
    out = set()
    for part in (text or "").split(","):
        value = numbers.int_or_none(part.strip())
        if value is None or not 1 <= value <= 1000:
            raise InvalidInput(
                f"Thresholds are whole percentages from 1 to 1000 separated by commas "
                f"(80,95,100), not {numbers.shown(text)}."
            )
        out.add(value)
    return tuple(sorted(out))


def config(conn: Any) -> Config:
    """The threshold settings as stored."""
    command = db.get_setting(conn, SETTING_COMMAND)
    percents = db.get_setting(conn, SETTING_PERCENTS)
    return Config(command or None, parse_percents(percents) if percents else DEFAULT_PERCENTS)


def set_config(
    conn: Any, command: str | None, percents: str | None, *, actor: str, reason: str | None
) -> Config:
    """Set (command '' to switch off) the threshold command and/or percentages, journaled."""
    if command is None and percents is None:
        raise InvalidInput("Give --command and/or --percents.")
    if command:
        try:
            argv = shlex.split(command)
        except ValueError as err:
            raise InvalidInput(f"The command {command!r} cannot be split: {err}.") from err
        if not argv or not os.path.isabs(argv[0]):
            raise InvalidInput("The threshold command must start with an absolute path.")
    if percents is not None:
        percents = ",".join(map(str, parse_percents(percents)))
    with db.write_transaction(conn):
        for key, value in ((SETTING_COMMAND, command), (SETTING_PERCENTS, percents)):
            if value is None:
                continue
            old = db.get_setting(conn, key)
            if value == "":
                db.delete_setting(conn, key)
            else:
                db.set_setting(conn, key, value)
            db.insert_journal(
                conn,
                actor=actor,
                action=ACTION_SET,
                target_kind="setting",
                target=key,
                field="value",
                old_value=old,
                new_value=value or None,
                reason=reason,
            )
    return config(conn)


def crossed(quota_minutes: int, consumed_minutes: int, percents: tuple[int, ...]) -> list[int]:
    """The thresholds consumed / quota has reached (none for an unlimited or zero quota)."""
    if quota_minutes == UNLIMITED or quota_minutes <= 0:
        return []
    return [p for p in percents if consumed_minutes * 100 >= p * quota_minutes]


def record(conn: Any, owners: list[tuple[str, str]] | None, now: int, cfg: Config) -> int:
    """Record the thresholds crossed by owners (None: everyone), once each per period; return
    how many are new. The crossings are found by reading only (one query); the write
    transactions insert just those, RECORD_BATCH at a time, so the plugin never waits long."""
    low = min(cfg.percents)
    if owners is None:
        rows = db.threshold_candidates(conn, low)
    else:  # the charge path: the run's user and account only (primary-key lookups)
        rows = [r for kind, name in owners for r in db.threshold_candidates(conn, low, kind, name)]
    found = []
    for kind, name, resource, quota, consumed, reserved, start, end in rows:
        # A rolling window has no periods: once per threshold for as long as it applies.
        period_start = int(start) if start is not None and end is not None else 0
        for pct in crossed(int(quota), int(consumed), cfg.percents):
            found.append(
                (
                    kind,
                    name,
                    period_start,
                    resource,
                    pct,
                    round(int(consumed) / int(quota) * 100.0, 2),
                    int(quota),
                    int(consumed),
                    int(reserved),
                )
            )
    new = 0
    for i in range(0, len(found), RECORD_BATCH):
        with db.write_transaction(conn):
            for event in found[i : i + RECORD_BATCH]:
                new += db.insert_threshold_event(conn, *event, now)
    return new


def _environment(event: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_QUOTA_EVENT_")}
    env.update(
        {
            "SLURM_QUOTA_EVENT_OWNER_KIND": str(event["owner_kind"]),
            "SLURM_QUOTA_EVENT_OWNER": str(event["owner"]),
            "SLURM_QUOTA_EVENT_RESOURCE": str(event["resource"]),
            "SLURM_QUOTA_EVENT_THRESHOLD_PERCENT": str(event["threshold_percent"]),
            "SLURM_QUOTA_EVENT_USAGE_PERCENT": str(event["usage_percent"]),
            "SLURM_QUOTA_EVENT_QUOTA_MINUTES": str(event["quota_minutes"]),
            "SLURM_QUOTA_EVENT_CONSUMED_MINUTES": str(event["consumed_minutes"]),
            "SLURM_QUOTA_EVENT_RESERVED_MINUTES": str(event["reserved_minutes"]),
            "SLURM_QUOTA_EVENT_PERIOD_START": str(event["period_start"]),
            "SLURM_QUOTA_EVENT_CROSSED_AT": str(event["crossed_at"]),
            "SLURM_QUOTA_EVENT_ID": str(event["id"]),
        }
    )
    return env


@dataclass(frozen=True)
class Outcome:
    """What notify() did: commands that succeeded, failed, and events left for later."""

    done: int
    failed: int
    pending: int


def run_pending(
    conn: Any, cfg: Config, *, budget_s: float | None = None, timeout_s: float | None = None
) -> Outcome:
    """Run the command for each pending event, oldest first, within budget_s (BUDGET_S),
    each at most timeout_s (COMMAND_TIMEOUT_S)."""
    if not cfg.command:
        return Outcome(0, 0, 0)
    budget_s = BUDGET_S if budget_s is None else budget_s
    timeout_s = COMMAND_TIMEOUT_S if timeout_s is None else timeout_s
    argv = shlex.split(cfg.command)
    deadline = time.monotonic() + budget_s
    done = failed = 0
    events = db.pending_threshold_events(conn, MAX_ATTEMPTS)
    for event in events:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        error = None
        try:
            proc = subprocess.run(
                argv,
                env=_environment(event),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=min(timeout_s, left),
            )
            if proc.returncode != 0:
                error = f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[:200]}"
        except subprocess.TimeoutExpired:
            error = f"no answer within {min(timeout_s, left):.0f} s (killed)"
        except OSError as err:
            error = f"cannot run {argv[0]}: {err}"
        with db.write_transaction(conn):
            db.finish_threshold_event(conn, int(event["id"]), error, int(time.time()))
        if error is None:
            done += 1
        else:
            failed += 1
            log.warning(
                "threshold command for %s %s %s %s%% failed (attempt %d, retried later): %s",
                event["owner_kind"],
                event["owner"],
                event["resource"],
                event["threshold_percent"],
                int(event["attempts"]) + 1,
                error,
            )
    pending = len(db.pending_threshold_events(conn, MAX_ATTEMPTS))
    return Outcome(done, failed, pending)


def notify(conn: Any, owners: list[tuple[str, str]] | None, now: int) -> Outcome:
    """Record what owners crossed (None: every user and account) and run pending commands.
    Never raises for a failing command; the caller's charge already committed."""
    cfg = config(conn)
    if not cfg.command:
        return Outcome(0, 0, 0)
    record(conn, owners, now, cfg)
    return run_pending(conn, cfg)
