-- 0006 (MariaDB): allocation periods, as migrations/0006_allocation_periods.sql (see it for
-- what each table holds and why the plugin reads nothing new). MariaDB differences: names are
-- VARCHAR(255) (keys), AUTO_INCREMENT ids, DOUBLE for REAL, DATETIME (UTC) for closed_at.

CREATE TABLE IF NOT EXISTS period_rules (
    owner_kind VARCHAR(16) NOT NULL,
    owner VARCHAR(255) NOT NULL,
    spec VARCHAR(255) NOT NULL,
    carry_over_percent BIGINT NOT NULL DEFAULT 0,
    time_zone VARCHAR(255),
    PRIMARY KEY (owner_kind, owner)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_nopad_bin;

CREATE TABLE IF NOT EXISTS period_state (
    owner_kind VARCHAR(16) NOT NULL,
    owner VARCHAR(255) NOT NULL,
    spec VARCHAR(255) NOT NULL,
    period_start BIGINT NOT NULL,
    period_end BIGINT,
    window_aged_until BIGINT,
    carry_in_cpu_s BIGINT NOT NULL DEFAULT 0,
    carry_in_gpu_ms BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (owner_kind, owner)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_nopad_bin;

CREATE TABLE IF NOT EXISTS period_archive (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    owner_kind VARCHAR(16) NOT NULL,
    owner VARCHAR(255) NOT NULL,
    spec VARCHAR(255) NOT NULL,
    period_start BIGINT NOT NULL,
    period_end BIGINT NOT NULL,
    quota_cpu_minutes BIGINT NOT NULL,
    quota_gpu_minutes BIGINT NOT NULL,
    used_cpu_s BIGINT NOT NULL,
    used_gpu_ms BIGINT NOT NULL,
    carry_in_cpu_s BIGINT NOT NULL DEFAULT 0,
    carry_in_gpu_ms BIGINT NOT NULL DEFAULT 0,
    carry_out_cpu_s BIGINT NOT NULL DEFAULT 0,
    carry_out_gpu_ms BIGINT NOT NULL DEFAULT 0,
    late_cpu_s BIGINT NOT NULL DEFAULT 0,
    late_gpu_ms BIGINT NOT NULL DEFAULT 0,
    closed_at DATETIME DEFAULT CURRENT_TIMESTAMP,
    UNIQUE KEY period_archive_owner_start (owner_kind, owner, period_start)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_nopad_bin;
CREATE INDEX IF NOT EXISTS period_archive_start ON period_archive (period_start, period_end);

CREATE TABLE IF NOT EXISTS threshold_events (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    owner_kind VARCHAR(16) NOT NULL,
    owner VARCHAR(255) NOT NULL,
    period_start BIGINT NOT NULL,
    resource VARCHAR(16) NOT NULL,
    threshold_percent BIGINT NOT NULL,
    usage_percent DOUBLE NOT NULL,
    quota_minutes BIGINT NOT NULL,
    consumed_minutes BIGINT NOT NULL,
    reserved_minutes BIGINT NOT NULL,
    crossed_at BIGINT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    last_error TEXT,
    done_at BIGINT,
    UNIQUE KEY threshold_events_once (owner_kind, owner, period_start, resource,
                                      threshold_percent)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_nopad_bin;
CREATE INDEX IF NOT EXISTS threshold_events_pending ON threshold_events (done_at, id);

CREATE INDEX IF NOT EXISTS charges_username_end ON charges (username, end_time);
CREATE INDEX IF NOT EXISTS charges_account_end ON charges (account, end_time);

START TRANSACTION;
UPDATE schema_version SET version = 6 WHERE id = 1 AND version < 6;
COMMIT;
