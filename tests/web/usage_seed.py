"""A ledger with two months of daily charges for account physics under a quarterly period,
charged as time went by (so the quarter boundary rolled over on the way), open reservations,
and the clock of today: what the usage chart tests and the screenshot draw."""

from __future__ import annotations

import time
from pathlib import Path

from slurm_quota import admin, db, periods
from slurm_quota import charge as C

DAY = 86400
DAYS = 75
CPUS = 25


def day_elapsed_s(day: int) -> int:
    """A working pattern: 0.6 to 1.4 hours a day, weekends lighter (deterministic)."""
    base = 3600 * (6 + (day * 37) % 9) // 10
    return base // 3 if day % 7 in (5, 6) else base


def seed_usage(path: Path, monkeypatch) -> dict:
    """Charge DAYS days of runs ending at noon (UTC) up to yesterday; return the numbers."""
    now = int(time.time())
    start = (now // DAY - DAYS) * DAY
    conn = db.connect(path)
    try:
        admin.set_quota(conn, "account", "physics", "cpu", 90_000)
        admin.set_quota(conn, "account", "physics", "gpu", 3_600)
        admin.set_quota(conn, "user", "alice", "cpu", -1)
        periods.set_rule(conn, "site", "", "none", 0, time_zone="UTC", actor="seed",
                         reason=None, now=start)  # fmt: skip
        periods.set_rule(conn, "account", "physics", "quarter", 10, actor="seed",
                         reason="course share", now=start)  # fmt: skip
        for day in range(DAYS):
            end = start + day * DAY + 12 * 3600
            if end >= now:
                break
            monkeypatch.setattr(periods, "now_s", lambda end=end: end + 60)
            run = C.Run(job_id=1000 + day, start_time=end - day_elapsed_s(day), end_time=end,
                        cpus=CPUS, username="alice", account="physics",
                        job_state="COMPLETED")  # fmt: skip
            C.apply_charge(conn, run, C.Allocation(None, {"a100": 1}), "seed")
        monkeypatch.undo()
        periods.maintain_all(conn, now, "seed")
        conn.execute("INSERT INTO jobs_preallocations (job_uuid, username, account, "
                     "preallocated_cpu_minutes, preallocated_gpu_minutes, array_size) "
                     "VALUES ('00000000-0000-4000-8000-000000000001', 'alice', 'physics', "
                     "1500, 60, 2)")  # fmt: skip
        conn.commit()
    finally:
        conn.close()
    return {"now": now, "start": start}
