-- 0005 (MariaDB): consumption kept exactly, to the CPU-second and the GPU-millisecond, as
-- migrations/0005_exact_consumption.sql (see it for the rules and the reasons). MariaDB
-- differences: the triggers that catch a write of the seed's minute columns are BEFORE
-- triggers that correct NEW's exact columns (a trigger may not update its own table), and
-- they run when a minute column changed (SQLite: AFTER UPDATE OF those columns); integer
-- division is DIV (truncates toward zero, as SQLite's / on integers).

ALTER TABLE users ADD COLUMN IF NOT EXISTS consumed_cpu_s BIGINT NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN IF NOT EXISTS consumed_gpu_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN IF NOT EXISTS consumed_cpu_s BIGINT NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN IF NOT EXISTS consumed_gpu_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE charges ADD COLUMN IF NOT EXISTS cpu_s BIGINT NOT NULL DEFAULT 0;
ALTER TABLE charges ADD COLUMN IF NOT EXISTS gpu_ms BIGINT NOT NULL DEFAULT 0;

CREATE TABLE IF NOT EXISTS consumption_adjustments (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP,
    owner_kind VARCHAR(16) NOT NULL,
    owner VARCHAR(255) NOT NULL,
    cpu_s BIGINT NOT NULL DEFAULT 0,
    gpu_ms BIGINT NOT NULL DEFAULT 0,
    reason TEXT NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_nopad_bin;
CREATE INDEX IF NOT EXISTS consumption_adjustments_owner
    ON consumption_adjustments (owner_kind, owner);

DELIMITER //
CREATE TRIGGER IF NOT EXISTS users_consumed_minutes_written
BEFORE UPDATE ON users FOR EACH ROW
BEGIN
    DECLARE cpu_adj BIGINT DEFAULT 0;
    DECLARE gpu_adj BIGINT DEFAULT 0;
    -- only a statement that changed the minutes (SQLite: AFTER UPDATE OF them)
    IF NOT (NEW.total_consumed_cpu_minutes <=> OLD.total_consumed_cpu_minutes)
       OR NOT (NEW.total_consumed_gpu_minutes <=> OLD.total_consumed_gpu_minutes) THEN
    IF NOT (COALESCE(NEW.total_consumed_cpu_minutes, 0) <=> (CASE WHEN NEW.consumed_cpu_s > 0 THEN (NEW.consumed_cpu_s + 59) DIV 60 ELSE NEW.consumed_cpu_s DIV 60 END))
       OR NOT (COALESCE(NEW.total_consumed_gpu_minutes, 0) <=> (CASE WHEN NEW.consumed_gpu_ms > 0 THEN (NEW.consumed_gpu_ms + 59999) DIV 60000 ELSE NEW.consumed_gpu_ms DIV 60000 END)) THEN
        IF NOT (COALESCE(NEW.total_consumed_cpu_minutes, 0) <=> (CASE WHEN NEW.consumed_cpu_s > 0 THEN (NEW.consumed_cpu_s + 59) DIV 60 ELSE NEW.consumed_cpu_s DIV 60 END)) THEN
            SET cpu_adj = GREATEST(NEW.consumed_cpu_s + (COALESCE(NEW.total_consumed_cpu_minutes, 0) - COALESCE(OLD.total_consumed_cpu_minutes, 0)) * 60, 0) - NEW.consumed_cpu_s;
        END IF;
        IF NOT (COALESCE(NEW.total_consumed_gpu_minutes, 0) <=> (CASE WHEN NEW.consumed_gpu_ms > 0 THEN (NEW.consumed_gpu_ms + 59999) DIV 60000 ELSE NEW.consumed_gpu_ms DIV 60000 END)) THEN
            SET gpu_adj = GREATEST(NEW.consumed_gpu_ms + (COALESCE(NEW.total_consumed_gpu_minutes, 0) - COALESCE(OLD.total_consumed_gpu_minutes, 0)) * 60000, 0) - NEW.consumed_gpu_ms;
        END IF;
        INSERT INTO consumption_adjustments (owner_kind, owner, cpu_s, gpu_ms, reason)
        VALUES ('user', NEW.username, cpu_adj, gpu_adj, 'minutes written directly');
        SET NEW.consumed_cpu_s = NEW.consumed_cpu_s + cpu_adj,
            NEW.consumed_gpu_ms = NEW.consumed_gpu_ms + gpu_adj;
    END IF;
    END IF;
END//

CREATE TRIGGER IF NOT EXISTS users_consumed_minutes_inserted
BEFORE INSERT ON users FOR EACH ROW
BEGIN
    DECLARE cpu_adj BIGINT DEFAULT 0;
    DECLARE gpu_adj BIGINT DEFAULT 0;
    IF NOT (COALESCE(NEW.total_consumed_cpu_minutes, 0) <=> (CASE WHEN NEW.consumed_cpu_s > 0 THEN (NEW.consumed_cpu_s + 59) DIV 60 ELSE NEW.consumed_cpu_s DIV 60 END))
       OR NOT (COALESCE(NEW.total_consumed_gpu_minutes, 0) <=> (CASE WHEN NEW.consumed_gpu_ms > 0 THEN (NEW.consumed_gpu_ms + 59999) DIV 60000 ELSE NEW.consumed_gpu_ms DIV 60000 END)) THEN
        IF NOT (COALESCE(NEW.total_consumed_cpu_minutes, 0) <=> (CASE WHEN NEW.consumed_cpu_s > 0 THEN (NEW.consumed_cpu_s + 59) DIV 60 ELSE NEW.consumed_cpu_s DIV 60 END)) THEN
            SET cpu_adj = GREATEST(0 + (COALESCE(NEW.total_consumed_cpu_minutes, 0) - 0) * 60, 0) - NEW.consumed_cpu_s;
        END IF;
        IF NOT (COALESCE(NEW.total_consumed_gpu_minutes, 0) <=> (CASE WHEN NEW.consumed_gpu_ms > 0 THEN (NEW.consumed_gpu_ms + 59999) DIV 60000 ELSE NEW.consumed_gpu_ms DIV 60000 END)) THEN
            SET gpu_adj = GREATEST(0 + (COALESCE(NEW.total_consumed_gpu_minutes, 0) - 0) * 60000, 0) - NEW.consumed_gpu_ms;
        END IF;
        INSERT INTO consumption_adjustments (owner_kind, owner, cpu_s, gpu_ms, reason)
        VALUES ('user', NEW.username, cpu_adj, gpu_adj, 'minutes written directly');
        SET NEW.consumed_cpu_s = NEW.consumed_cpu_s + cpu_adj,
            NEW.consumed_gpu_ms = NEW.consumed_gpu_ms + gpu_adj;
    END IF;
END//

CREATE TRIGGER IF NOT EXISTS accounts_consumed_minutes_written
BEFORE UPDATE ON accounts FOR EACH ROW
BEGIN
    DECLARE cpu_adj BIGINT DEFAULT 0;
    DECLARE gpu_adj BIGINT DEFAULT 0;
    -- only a statement that changed the minutes (SQLite: AFTER UPDATE OF them)
    IF NOT (NEW.total_consumed_cpu_minutes <=> OLD.total_consumed_cpu_minutes)
       OR NOT (NEW.total_consumed_gpu_minutes <=> OLD.total_consumed_gpu_minutes) THEN
    IF NOT (COALESCE(NEW.total_consumed_cpu_minutes, 0) <=> (CASE WHEN NEW.consumed_cpu_s > 0 THEN (NEW.consumed_cpu_s + 59) DIV 60 ELSE NEW.consumed_cpu_s DIV 60 END))
       OR NOT (COALESCE(NEW.total_consumed_gpu_minutes, 0) <=> (CASE WHEN NEW.consumed_gpu_ms > 0 THEN (NEW.consumed_gpu_ms + 59999) DIV 60000 ELSE NEW.consumed_gpu_ms DIV 60000 END)) THEN
        IF NOT (COALESCE(NEW.total_consumed_cpu_minutes, 0) <=> (CASE WHEN NEW.consumed_cpu_s > 0 THEN (NEW.consumed_cpu_s + 59) DIV 60 ELSE NEW.consumed_cpu_s DIV 60 END)) THEN
            SET cpu_adj = GREATEST(NEW.consumed_cpu_s + (COALESCE(NEW.total_consumed_cpu_minutes, 0) - COALESCE(OLD.total_consumed_cpu_minutes, 0)) * 60, 0) - NEW.consumed_cpu_s;
        END IF;
        IF NOT (COALESCE(NEW.total_consumed_gpu_minutes, 0) <=> (CASE WHEN NEW.consumed_gpu_ms > 0 THEN (NEW.consumed_gpu_ms + 59999) DIV 60000 ELSE NEW.consumed_gpu_ms DIV 60000 END)) THEN
            SET gpu_adj = GREATEST(NEW.consumed_gpu_ms + (COALESCE(NEW.total_consumed_gpu_minutes, 0) - COALESCE(OLD.total_consumed_gpu_minutes, 0)) * 60000, 0) - NEW.consumed_gpu_ms;
        END IF;
        INSERT INTO consumption_adjustments (owner_kind, owner, cpu_s, gpu_ms, reason)
        VALUES ('account', NEW.account, cpu_adj, gpu_adj, 'minutes written directly');
        SET NEW.consumed_cpu_s = NEW.consumed_cpu_s + cpu_adj,
            NEW.consumed_gpu_ms = NEW.consumed_gpu_ms + gpu_adj;
    END IF;
    END IF;
END//

CREATE TRIGGER IF NOT EXISTS accounts_consumed_minutes_inserted
BEFORE INSERT ON accounts FOR EACH ROW
BEGIN
    DECLARE cpu_adj BIGINT DEFAULT 0;
    DECLARE gpu_adj BIGINT DEFAULT 0;
    IF NOT (COALESCE(NEW.total_consumed_cpu_minutes, 0) <=> (CASE WHEN NEW.consumed_cpu_s > 0 THEN (NEW.consumed_cpu_s + 59) DIV 60 ELSE NEW.consumed_cpu_s DIV 60 END))
       OR NOT (COALESCE(NEW.total_consumed_gpu_minutes, 0) <=> (CASE WHEN NEW.consumed_gpu_ms > 0 THEN (NEW.consumed_gpu_ms + 59999) DIV 60000 ELSE NEW.consumed_gpu_ms DIV 60000 END)) THEN
        IF NOT (COALESCE(NEW.total_consumed_cpu_minutes, 0) <=> (CASE WHEN NEW.consumed_cpu_s > 0 THEN (NEW.consumed_cpu_s + 59) DIV 60 ELSE NEW.consumed_cpu_s DIV 60 END)) THEN
            SET cpu_adj = GREATEST(0 + (COALESCE(NEW.total_consumed_cpu_minutes, 0) - 0) * 60, 0) - NEW.consumed_cpu_s;
        END IF;
        IF NOT (COALESCE(NEW.total_consumed_gpu_minutes, 0) <=> (CASE WHEN NEW.consumed_gpu_ms > 0 THEN (NEW.consumed_gpu_ms + 59999) DIV 60000 ELSE NEW.consumed_gpu_ms DIV 60000 END)) THEN
            SET gpu_adj = GREATEST(0 + (COALESCE(NEW.total_consumed_gpu_minutes, 0) - 0) * 60000, 0) - NEW.consumed_gpu_ms;
        END IF;
        INSERT INTO consumption_adjustments (owner_kind, owner, cpu_s, gpu_ms, reason)
        VALUES ('account', NEW.account, cpu_adj, gpu_adj, 'minutes written directly');
        SET NEW.consumed_cpu_s = NEW.consumed_cpu_s + cpu_adj,
            NEW.consumed_gpu_ms = NEW.consumed_gpu_ms + gpu_adj;
    END IF;
END//

DELIMITER ;

-- Existing totals and charges become exact, with their opening balances and the version
-- stamp, in one transaction. (These UPDATEs leave the minute columns alone: the triggers
-- above do nothing for them.) Re-run after a stop half-way, the DDL above is skipped and this
-- transaction runs whole, once.
START TRANSACTION;
UPDATE charges SET cpu_s = COALESCE(cpu_minutes, 0) * 60,
    gpu_ms = COALESCE(gpu_minutes, 0) * 60000;
UPDATE users SET consumed_cpu_s = COALESCE(total_consumed_cpu_minutes, 0) * 60,
    consumed_gpu_ms = COALESCE(total_consumed_gpu_minutes, 0) * 60000;
UPDATE accounts SET consumed_cpu_s = COALESCE(total_consumed_cpu_minutes, 0) * 60,
    consumed_gpu_ms = COALESCE(total_consumed_gpu_minutes, 0) * 60000;
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
UPDATE schema_version SET version = 5 WHERE id = 1 AND version < 5;
COMMIT;
