"""users/accounts.reserved_* (migration 0003): running totals of the open preallocations.

Whatever writers do to jobs_preallocations (insert, update of any column including the owner,
array_size down to 0, delete; through db.py's own functions or plain SQL; inside a transaction
that is rolled back; with foreign keys off, owner rows replaced or renamed), every owner row
must hold exactly the GROUP BY sums. A seed database upgraded in place starts from the right
totals.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slurm_quota import db
from tests.unit.fixtures_seed import make_seed_db

# The reference: what the totals must equal (NULL array_size = one element, NULL GPU = 0).
_SUMS = """
SELECT {key},
       COALESCE(SUM(preallocated_cpu_minutes * COALESCE(array_size, 1)), 0),
       COALESCE(SUM(COALESCE(preallocated_gpu_minutes, 0) * COALESCE(array_size, 1)), 0),
       COALESCE(SUM(COALESCE(array_size, 1)), 0)
FROM jobs_preallocations GROUP BY {key}
"""
_OWNERS = (("users", "username"), ("accounts", "account"))


def reserved_totals(conn: sqlite3.Connection) -> dict[str, dict[str, tuple]]:
    """{table: {owner: (reserved cpu, reserved gpu, reserved jobs)}} as stored."""
    return {
        table: {
            r[0]: tuple(r[1:])
            for r in conn.execute(
                f"SELECT {key}, reserved_cpu_minutes, reserved_gpu_minutes, reserved_jobs "
                f"FROM {table}"
            )
        }
        for table, key in _OWNERS
    }


def expected_totals(conn: sqlite3.Connection) -> dict[str, dict[str, tuple]]:
    """The same, recomputed from jobs_preallocations, for every existing owner row."""
    out = {}
    for table, key in _OWNERS:
        sums = {r[0]: tuple(r[1:]) for r in conn.execute(_SUMS.format(key=key))}
        names = [r[0] for r in conn.execute(f"SELECT {key} FROM {table}")]
        out[table] = {n: sums.get(n, (0, 0, 0)) for n in names}
    return out


def reserved_mismatches(conn: sqlite3.Connection) -> list[str]:
    """Owners whose stored totals differ from the sums (empty = consistent)."""
    stored, expected = reserved_totals(conn), expected_totals(conn)
    return [
        f"{table} {name}: stored {stored[table][name]}, sums {expected[table][name]}"
        for table in expected
        for name in sorted(expected[table])
        if stored[table][name] != expected[table][name]
    ]


# ---------------------------------------------------------------------------- the property

USERS = ["alice", "bob", "carol"]
ACCOUNTS = ["research", "physics"]
UUIDS = [f"00000000-0000-4000-8000-{i:012d}" for i in range(6)]

cpu = st.integers(0, 10**9)
gpu = st.one_of(st.none(), st.integers(0, 10**6))
size = st.one_of(st.none(), st.integers(0, 12), st.just(4_000_000))
owner_fields = {"username": st.sampled_from(USERS), "account": st.sampled_from(ACCOUNTS)}
amount_fields = {
    "preallocated_cpu_minutes": cpu,
    "preallocated_gpu_minutes": gpu,
    "array_size": size,
}

ops = st.one_of(
    st.tuples(st.just("insert"), st.sampled_from(UUIDS), st.fixed_dictionaries(
        {**owner_fields, **amount_fields})),
    st.tuples(st.just("update"), st.sampled_from(UUIDS), st.fixed_dictionaries(
        {}, optional={**owner_fields, **amount_fields}).filter(bool)),
    st.tuples(st.just("delete"), st.sampled_from(UUIDS)),
    st.tuples(st.just("release"), st.sampled_from(UUIDS), st.booleans()),
    st.tuples(st.just("size_zero"), st.sampled_from(UUIDS)),
    st.tuples(st.just("orphan_insert"), st.sampled_from(UUIDS),
              st.sampled_from(USERS + ["dave"]), st.sampled_from(ACCOUNTS + ["chem"]), cpu),
    st.tuples(st.just("replace_owner"), st.sampled_from(list(_OWNERS)),
              st.sampled_from(USERS + ACCOUNTS + ["dave", "chem"])),
    st.tuples(st.just("drop_owner"), st.sampled_from(list(_OWNERS)),
              st.sampled_from(USERS + ACCOUNTS + ["dave", "chem"])),
    st.tuples(st.just("rename_owner"), st.sampled_from(list(_OWNERS)),
              st.sampled_from(USERS + ACCOUNTS + ["dave", "chem"]),
              st.sampled_from(USERS + ACCOUNTS + ["dave", "chem"])),
)
steps = st.lists(st.tuples(ops, st.booleans()), min_size=1, max_size=25)


FOREIGN_KEYS_OFF = {"orphan_insert", "rename_owner"}


def _ensure_owners(conn: sqlite3.Connection, fields: dict) -> None:
    for table, key in _OWNERS:
        if key in fields and conn.execute(
            f"SELECT 1 FROM {table} WHERE {key} = ?", (fields[key],)
        ).fetchone() is None:
            conn.execute(f"INSERT INTO {table} ({key}) VALUES (?)", (fields[key],))


def _apply(conn: sqlite3.Connection, op: tuple) -> None:
    """One writer's operation; a constraint failure leaves the ledger as it was."""
    kind = op[0]
    if kind == "insert":
        _, uuid, fields = op
        _ensure_owners(conn, fields)
        cols = ", ".join(["job_uuid", *fields])
        marks = ", ".join("?" for _ in range(len(fields) + 1))
        conn.execute(f"INSERT INTO jobs_preallocations ({cols}) VALUES ({marks})",
                     (uuid, *fields.values()))
    elif kind == "update":
        _, uuid, fields = op
        _ensure_owners(conn, fields)
        sets = ", ".join(f"{c} = ?" for c in fields)
        conn.execute(f"UPDATE jobs_preallocations SET {sets} WHERE job_uuid = ?",
                     (*fields.values(), uuid))
    elif kind == "delete":
        db.delete_preallocation(conn, op[1])
    elif kind == "release":  # what the charge does: one element, or all of them
        db.release_preallocation(conn, op[1], all_elements=op[2])
    elif kind == "size_zero":
        conn.execute("UPDATE jobs_preallocations SET array_size = 0 WHERE job_uuid = ?", (op[1],))
    elif kind == "orphan_insert":  # a writer with foreign keys off (e.g. the sqlite3 shell)
        _, uuid, user, account, minutes = op
        conn.execute("INSERT INTO jobs_preallocations (job_uuid, username, account, "
                     "preallocated_cpu_minutes) VALUES (?, ?, ?, ?)",
                     (uuid, user, account, minutes))
    elif kind == "replace_owner":  # INSERT OR REPLACE: the row comes back with defaults
        (table, key), name = op[1], op[2]
        verb = "REPLACE" if db.is_mariadb(conn) else "INSERT OR REPLACE"
        conn.execute(f"{verb} INTO {table} ({key}, quota_cpu_minutes) VALUES (?, 7)", (name,))
    elif kind == "drop_owner":  # refused by the foreign key while the owner has open jobs
        (table, key), name = op[1], op[2]
        conn.execute(f"DELETE FROM {table} WHERE {key} = ?", (name,))
    elif kind == "rename_owner":  # foreign keys off: the only way a referenced owner moves
        (table, key), old, new = op[1], op[2], op[3]
        conn.execute(f"UPDATE {table} SET {key} = ? WHERE {key} = ?", (new, old))
    else:  # pragma: no cover
        raise AssertionError(kind)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("template") / "ledger.db"
    db.migrate(path)
    return path


