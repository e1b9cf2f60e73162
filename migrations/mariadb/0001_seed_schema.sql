-- 0001 (MariaDB): the seed system's tables, as migrations/0001_seed_schema.sql creates them
-- in SQLite: same tables, columns, defaults and keys.
--
-- How the MariaDB migrations differ from the SQLite ones (docs/design.md, "The ledger on
-- MariaDB"):
-- - the schema version is the one row of `schema_version` (SQLite: PRAGMA user_version), so
--   the plugin reads it with `SELECT version FROM schema_version`; each file ends by stamping
--   it, in the same transaction as the file's data changes;
-- - DDL commits implicitly in MariaDB, so every DDL statement is written to be re-run
--   (IF [NOT] EXISTS): a migration stopped half-way is finished by running migrate again;
-- - text is utf8mb4 with the binary NO PAD collation: names compare byte for byte, as in
--   SQLite ('Alice' <> 'alice', 'a' <> 'a ');
-- - times are DATETIME in UTC: every connection of ours sets time_zone = '+00:00', so
--   CURRENT_TIMESTAMP is what SQLite's is.
-- Statements end with `;` at the end of a line, or with the DELIMITER in force (as the
-- mariadb client reads them), so a file also runs with `mariadb DB < file`.

CREATE TABLE IF NOT EXISTS schema_version (
    id TINYINT NOT NULL PRIMARY KEY CHECK (id = 1),
    version INT NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_nopad_bin;
INSERT IGNORE INTO schema_version (id, version) VALUES (1, 0);

CREATE TABLE IF NOT EXISTS users (
    username VARCHAR(255) NOT NULL PRIMARY KEY,
    total_consumed_cpu_minutes BIGINT DEFAULT 0,
    quota_cpu_minutes BIGINT DEFAULT -1,
    total_consumed_gpu_minutes BIGINT DEFAULT 0,
    quota_gpu_minutes BIGINT DEFAULT -1,
    last_updated DATETIME DEFAULT CURRENT_TIMESTAMP
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_nopad_bin;

CREATE TABLE IF NOT EXISTS accounts (
    account VARCHAR(255) NOT NULL PRIMARY KEY,
    total_consumed_cpu_minutes BIGINT DEFAULT 0,
    quota_cpu_minutes BIGINT DEFAULT -1,
    total_consumed_gpu_minutes BIGINT DEFAULT 0,
    quota_gpu_minutes BIGINT DEFAULT -1,
    last_updated DATETIME DEFAULT CURRENT_TIMESTAMP
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_nopad_bin;

CREATE TABLE IF NOT EXISTS jobs_preallocations (
    job_uuid VARCHAR(255) NOT NULL PRIMARY KEY,
    username VARCHAR(255) NOT NULL,
    account VARCHAR(255) NOT NULL,
    preallocated_cpu_minutes BIGINT NOT NULL,
    preallocated_gpu_minutes BIGINT DEFAULT 0,
    array_size BIGINT DEFAULT 1,
    created_at DATETIME DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT jobs_preallocations_user_fk FOREIGN KEY (username) REFERENCES users (username),
    CONSTRAINT jobs_preallocations_account_fk FOREIGN KEY (account) REFERENCES accounts (account)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_nopad_bin;

CREATE TABLE IF NOT EXISTS gpu_factors (
    gpu_type VARCHAR(255) NOT NULL PRIMARY KEY,
    factor DOUBLE NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_nopad_bin;

CREATE TABLE IF NOT EXISTS settings (
    `key` VARCHAR(255) NOT NULL PRIMARY KEY,
    value TEXT NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_nopad_bin;

UPDATE schema_version SET version = 1 WHERE id = 1 AND version < 1;
