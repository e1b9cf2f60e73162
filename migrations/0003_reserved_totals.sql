-- 0003: per-owner running totals of the open reservations, so that the plugin reads quota,
-- consumed and reserved from ONE row per owner instead of summing that owner's
-- preallocations on every submission (a cost that grew with the number of open jobs).
--
-- reserved_cpu_minutes = Σ preallocated_cpu_minutes × array_size
-- reserved_gpu_minutes = Σ preallocated_gpu_minutes × array_size
-- reserved_jobs        = Σ array_size
-- over the owner's rows in jobs_preallocations, a NULL array_size (seed rows) counting as one
-- element and a NULL GPU amount as 0, as everywhere else (db.py's stats, the charge).
--
-- Triggers keep them exact for every writer (plugin, charge, reconcile, prune, admin
-- commands, a leftover seed tool) without the writers knowing about them. Limits: an
-- `INSERT OR REPLACE` that replaces an existing preallocation runs no delete trigger unless
-- PRAGMA recursive_triggers is on (no writer of ours does that), and a total beyond 2^53
-- minutes turns into an inexact REAL. Recomputing them is the initialisation UPDATE below.
BEGIN IMMEDIATE;

ALTER TABLE users ADD COLUMN reserved_cpu_minutes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN reserved_gpu_minutes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN reserved_jobs INTEGER NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN reserved_cpu_minutes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN reserved_gpu_minutes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN reserved_jobs INTEGER NOT NULL DEFAULT 0;

-- Initialise from the rows already there (a seed database being upgraded has open jobs).
-- TOTAL() (a float sum) never fails with "integer overflow" the way SUM() can; the column's
-- INTEGER affinity stores every integral value below 2^53 as an exact integer.
UPDATE users SET (reserved_cpu_minutes, reserved_gpu_minutes, reserved_jobs) = (
    SELECT TOTAL(p.preallocated_cpu_minutes * COALESCE(p.array_size, 1)),
           TOTAL(COALESCE(p.preallocated_gpu_minutes, 0) * COALESCE(p.array_size, 1)),
           TOTAL(COALESCE(p.array_size, 1))
    FROM jobs_preallocations AS p WHERE p.username = users.username
);
UPDATE accounts SET (reserved_cpu_minutes, reserved_gpu_minutes, reserved_jobs) = (
    SELECT TOTAL(p.preallocated_cpu_minutes * COALESCE(p.array_size, 1)),
           TOTAL(COALESCE(p.preallocated_gpu_minutes, 0) * COALESCE(p.array_size, 1)),
           TOTAL(COALESCE(p.array_size, 1))
    FROM jobs_preallocations AS p WHERE p.account = accounts.account
);

-- A new preallocation adds to its user's and its account's totals.
CREATE TRIGGER IF NOT EXISTS jobs_preallocations_reserved_insert
AFTER INSERT ON jobs_preallocations
BEGIN
    UPDATE users SET
        reserved_cpu_minutes = reserved_cpu_minutes
            + NEW.preallocated_cpu_minutes * COALESCE(NEW.array_size, 1),
        reserved_gpu_minutes = reserved_gpu_minutes
            + COALESCE(NEW.preallocated_gpu_minutes, 0) * COALESCE(NEW.array_size, 1),
        reserved_jobs = reserved_jobs + COALESCE(NEW.array_size, 1)
    WHERE username = NEW.username;
    UPDATE accounts SET
        reserved_cpu_minutes = reserved_cpu_minutes
            + NEW.preallocated_cpu_minutes * COALESCE(NEW.array_size, 1),
        reserved_gpu_minutes = reserved_gpu_minutes
            + COALESCE(NEW.preallocated_gpu_minutes, 0) * COALESCE(NEW.array_size, 1),
        reserved_jobs = reserved_jobs + COALESCE(NEW.array_size, 1)
    WHERE account = NEW.account;
END;

-- A deleted preallocation (charged, cancelled, pruned) gives its reservation back.
CREATE TRIGGER IF NOT EXISTS jobs_preallocations_reserved_delete
AFTER DELETE ON jobs_preallocations
BEGIN
    UPDATE users SET
        reserved_cpu_minutes = reserved_cpu_minutes
            - OLD.preallocated_cpu_minutes * COALESCE(OLD.array_size, 1),
        reserved_gpu_minutes = reserved_gpu_minutes
            - COALESCE(OLD.preallocated_gpu_minutes, 0) * COALESCE(OLD.array_size, 1),
        reserved_jobs = reserved_jobs - COALESCE(OLD.array_size, 1)
    WHERE username = OLD.username;
    UPDATE accounts SET
        reserved_cpu_minutes = reserved_cpu_minutes
            - OLD.preallocated_cpu_minutes * COALESCE(OLD.array_size, 1),
        reserved_gpu_minutes = reserved_gpu_minutes
            - COALESCE(OLD.preallocated_gpu_minutes, 0) * COALESCE(OLD.array_size, 1),
        reserved_jobs = reserved_jobs - COALESCE(OLD.array_size, 1)
    WHERE account = OLD.account;
END;

-- A changed preallocation (job_modify, one array element charged, moved to another user or
-- account): the old values leave the old owners, the new values go to the new owners (the
-- same rows when the owner did not change).
CREATE TRIGGER IF NOT EXISTS jobs_preallocations_reserved_update
AFTER UPDATE OF username, account, preallocated_cpu_minutes, preallocated_gpu_minutes,
    array_size ON jobs_preallocations
BEGIN
    UPDATE users SET
        reserved_cpu_minutes = reserved_cpu_minutes
            - OLD.preallocated_cpu_minutes * COALESCE(OLD.array_size, 1),
        reserved_gpu_minutes = reserved_gpu_minutes
            - COALESCE(OLD.preallocated_gpu_minutes, 0) * COALESCE(OLD.array_size, 1),
        reserved_jobs = reserved_jobs - COALESCE(OLD.array_size, 1)
    WHERE username = OLD.username;
    UPDATE users SET
        reserved_cpu_minutes = reserved_cpu_minutes
            + NEW.preallocated_cpu_minutes * COALESCE(NEW.array_size, 1),
        reserved_gpu_minutes = reserved_gpu_minutes
            + COALESCE(NEW.preallocated_gpu_minutes, 0) * COALESCE(NEW.array_size, 1),
        reserved_jobs = reserved_jobs + COALESCE(NEW.array_size, 1)
    WHERE username = NEW.username;
    UPDATE accounts SET
        reserved_cpu_minutes = reserved_cpu_minutes
            - OLD.preallocated_cpu_minutes * COALESCE(OLD.array_size, 1),
        reserved_gpu_minutes = reserved_gpu_minutes
            - COALESCE(OLD.preallocated_gpu_minutes, 0) * COALESCE(OLD.array_size, 1),
        reserved_jobs = reserved_jobs - COALESCE(OLD.array_size, 1)
    WHERE account = OLD.account;
    UPDATE accounts SET
        reserved_cpu_minutes = reserved_cpu_minutes
            + NEW.preallocated_cpu_minutes * COALESCE(NEW.array_size, 1),
        reserved_gpu_minutes = reserved_gpu_minutes
            + COALESCE(NEW.preallocated_gpu_minutes, 0) * COALESCE(NEW.array_size, 1),
        reserved_jobs = reserved_jobs + COALESCE(NEW.array_size, 1)
    WHERE account = NEW.account;
END;

-- An owner row that appears (or is renamed) while preallocations already name it, which only
-- a writer with foreign_keys off or an INSERT OR REPLACE of the owner row can bring about,
-- starts from its real totals instead of 0. Owner rows are inserted rarely (first job of a
-- user or account), so the indexed sum here stays off the per-submission path.
CREATE TRIGGER IF NOT EXISTS users_reserved_init
AFTER INSERT ON users
BEGIN
    UPDATE users SET (reserved_cpu_minutes, reserved_gpu_minutes, reserved_jobs) = (
        SELECT TOTAL(p.preallocated_cpu_minutes * COALESCE(p.array_size, 1)),
               TOTAL(COALESCE(p.preallocated_gpu_minutes, 0) * COALESCE(p.array_size, 1)),
               TOTAL(COALESCE(p.array_size, 1))
        FROM jobs_preallocations AS p WHERE p.username = NEW.username
    ) WHERE username = NEW.username;
END;
CREATE TRIGGER IF NOT EXISTS users_reserved_rename
AFTER UPDATE OF username ON users
BEGIN
    UPDATE users SET (reserved_cpu_minutes, reserved_gpu_minutes, reserved_jobs) = (
        SELECT TOTAL(p.preallocated_cpu_minutes * COALESCE(p.array_size, 1)),
               TOTAL(COALESCE(p.preallocated_gpu_minutes, 0) * COALESCE(p.array_size, 1)),
               TOTAL(COALESCE(p.array_size, 1))
        FROM jobs_preallocations AS p WHERE p.username = NEW.username
    ) WHERE username = NEW.username;
END;
CREATE TRIGGER IF NOT EXISTS accounts_reserved_init
AFTER INSERT ON accounts
BEGIN
    UPDATE accounts SET (reserved_cpu_minutes, reserved_gpu_minutes, reserved_jobs) = (
        SELECT TOTAL(p.preallocated_cpu_minutes * COALESCE(p.array_size, 1)),
               TOTAL(COALESCE(p.preallocated_gpu_minutes, 0) * COALESCE(p.array_size, 1)),
               TOTAL(COALESCE(p.array_size, 1))
        FROM jobs_preallocations AS p WHERE p.account = NEW.account
    ) WHERE account = NEW.account;
END;
CREATE TRIGGER IF NOT EXISTS accounts_reserved_rename
AFTER UPDATE OF account ON accounts
BEGIN
    UPDATE accounts SET (reserved_cpu_minutes, reserved_gpu_minutes, reserved_jobs) = (
        SELECT TOTAL(p.preallocated_cpu_minutes * COALESCE(p.array_size, 1)),
               TOTAL(COALESCE(p.preallocated_gpu_minutes, 0) * COALESCE(p.array_size, 1)),
               TOTAL(COALESCE(p.array_size, 1))
        FROM jobs_preallocations AS p WHERE p.account = NEW.account
    ) WHERE account = NEW.account;
END;

PRAGMA user_version = 3;
COMMIT;