PROPERTY = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY
@given(steps=steps)
def test_totals_equal_the_sums_after_any_sequence_of_writes(template, tmp_path, steps):
    path = tmp_path / "ledger.db"
    shutil.copyfile(template, path)
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    conn = db.connect(path)
    try:
        for op, rolled_back in steps:
            before = reserved_totals(conn)
            # (the pragma is a no-op inside a transaction: set it before BEGIN)
            fk_off = op[0] in FOREIGN_KEYS_OFF
            conn.execute(f"PRAGMA foreign_keys = {'OFF' if fk_off else 'ON'}")
            conn.execute("BEGIN IMMEDIATE")
            try:
                _apply(conn, op)
            except sqlite3.IntegrityError:
                conn.execute("ROLLBACK")  # the statement failed: nothing may have changed
                assert reserved_totals(conn) == before, op
                continue
            if rolled_back:
                conn.execute("ROLLBACK")
                assert reserved_totals(conn) == before, op
            else:
                conn.execute("COMMIT")
            assert reserved_mismatches(conn) == [], (op, rolled_back)
    finally:
        conn.close()


@pytest.fixture(scope="module")
def mariadb_property_conn(mariadb_server):
    """One migrated MariaDB ledger for the property's examples (emptied before each)."""
    ledger = mariadb_server.new_database()
    db.migrate(ledger)
    conn = db.connect(ledger)
    yield conn
    conn.close()
    mariadb_server.drop_database(ledger)


