"""A database exactly as the seed system creates it (SEED-SYSTEM.md), holding rows.

Used to check that `slurm-quota migrate` adopts a seed database in place. The DDL is the
seed's documented schema (no indexes besides primary keys, user_version 0, WAL); it is
written here independently of migrations/0001 so that a drift between the two is caught.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

SEED_DDL = """
CREATE TABLE users (
    username TEXT PRIMARY KEY,
    total_consumed_cpu_minutes INTEGER DEFAULT 0,
    quota_cpu_minutes INTEGER DEFAULT -1,
    total_consumed_gpu_minutes INTEGER DEFAULT 0,
    quota_gpu_minutes INTEGER DEFAULT -1,
    last_updated TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE accounts (
    account TEXT PRIMARY KEY,
    total_consumed_cpu_minutes INTEGER DEFAULT 0,
    quota_cpu_minutes INTEGER DEFAULT -1,
    total_consumed_gpu_minutes INTEGER DEFAULT 0,
    quota_gpu_minutes INTEGER DEFAULT -1,
    last_updated TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE jobs_preallocations (
    job_uuid TEXT PRIMARY KEY,
    username TEXT NOT NULL REFERENCES users(username),
    account TEXT NOT NULL REFERENCES accounts(account),
    preallocated_cpu_minutes INTEGER NOT NULL,
    preallocated_gpu_minutes INTEGER DEFAULT 0,
    array_size INTEGER DEFAULT 1,
    created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE gpu_factors (
    gpu_type TEXT PRIMARY KEY,
    factor REAL NOT NULL
);
CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

# Rows per table, in primary-key order (the order tests read them back in).
SEED_ROWS: dict[str, list[tuple]] = {
    "users": [
        ("alice", 1200, 50000, 30, -1, "2025-11-02 08:00:00"),
        ("bob", 0, -1, 0, 600, "2025-11-03 09:30:00"),
        ("carol", 98765, 100000, 4321, 5000, "2025-11-04 10:15:00"),
    ],
    "accounts": [
        ("hpc", 5000, -1, 0, -1, "2025-11-02 08:00:00"),
        ("projx", 99965, 200000, 4351, 50000, "2025-11-04 10:15:00"),
    ],
    "jobs_preallocations": [
        (
            "2f1c6a4e-0c8b-4c53-9a63-1e5d2a7b9c01",
            "alice",
            "projx",
            120,
            0,
            1,
            "2025-11-05 11:00:00",
        ),
        (
            "7d9e0b12-5a44-4e1f-8b2c-3f6a8d0e4b22",
            "carol",
            "projx",
            600,
            60,
            4,
            "2025-11-05 11:05:00",
        ),
    ],
    "gpu_factors": [
        ("a100", 1.0),
        ("default", 1.0),
        ("h100", 0.5),
    ],
    "settings": [
        ("default_account_quota_cpu_minutes", "-1"),
        ("default_user_quota_cpu_minutes", "1000"),
        ("default_user_quota_gpu_minutes", "-1"),
    ],
}

PRIMARY_KEYS = {
    "users": "username",
    "accounts": "account",
    "jobs_preallocations": "job_uuid",
    "gpu_factors": "gpu_type",
    "settings": "key",
}


def make_seed_db(path: Path) -> Path:
    """Create a seed-system database at path, with SEED_ROWS, user_version 0, WAL."""
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA foreign_keys = ON")
        assert conn.execute("PRAGMA journal_mode = WAL").fetchone()[0] == "wal"
        conn.executescript(SEED_DDL)
        conn.execute("BEGIN")
        for table, rows in SEED_ROWS.items():
            marks = ", ".join("?" * len(rows[0]))
            conn.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)
        conn.execute("COMMIT")
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
    finally:
        conn.close()
    return path


def read_rows(path: Path, table: str) -> list[tuple]:
    """Every row of a seed table in primary-key order."""
    conn = sqlite3.connect(str(path))
    try:
        return [
            tuple(r) for r in conn.execute(f"SELECT * FROM {table} ORDER BY {PRIMARY_KEYS[table]}")
        ]
    finally:
        conn.close()
