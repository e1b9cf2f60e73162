-- 0005: consumption kept exactly, to the CPU-second and the GPU-millisecond.
--
-- Until 0004 every run was rounded half up to whole minutes on its own, so a run under 30
-- CPU-seconds was free. Now:
--   users/accounts.consumed_cpu_s   = Σ charges.cpu_s  + Σ consumption_adjustments.cpu_s
--   users/accounts.consumed_gpu_ms  = Σ charges.gpu_ms + Σ consumption_adjustments.gpu_ms
--   charges.cpu_s  = cpus × elapsed_s of the run (exact)
--   charges.gpu_ms = round half up (Σ count × factor × elapsed_s × 1000) of the run
-- and the seed's total_consumed_{cpu,gpu}_minutes are derived from them by ONE rule
-- (slurm_quota.ledger.minutes_from_cpu_s / minutes_from_gpu_ms: ceil(exact / 60 s)), written
-- by the same statement that changes the exact value, so every reader of minutes (stats,
-- /stats, /metrics, the dashboard, a seed tool) stays compatible.
--
-- consumption_adjustments holds what is not a charged run: the opening balance of a
-- database upgraded from minutes (written here) and every `adjust`. With it the exact totals
-- are checkable (`slurm-quota check`) like the reserved totals of 0003.
--
-- Existing totals are kept: minutes × 60 s (× 60,000 ms for GPU). Existing charges get the
-- amount they were charged (their rounded minutes) as their exact amount, so the sums above
-- hold from the first day; their inputs (cpus, elapsed_s, gpus, factors) are unchanged.
BEGIN IMMEDIATE;

ALTER TABLE users ADD COLUMN consumed_cpu_s INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN consumed_gpu_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN consumed_cpu_s INTEGER NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN consumed_gpu_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE charges ADD COLUMN cpu_s INTEGER NOT NULL DEFAULT 0;
ALTER TABLE charges ADD COLUMN gpu_ms INTEGER NOT NULL DEFAULT 0;

CREATE TABLE IF NOT EXISTS consumption_adjustments (
    id INTEGER PRIMARY KEY,
    at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    owner_kind TEXT NOT NULL,          -- 'user' | 'account'
    owner TEXT NOT NULL,               -- username | account
    cpu_s INTEGER NOT NULL DEFAULT 0,  -- signed
    gpu_ms INTEGER NOT NULL DEFAULT 0, -- signed
    reason TEXT NOT NULL               -- 'opening balance (migration 0005)' | 'adjust'
);
CREATE INDEX IF NOT EXISTS consumption_adjustments_owner
    ON consumption_adjustments(owner_kind, owner);

UPDATE charges SET cpu_s = COALESCE(cpu_minutes, 0) * 60,
    gpu_ms = COALESCE(gpu_minutes, 0) * 60000;

UPDATE users SET consumed_cpu_s = COALESCE(total_consumed_cpu_minutes, 0) * 60,
    consumed_gpu_ms = COALESCE(total_consumed_gpu_minutes, 0) * 60000;
UPDATE accounts SET consumed_cpu_s = COALESCE(total_consumed_cpu_minutes, 0) * 60,
    consumed_gpu_ms = COALESCE(total_consumed_gpu_minutes, 0) * 60000;

-- Opening balance = the total minus what its charges explain (a seed database has no
-- charges: all of it); rows where nothing is left to explain get none.
INSERT INTO consumption_adjustments (owner_kind, owner, cpu_s, gpu_ms, reason)
SELECT 'user', t.username,
       t.consumed_cpu_s - COALESCE((SELECT SUM(c.cpu_s) FROM charges AS c
                                     WHERE c.username = t.username), 0),
       t.consumed_gpu_ms - COALESCE((SELECT SUM(c.gpu_ms) FROM charges AS c
                                      WHERE c.username = t.username), 0),
       'opening balance (migration 0005)'
FROM users AS t;
INSERT INTO consumption_adjustments (owner_kind, owner, cpu_s, gpu_ms, reason)
SELECT 'account', t.account,
       t.consumed_cpu_s - COALESCE((SELECT SUM(c.cpu_s) FROM charges AS c
                                     WHERE c.account = t.account), 0),
       t.consumed_gpu_ms - COALESCE((SELECT SUM(c.gpu_ms) FROM charges AS c
                                      WHERE c.account = t.account), 0),
       'opening balance (migration 0005)'
FROM accounts AS t;
DELETE FROM consumption_adjustments WHERE cpu_s = 0 AND gpu_ms = 0;

