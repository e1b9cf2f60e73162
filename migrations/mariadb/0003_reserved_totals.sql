-- 0003 (MariaDB): per-owner running totals of the open reservations, kept by triggers on
-- jobs_preallocations, as migrations/0003_reserved_totals.sql (see it for the reasons and the
-- definition). MariaDB differences: a trigger may not update the table whose statement fired
-- it, so the owner rows' own triggers (a new or renamed owner starts from its real totals) are
-- BEFORE triggers that set NEW's columns; `UPDATE OF col` does not exist, so the update
-- trigger tests which columns changed; SUM() of integers is exact (DECIMAL) where SQLite
-- needed TOTAL().

ALTER TABLE users ADD COLUMN IF NOT EXISTS reserved_cpu_minutes BIGINT NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN IF NOT EXISTS reserved_gpu_minutes BIGINT NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN IF NOT EXISTS reserved_jobs BIGINT NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN IF NOT EXISTS reserved_cpu_minutes BIGINT NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN IF NOT EXISTS reserved_gpu_minutes BIGINT NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN IF NOT EXISTS reserved_jobs BIGINT NOT NULL DEFAULT 0;

DELIMITER //

-- A new preallocation adds to its user's and its account's totals.
CREATE TRIGGER IF NOT EXISTS jobs_preallocations_reserved_insert
AFTER INSERT ON jobs_preallocations FOR EACH ROW
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
END//

-- A deleted preallocation (charged, cancelled, pruned) gives its reservation back.
CREATE TRIGGER IF NOT EXISTS jobs_preallocations_reserved_delete
AFTER DELETE ON jobs_preallocations FOR EACH ROW
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
END//

-- A changed preallocation: the old values leave the old owners, the new values go to the new
-- owners (the same rows when the owner did not change).
CREATE TRIGGER IF NOT EXISTS jobs_preallocations_reserved_update
AFTER UPDATE ON jobs_preallocations FOR EACH ROW
BEGIN
    IF NOT (NEW.username <=> OLD.username) OR NOT (NEW.account <=> OLD.account) OR NOT (NEW.preallocated_cpu_minutes <=> OLD.preallocated_cpu_minutes) OR NOT (NEW.preallocated_gpu_minutes <=> OLD.preallocated_gpu_minutes) OR NOT (NEW.array_size <=> OLD.array_size) THEN
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
    END IF;
END//

-- An owner row that appears (or is renamed) while preallocations already name it starts from
-- its real totals instead of 0.
CREATE TRIGGER IF NOT EXISTS users_reserved_init
BEFORE INSERT ON users FOR EACH ROW
BEGIN
    DECLARE cpu BIGINT;
    DECLARE gpu BIGINT;
    DECLARE jobs BIGINT;
    BEGIN
        SELECT COALESCE(SUM(p.preallocated_cpu_minutes * COALESCE(p.array_size, 1)), 0),
               COALESCE(SUM(COALESCE(p.preallocated_gpu_minutes, 0) * COALESCE(p.array_size, 1)), 0),
               COALESCE(SUM(COALESCE(p.array_size, 1)), 0)
        INTO cpu, gpu, jobs
        FROM jobs_preallocations AS p WHERE p.username = NEW.username;
        SET NEW.reserved_cpu_minutes = cpu, NEW.reserved_gpu_minutes = gpu,
            NEW.reserved_jobs = jobs;
    END;
END//

CREATE TRIGGER IF NOT EXISTS users_reserved_rename
BEFORE UPDATE ON users FOR EACH ROW
BEGIN
    DECLARE cpu BIGINT;
    DECLARE gpu BIGINT;
    DECLARE jobs BIGINT;
    IF NOT (NEW.username <=> OLD.username) THEN
        SELECT COALESCE(SUM(p.preallocated_cpu_minutes * COALESCE(p.array_size, 1)), 0),
               COALESCE(SUM(COALESCE(p.preallocated_gpu_minutes, 0) * COALESCE(p.array_size, 1)), 0),
               COALESCE(SUM(COALESCE(p.array_size, 1)), 0)
        INTO cpu, gpu, jobs
        FROM jobs_preallocations AS p WHERE p.username = NEW.username;
        SET NEW.reserved_cpu_minutes = cpu, NEW.reserved_gpu_minutes = gpu,
            NEW.reserved_jobs = jobs;
    END IF;
