-- 0002 (MariaDB): per-run charges, the journal and the hot paths' indexes, as
-- migrations/0002_charges_journal_indexes.sql (see that file for the reasons).

CREATE TABLE IF NOT EXISTS charges (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    charge_key VARCHAR(255) NOT NULL UNIQUE,
    job_id BIGINT NOT NULL,
    array_job_id BIGINT,
    array_task_id BIGINT,
    het_job_id BIGINT,
    het_job_offset BIGINT,
    username VARCHAR(255) NOT NULL,
    account VARCHAR(255) NOT NULL,
    job_uuid VARCHAR(255),
    `partition` VARCHAR(255),
    job_state VARCHAR(255),
    start_time BIGINT NOT NULL,
    end_time BIGINT NOT NULL,
    elapsed_s BIGINT NOT NULL,
    cpus BIGINT NOT NULL,
    gpus TEXT NOT NULL DEFAULT '',
    gpu_factors TEXT NOT NULL DEFAULT '',
    cpu_minutes BIGINT NOT NULL,
    gpu_minutes BIGINT NOT NULL,
    released_prealloc BIGINT NOT NULL DEFAULT 0,
    source VARCHAR(255) NOT NULL,
    charged_at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_nopad_bin;
CREATE INDEX IF NOT EXISTS charges_username ON charges (username, id);
CREATE INDEX IF NOT EXISTS charges_account ON charges (account, id);
CREATE INDEX IF NOT EXISTS charges_job_id ON charges (job_id);
CREATE INDEX IF NOT EXISTS charges_end_time ON charges (end_time);

CREATE TABLE IF NOT EXISTS journal (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP,
    actor VARCHAR(255) NOT NULL,
    action VARCHAR(255) NOT NULL,
    target_kind VARCHAR(255) NOT NULL,
    target VARCHAR(255) NOT NULL,
    field VARCHAR(255),
    old_value TEXT,
    new_value TEXT,
    reason TEXT
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_nopad_bin;
CREATE INDEX IF NOT EXISTS journal_target ON journal (target_kind, target, id);

CREATE INDEX IF NOT EXISTS jobs_preallocations_username
    ON jobs_preallocations (username, preallocated_cpu_minutes, preallocated_gpu_minutes,
                            array_size);
CREATE INDEX IF NOT EXISTS jobs_preallocations_account
    ON jobs_preallocations (account, preallocated_cpu_minutes, preallocated_gpu_minutes,
                            array_size);
CREATE INDEX IF NOT EXISTS jobs_preallocations_created_at ON jobs_preallocations (created_at);

UPDATE schema_version SET version = 2 WHERE id = 1 AND version < 2;