-- A write of the seed's minute columns that did not come with the exact value (the seed's
-- charge or adjust while a site switches over, an admin's UPDATE at the sqlite3 prompt)
-- moves the exact total by the same whole minutes (clamped at 0) and records that as an
-- adjustment, so the plugin sees it and `check` still balances. Our writers set both
-- columns together by the rule, so the WHEN clause is false for them and nothing runs.
-- (The UPDATE inside touches only the exact columns: it does not fire these again. Inside a
-- trigger, last_insert_rowid() is the row the trigger just inserted.)
CREATE TRIGGER IF NOT EXISTS users_consumed_minutes_written
AFTER UPDATE OF total_consumed_cpu_minutes, total_consumed_gpu_minutes ON users
WHEN COALESCE(NEW.total_consumed_cpu_minutes, 0) IS NOT (CASE WHEN NEW.consumed_cpu_s > 0 THEN (NEW.consumed_cpu_s + 59) / 60 ELSE NEW.consumed_cpu_s / 60 END)
    OR COALESCE(NEW.total_consumed_gpu_minutes, 0) IS NOT (CASE WHEN NEW.consumed_gpu_ms > 0 THEN (NEW.consumed_gpu_ms + 59999) / 60000 ELSE NEW.consumed_gpu_ms / 60000 END)
BEGIN
    INSERT INTO consumption_adjustments (owner_kind, owner, cpu_s, gpu_ms, reason)
    VALUES ('user', NEW.username,
        CASE WHEN COALESCE(NEW.total_consumed_cpu_minutes, 0) IS NOT (CASE WHEN NEW.consumed_cpu_s > 0 THEN (NEW.consumed_cpu_s + 59) / 60 ELSE NEW.consumed_cpu_s / 60 END)
             THEN MAX(NEW.consumed_cpu_s + (COALESCE(NEW.total_consumed_cpu_minutes, 0) - COALESCE(OLD.total_consumed_cpu_minutes, 0)) * 60, 0) - NEW.consumed_cpu_s ELSE 0 END,
        CASE WHEN COALESCE(NEW.total_consumed_gpu_minutes, 0) IS NOT (CASE WHEN NEW.consumed_gpu_ms > 0 THEN (NEW.consumed_gpu_ms + 59999) / 60000 ELSE NEW.consumed_gpu_ms / 60000 END)
             THEN MAX(NEW.consumed_gpu_ms + (COALESCE(NEW.total_consumed_gpu_minutes, 0) - COALESCE(OLD.total_consumed_gpu_minutes, 0)) * 60000, 0) - NEW.consumed_gpu_ms ELSE 0 END,
        'minutes written directly');
    UPDATE users SET
        consumed_cpu_s = consumed_cpu_s
            + (SELECT cpu_s FROM consumption_adjustments WHERE id = last_insert_rowid()),
        consumed_gpu_ms = consumed_gpu_ms
            + (SELECT gpu_ms FROM consumption_adjustments WHERE id = last_insert_rowid())
    WHERE username = NEW.username;
END;

CREATE TRIGGER IF NOT EXISTS users_consumed_minutes_inserted
AFTER INSERT ON users
WHEN COALESCE(NEW.total_consumed_cpu_minutes, 0) IS NOT (CASE WHEN NEW.consumed_cpu_s > 0 THEN (NEW.consumed_cpu_s + 59) / 60 ELSE NEW.consumed_cpu_s / 60 END)
    OR COALESCE(NEW.total_consumed_gpu_minutes, 0) IS NOT (CASE WHEN NEW.consumed_gpu_ms > 0 THEN (NEW.consumed_gpu_ms + 59999) / 60000 ELSE NEW.consumed_gpu_ms / 60000 END)
BEGIN
    INSERT INTO consumption_adjustments (owner_kind, owner, cpu_s, gpu_ms, reason)
    VALUES ('user', NEW.username,
        CASE WHEN COALESCE(NEW.total_consumed_cpu_minutes, 0) IS NOT (CASE WHEN NEW.consumed_cpu_s > 0 THEN (NEW.consumed_cpu_s + 59) / 60 ELSE NEW.consumed_cpu_s / 60 END)
             THEN MAX(0 + (COALESCE(NEW.total_consumed_cpu_minutes, 0) - 0) * 60, 0) - NEW.consumed_cpu_s ELSE 0 END,
        CASE WHEN COALESCE(NEW.total_consumed_gpu_minutes, 0) IS NOT (CASE WHEN NEW.consumed_gpu_ms > 0 THEN (NEW.consumed_gpu_ms + 59999) / 60000 ELSE NEW.consumed_gpu_ms / 60000 END)
             THEN MAX(0 + (COALESCE(NEW.total_consumed_gpu_minutes, 0) - 0) * 60000, 0) - NEW.consumed_gpu_ms ELSE 0 END,
        'minutes written directly');
    UPDATE users SET
        consumed_cpu_s = consumed_cpu_s
            + (SELECT cpu_s FROM consumption_adjustments WHERE id = last_insert_rowid()),
        consumed_gpu_ms = consumed_gpu_ms
            + (SELECT gpu_ms FROM consumption_adjustments WHERE id = last_insert_rowid())
    WHERE username = NEW.username;
