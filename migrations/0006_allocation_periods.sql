-- 0006: allocation periods (issue 18): calendar periods with an archive and a capped
-- carry-over, rolling windows, and the commands run when a usage threshold is crossed.
--
-- The plugin reads nothing new: a period boundary changes the same consumed_cpu_s /
-- consumed_gpu_ms the plugin already reads, through a consumption_adjustments row of its own
-- reason ('period-rollover', 'window', 'closed-period'), so `check`'s
-- consumed = Σ charges + Σ adjustments still holds. slurm_quota/periods.py does that work
-- from the charge path and the reconcile timer; nothing here runs at submit time.
--
-- Plain tables and indexes only (no triggers), so the MariaDB port is a transcription.
BEGIN IMMEDIATE;

-- What period applies to whom. owner_kind 'site' with owner '' is the site default
-- (for every user and account without a row of their own).
--   spec: 'none' | 'month' | 'quarter' | 'year' | 'YYYY-MM-DD+N[dwmy]' (anchor + length,
--         repeating) | 'rolling:N' (a window of the last N days)
--   time_zone: the site row only: the IANA zone calendar boundaries are midnights of
--         (NULL = the controller's local zone)
CREATE TABLE IF NOT EXISTS period_rules (
    owner_kind TEXT NOT NULL,
    owner TEXT NOT NULL,
    spec TEXT NOT NULL,
    carry_over_percent INTEGER NOT NULL DEFAULT 0,
    time_zone TEXT,
    PRIMARY KEY (owner_kind, owner)
);

-- The period each user and account is in now (one row per owner under a rule).
--   period_end NULL: a rolling window; window_aged_until: charges of runs that ended at or
--   before it are already taken off the totals. carry_in_*: the credit this period started
--   with (its consumption started at minus that).
CREATE TABLE IF NOT EXISTS period_state (
    owner_kind TEXT NOT NULL,
    owner TEXT NOT NULL,
    spec TEXT NOT NULL,
    period_start INTEGER NOT NULL,
    period_end INTEGER,
    window_aged_until INTEGER,
    carry_in_cpu_s INTEGER NOT NULL DEFAULT 0,
    carry_in_gpu_ms INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (owner_kind, owner)
);

-- One row per closed calendar period and owner. used_* = what the period consumed
-- (its charges and adjustments, not counting the credit it started with), late_* the part
-- of it charged after the period closed (runs that ended in it, charged by reconcile later).
CREATE TABLE IF NOT EXISTS period_archive (
    id INTEGER PRIMARY KEY,
    owner_kind TEXT NOT NULL,
    owner TEXT NOT NULL,
    spec TEXT NOT NULL,
    period_start INTEGER NOT NULL,
    period_end INTEGER NOT NULL,
    quota_cpu_minutes INTEGER NOT NULL,
    quota_gpu_minutes INTEGER NOT NULL,
    used_cpu_s INTEGER NOT NULL,
    used_gpu_ms INTEGER NOT NULL,
    carry_in_cpu_s INTEGER NOT NULL DEFAULT 0,
    carry_in_gpu_ms INTEGER NOT NULL DEFAULT 0,
    carry_out_cpu_s INTEGER NOT NULL DEFAULT 0,
    carry_out_gpu_ms INTEGER NOT NULL DEFAULT 0,
    late_cpu_s INTEGER NOT NULL DEFAULT 0,
    late_gpu_ms INTEGER NOT NULL DEFAULT 0,
    closed_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    UNIQUE (owner_kind, owner, period_start)
);
CREATE INDEX IF NOT EXISTS period_archive_start ON period_archive(period_start, period_end);

-- Usage thresholds crossed, one row per owner, period, resource and threshold: the command
-- runs once per row (done_at set on success; attempts counts tries, the last error kept).
CREATE TABLE IF NOT EXISTS threshold_events (
    id INTEGER PRIMARY KEY,
    owner_kind TEXT NOT NULL,
    owner TEXT NOT NULL,
    period_start INTEGER NOT NULL,
    resource TEXT NOT NULL,
    threshold_percent INTEGER NOT NULL,
    usage_percent REAL NOT NULL,
    quota_minutes INTEGER NOT NULL,
    consumed_minutes INTEGER NOT NULL,
    reserved_minutes INTEGER NOT NULL,
    crossed_at INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    done_at INTEGER,
    UNIQUE (owner_kind, owner, period_start, resource, threshold_percent)
);
CREATE INDEX IF NOT EXISTS threshold_events_pending ON threshold_events(done_at, id);

-- The charges of one owner by end time: what a rolling window takes off, what a closed
-- period's late charges and the usage chart read.
CREATE INDEX IF NOT EXISTS charges_username_end ON charges(username, end_time);
CREATE INDEX IF NOT EXISTS charges_account_end ON charges(account, end_time);

PRAGMA user_version = 6;
COMMIT;
