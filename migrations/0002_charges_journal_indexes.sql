-- 0002: what this project adds: per-run charges (idempotency + per-job history),
-- the append-only journal of admin changes, and the indexes of the hot paths.
BEGIN IMMEDIATE;

-- One row per charged run of a job. charge_key identifies one run: the raw job id and the
-- run's start time (a requeued job runs again and is charged again). Charging an existing
-- key is a no-op, which is what makes `charge` idempotent.
CREATE TABLE IF NOT EXISTS charges (
    id INTEGER PRIMARY KEY,
    charge_key TEXT NOT NULL UNIQUE,
    job_id INTEGER NOT NULL,
    array_job_id INTEGER,
    array_task_id INTEGER,
    het_job_id INTEGER,
    het_job_offset INTEGER,
    username TEXT NOT NULL,
    account TEXT NOT NULL,
    job_uuid TEXT,
    partition TEXT,
    job_state TEXT,
    start_time INTEGER NOT NULL,
    end_time INTEGER NOT NULL,
    elapsed_s INTEGER NOT NULL,
    cpus INTEGER NOT NULL,
    -- GPU counts by type and the factors applied, as "h100=2,a100=1" / "h100=0.5,a100=1.0";
    -- an untyped allocation is recorded under the type name "default".
    gpus TEXT NOT NULL DEFAULT '',
    gpu_factors TEXT NOT NULL DEFAULT '',
    cpu_minutes INTEGER NOT NULL,
    gpu_minutes INTEGER NOT NULL,
    released_prealloc INTEGER NOT NULL DEFAULT 0,
    source TEXT NOT NULL,
    charged_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX IF NOT EXISTS charges_username ON charges(username, id);
CREATE INDEX IF NOT EXISTS charges_account ON charges(account, id);
CREATE INDEX IF NOT EXISTS charges_job_id ON charges(job_id);
CREATE INDEX IF NOT EXISTS charges_end_time ON charges(end_time);

-- Append-only audit trail: every quota, adjustment, default, factor change and prune.
CREATE TABLE IF NOT EXISTS journal (
    id INTEGER PRIMARY KEY,
    at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target_kind TEXT NOT NULL,
    target TEXT NOT NULL,
    field TEXT,
    old_value TEXT,
    new_value TEXT,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS journal_target ON journal(target_kind, target, id);

-- The plugin sums open preallocations per user and per account on every submit:
-- covering indexes keep that a range scan over the index alone.
CREATE INDEX IF NOT EXISTS jobs_preallocations_username
    ON jobs_preallocations(username, preallocated_cpu_minutes, preallocated_gpu_minutes, array_size);
CREATE INDEX IF NOT EXISTS jobs_preallocations_account
    ON jobs_preallocations(account, preallocated_cpu_minutes, preallocated_gpu_minutes, array_size);
CREATE INDEX IF NOT EXISTS jobs_preallocations_created_at
    ON jobs_preallocations(created_at);

PRAGMA user_version = 2;
COMMIT;
