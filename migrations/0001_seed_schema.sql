-- 0001: the seed system's tables, exactly as it creates them, so that an existing seed
-- database (user_version 0, tables present, rows present) is adopted in place unchanged.
BEGIN IMMEDIATE;

CREATE TABLE IF NOT EXISTS users (
    username TEXT PRIMARY KEY,
    total_consumed_cpu_minutes INTEGER DEFAULT 0,
    quota_cpu_minutes INTEGER DEFAULT -1,
    total_consumed_gpu_minutes INTEGER DEFAULT 0,
    quota_gpu_minutes INTEGER DEFAULT -1,
    last_updated TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE IF NOT EXISTS accounts (
    account TEXT PRIMARY KEY,
    total_consumed_cpu_minutes INTEGER DEFAULT 0,
    quota_cpu_minutes INTEGER DEFAULT -1,
    total_consumed_gpu_minutes INTEGER DEFAULT 0,
    quota_gpu_minutes INTEGER DEFAULT -1,
    last_updated TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE IF NOT EXISTS jobs_preallocations (
    job_uuid TEXT PRIMARY KEY,
    username TEXT NOT NULL REFERENCES users(username),
    account TEXT NOT NULL REFERENCES accounts(account),
    preallocated_cpu_minutes INTEGER NOT NULL,
    preallocated_gpu_minutes INTEGER DEFAULT 0,
    array_size INTEGER DEFAULT 1,
    created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE IF NOT EXISTS gpu_factors (
    gpu_type TEXT PRIMARY KEY,
    factor REAL NOT NULL
);

CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

PRAGMA user_version = 1;
COMMIT;