@pytest.mark.mariadb
@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=steps)
def test_totals_equal_the_sums_after_any_sequence_of_writes_on_mariadb(
    mariadb_property_conn, steps
):
    import pymysql

    conn = mariadb_property_conn
    conn.execute("SET SESSION foreign_key_checks = 1")
    for table in ("jobs_preallocations", "users", "accounts", "consumption_adjustments"):
        conn.execute(f"DELETE FROM {table}")
    for op, rolled_back in steps:
        before = reserved_totals(conn)
        fk_off = op[0] in FOREIGN_KEYS_OFF
        conn.execute(f"SET SESSION foreign_key_checks = {0 if fk_off else 1}")
        conn.execute("START TRANSACTION")
        try:
            _apply(conn, op)
        except pymysql.err.IntegrityError:
            conn.execute("ROLLBACK")  # the statement failed: nothing may have changed
            assert reserved_totals(conn) == before, op
            continue
        if rolled_back:
            conn.execute("ROLLBACK")
            assert reserved_totals(conn) == before, op
        else:
            conn.execute("COMMIT")
        assert reserved_mismatches(conn) == [], (op, rolled_back)


def test_a_failing_statement_leaves_the_totals_alone(db_path):
    conn = db.connect(db_path)
    try:
        conn.execute("INSERT INTO users (username) VALUES ('alice')")
        conn.execute("INSERT INTO accounts (account) VALUES ('research')")
        conn.execute("INSERT INTO jobs_preallocations (job_uuid, username, account, "
                     "preallocated_cpu_minutes, preallocated_gpu_minutes, array_size) "
                     "VALUES ('u1', 'alice', 'research', 30, 5, 2)")
        with pytest.raises(sqlite3.IntegrityError):  # duplicate key
            conn.execute("INSERT INTO jobs_preallocations (job_uuid, username, account, "
                         "preallocated_cpu_minutes) VALUES ('u1', 'alice', 'research', 99)")
        with pytest.raises(sqlite3.IntegrityError):  # unknown account (foreign key)
            conn.execute("UPDATE jobs_preallocations SET account = 'nope' WHERE job_uuid = 'u1'")
        assert reserved_totals(conn) == {
            "users": {"alice": (60, 10, 2)}, "accounts": {"research": (60, 10, 2)},
        }
    finally:
        conn.close()


def test_moving_a_job_moves_its_reservation(db_path):
    conn = db.connect(db_path)
    try:
        conn.executemany("INSERT INTO users (username) VALUES (?)", [("alice",), ("bob",)])
        conn.executemany("INSERT INTO accounts (account) VALUES (?)", [("research",), ("physics",)])
        conn.execute("INSERT INTO jobs_preallocations (job_uuid, username, account, "
                     "preallocated_cpu_minutes, preallocated_gpu_minutes, array_size) "
                     "VALUES ('u1', 'alice', 'research', 30, 5, 4)")
        conn.execute("UPDATE jobs_preallocations SET username = 'bob', account = 'physics', "
                     "preallocated_cpu_minutes = 10, array_size = 3 WHERE job_uuid = 'u1'")
        assert reserved_totals(conn) == {
            "users": {"alice": (0, 0, 0), "bob": (30, 15, 3)},
            "accounts": {"research": (0, 0, 0), "physics": (30, 15, 3)},
        }
        assert db.release_preallocation(conn, "u1") == 1  # one element charged
        assert reserved_totals(conn)["users"]["bob"] == (20, 10, 2)
        assert db.release_preallocation(conn, "u1", all_elements=True) == 2
        assert reserved_totals(conn)["accounts"]["physics"] == (0, 0, 0)
    finally:
        conn.close()


# ---------------------------------------------------------------------------- the migration