END//

CREATE TRIGGER IF NOT EXISTS accounts_reserved_init
BEFORE INSERT ON accounts FOR EACH ROW
BEGIN
    DECLARE cpu BIGINT;
    DECLARE gpu BIGINT;
    DECLARE jobs BIGINT;
    BEGIN
        SELECT COALESCE(SUM(p.preallocated_cpu_minutes * COALESCE(p.array_size, 1)), 0),
               COALESCE(SUM(COALESCE(p.preallocated_gpu_minutes, 0) * COALESCE(p.array_size, 1)), 0),
               COALESCE(SUM(COALESCE(p.array_size, 1)), 0)
        INTO cpu, gpu, jobs
        FROM jobs_preallocations AS p WHERE p.account = NEW.account;
        SET NEW.reserved_cpu_minutes = cpu, NEW.reserved_gpu_minutes = gpu,
            NEW.reserved_jobs = jobs;
    END;
END//

CREATE TRIGGER IF NOT EXISTS accounts_reserved_rename
BEFORE UPDATE ON accounts FOR EACH ROW
BEGIN
    DECLARE cpu BIGINT;
    DECLARE gpu BIGINT;
    DECLARE jobs BIGINT;
    IF NOT (NEW.account <=> OLD.account) THEN
        SELECT COALESCE(SUM(p.preallocated_cpu_minutes * COALESCE(p.array_size, 1)), 0),
               COALESCE(SUM(COALESCE(p.preallocated_gpu_minutes, 0) * COALESCE(p.array_size, 1)), 0),
               COALESCE(SUM(COALESCE(p.array_size, 1)), 0)
        INTO cpu, gpu, jobs
        FROM jobs_preallocations AS p WHERE p.account = NEW.account;
        SET NEW.reserved_cpu_minutes = cpu, NEW.reserved_gpu_minutes = gpu,
            NEW.reserved_jobs = jobs;
    END IF;
END//

DELIMITER ;

-- Initialise from the rows already there (after the triggers exist, so nothing written in
-- between is missed), with the version stamp in one transaction.
START TRANSACTION;
UPDATE users AS t LEFT JOIN (
    SELECT p.username AS name,
           SUM(p.preallocated_cpu_minutes * COALESCE(p.array_size, 1)) AS cpu,
           SUM(COALESCE(p.preallocated_gpu_minutes, 0) * COALESCE(p.array_size, 1)) AS gpu,
           SUM(COALESCE(p.array_size, 1)) AS jobs
    FROM jobs_preallocations AS p GROUP BY p.username
) AS s ON s.name = t.username
SET t.reserved_cpu_minutes = COALESCE(s.cpu, 0), t.reserved_gpu_minutes = COALESCE(s.gpu, 0),
    t.reserved_jobs = COALESCE(s.jobs, 0);
UPDATE accounts AS t LEFT JOIN (
    SELECT p.account AS name,
           SUM(p.preallocated_cpu_minutes * COALESCE(p.array_size, 1)) AS cpu,
           SUM(COALESCE(p.preallocated_gpu_minutes, 0) * COALESCE(p.array_size, 1)) AS gpu,
           SUM(COALESCE(p.array_size, 1)) AS jobs
    FROM jobs_preallocations AS p GROUP BY p.account
) AS s ON s.name = t.account
SET t.reserved_cpu_minutes = COALESCE(s.cpu, 0), t.reserved_gpu_minutes = COALESCE(s.gpu, 0),
    t.reserved_jobs = COALESCE(s.jobs, 0);
UPDATE schema_version SET version = 3 WHERE id = 1 AND version < 3;
COMMIT;