END;

CREATE TRIGGER IF NOT EXISTS accounts_consumed_minutes_written
AFTER UPDATE OF total_consumed_cpu_minutes, total_consumed_gpu_minutes ON accounts
WHEN COALESCE(NEW.total_consumed_cpu_minutes, 0) IS NOT (CASE WHEN NEW.consumed_cpu_s > 0 THEN (NEW.consumed_cpu_s + 59) / 60 ELSE NEW.consumed_cpu_s / 60 END)
    OR COALESCE(NEW.total_consumed_gpu_minutes, 0) IS NOT (CASE WHEN NEW.consumed_gpu_ms > 0 THEN (NEW.consumed_gpu_ms + 59999) / 60000 ELSE NEW.consumed_gpu_ms / 60000 END)
BEGIN
    INSERT INTO consumption_adjustments (owner_kind, owner, cpu_s, gpu_ms, reason)
    VALUES ('account', NEW.account,
        CASE WHEN COALESCE(NEW.total_consumed_cpu_minutes, 0) IS NOT (CASE WHEN NEW.consumed_cpu_s > 0 THEN (NEW.consumed_cpu_s + 59) / 60 ELSE NEW.consumed_cpu_s / 60 END)
             THEN MAX(NEW.consumed_cpu_s + (COALESCE(NEW.total_consumed_cpu_minutes, 0) - COALESCE(OLD.total_consumed_cpu_minutes, 0)) * 60, 0) - NEW.consumed_cpu_s ELSE 0 END,
        CASE WHEN COALESCE(NEW.total_consumed_gpu_minutes, 0) IS NOT (CASE WHEN NEW.consumed_gpu_ms > 0 THEN (NEW.consumed_gpu_ms + 59999) / 60000 ELSE NEW.consumed_gpu_ms / 60000 END)
             THEN MAX(NEW.consumed_gpu_ms + (COALESCE(NEW.total_consumed_gpu_minutes, 0) - COALESCE(OLD.total_consumed_gpu_minutes, 0)) * 60000, 0) - NEW.consumed_gpu_ms ELSE 0 END,
        'minutes written directly');
    UPDATE accounts SET
        consumed_cpu_s = consumed_cpu_s
            + (SELECT cpu_s FROM consumption_adjustments WHERE id = last_insert_rowid()),
        consumed_gpu_ms = consumed_gpu_ms
            + (SELECT gpu_ms FROM consumption_adjustments WHERE id = last_insert_rowid())
    WHERE account = NEW.account;
END;

CREATE TRIGGER IF NOT EXISTS accounts_consumed_minutes_inserted
AFTER INSERT ON accounts
WHEN COALESCE(NEW.total_consumed_cpu_minutes, 0) IS NOT (CASE WHEN NEW.consumed_cpu_s > 0 THEN (NEW.consumed_cpu_s + 59) / 60 ELSE NEW.consumed_cpu_s / 60 END)
    OR COALESCE(NEW.total_consumed_gpu_minutes, 0) IS NOT (CASE WHEN NEW.consumed_gpu_ms > 0 THEN (NEW.consumed_gpu_ms + 59999) / 60000 ELSE NEW.consumed_gpu_ms / 60000 END)
BEGIN
    INSERT INTO consumption_adjustments (owner_kind, owner, cpu_s, gpu_ms, reason)
    VALUES ('account', NEW.account,
        CASE WHEN COALESCE(NEW.total_consumed_cpu_minutes, 0) IS NOT (CASE WHEN NEW.consumed_cpu_s > 0 THEN (NEW.consumed_cpu_s + 59) / 60 ELSE NEW.consumed_cpu_s / 60 END)
             THEN MAX(0 + (COALESCE(NEW.total_consumed_cpu_minutes, 0) - 0) * 60, 0) - NEW.consumed_cpu_s ELSE 0 END,
        CASE WHEN COALESCE(NEW.total_consumed_gpu_minutes, 0) IS NOT (CASE WHEN NEW.consumed_gpu_ms > 0 THEN (NEW.consumed_gpu_ms + 59999) / 60000 ELSE NEW.consumed_gpu_ms / 60000 END)
             THEN MAX(0 + (COALESCE(NEW.total_consumed_gpu_minutes, 0) - 0) * 60000, 0) - NEW.consumed_gpu_ms ELSE 0 END,
        'minutes written directly');
    UPDATE accounts SET
        consumed_cpu_s = consumed_cpu_s
            + (SELECT cpu_s FROM consumption_adjustments WHERE id = last_insert_rowid()),
        consumed_gpu_ms = consumed_gpu_ms
            + (SELECT gpu_ms FROM consumption_adjustments WHERE id = last_insert_rowid())
    WHERE account = NEW.account;
END;

PRAGMA user_version = 5;
COMMIT;