# Open jobs added to the seed fixture's two: NULL array_size (one element) and NULL GPU amount.
EXTRA_SEED_PREALLOCATIONS = [
    ("9a7b1c3d-1111-4aaa-8bbb-000000000001", "bob", "hpc", 50, None, None),
    ("9a7b1c3d-1111-4aaa-8bbb-000000000002", "alice", "hpc", 7, 3, 10),
    ("9a7b1c3d-1111-4aaa-8bbb-000000000003", "alice", "projx", 0, 0, 0),
]
# alice: 120 + 70 + 0 CPU, 0 + 30 GPU, 1 + 10 + 0 jobs; carol: 600 x 4 CPU, 60 x 4 GPU, 4;
# bob: 50, 0, 1; projx: alice's 120 and 0 + carol's; hpc: bob's + alice's 7 x 10.
EXPECTED_AFTER_MIGRATION = {
    "users": {"alice": (190, 30, 11), "bob": (50, 0, 1), "carol": (2400, 240, 4)},
    "accounts": {"hpc": (120, 30, 11), "projx": (2520, 240, 5)},
}


def _add_seed_rows(path: Path) -> None:
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        conn.execute("PRAGMA foreign_keys = ON")
        conn.executemany(
            "INSERT INTO jobs_preallocations (job_uuid, username, account, "
            "preallocated_cpu_minutes, preallocated_gpu_minutes, array_size) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            EXTRA_SEED_PREALLOCATIONS,
        )
    finally:
        conn.close()


def test_migrating_a_seed_database_initialises_the_totals(tmp_path):
    path = make_seed_db(tmp_path / "seed.db")
    _add_seed_rows(path)
    assert db.schema_version(path) == 0

    assert db.migrate(path) == list(range(1, db.latest_version() + 1))

    conn = db.connect(path)
    try:
        assert reserved_totals(conn) == EXPECTED_AFTER_MIGRATION
        assert reserved_mismatches(conn) == []
        # integers, not the floats TOTAL() computes
        assert {type(v) for r in conn.execute(
            "SELECT reserved_cpu_minutes, reserved_gpu_minutes, reserved_jobs FROM users "
            "UNION ALL SELECT reserved_cpu_minutes, reserved_gpu_minutes, reserved_jobs "
            "FROM accounts") for v in r} == {int}
        # and the triggers follow from there
        with db.write_transaction(conn):
            db.release_preallocation(conn, "7d9e0b12-5a44-4e1f-8b2c-3f6a8d0e4b22")
        assert reserved_totals(conn)["users"]["carol"] == (1800, 180, 3)
        assert reserved_mismatches(conn) == []
    finally:
        conn.close()


def test_migrating_from_version_2_with_open_jobs(tmp_path):
    path = tmp_path / "v2.db"
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        for version, sql_path in db.migration_files():
            if version <= 2:
                conn.executescript(sql_path.read_text())
        conn.execute("PRAGMA foreign_keys = ON")
        conn.executemany("INSERT INTO users (username) VALUES (?)", [("alice",), ("bob",)])
        conn.execute("INSERT INTO accounts (account) VALUES ('research')")
        conn.executemany(
            "INSERT INTO jobs_preallocations (job_uuid, username, account, "
            "preallocated_cpu_minutes, preallocated_gpu_minutes, array_size) "
            "VALUES (?, ?, 'research', ?, ?, ?)",
            [("a", "alice", 30, 0, 1), ("b", "alice", 20, 10, 5), ("c", "bob", 60, 60, 1)],
        )
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    finally:
        conn.close()

    assert db.migrate(path) == list(range(3, db.latest_version() + 1))

    conn = db.connect(path)
    try:
        assert reserved_totals(conn) == {
            "users": {"alice": (130, 50, 6), "bob": (60, 60, 1)},
            "accounts": {"research": (190, 110, 7)},
        }
    finally:
        conn.close()


def test_a_migration_that_fails_leaves_no_half_added_totals(tmp_path):
    """0003 runs in one transaction: a failure (here: a column already present) changes
    nothing, and the version stays at 2."""
    path = tmp_path / "v2.db"
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        for version, sql_path in db.migration_files():
            if version <= 2:
                conn.executescript(sql_path.read_text())
        conn.execute("ALTER TABLE accounts ADD COLUMN reserved_jobs INTEGER")
    finally:
        conn.close()
    from slurm_quota.errors import SchemaError

    with pytest.raises(SchemaError, match="0003_reserved_totals.sql"):
        db.migrate(path)
    assert db.schema_version(path) == 2
    conn = sqlite3.connect(str(path))
    try:
        columns = {r[1] for r in conn.execute("PRAGMA table_info(users)")}
        triggers = conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall()
    finally:
        conn.close()
    assert "reserved_cpu_minutes" not in columns
    assert triggers == []
