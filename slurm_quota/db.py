"""The database: connections, migrations and every SQL statement of the Python side.

Owns: opening the SQLite ledger (busy timeout, foreign keys, WAL), applying migrations/*.sql,
file mode and ownership, and the statements the other modules call. It must not hold
business rules (those are in ledger.py) nor talk to Slurm. It is the only module that
imports sqlite3.

The file is shared with the job_submit plugin inside slurmctld: writers take the lock with
BEGIN IMMEDIATE and keep transactions short.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from slurm_quota.errors import DatabaseMissing, DatabaseUnavailable, SchemaError

# How long a CLI/charge writer waits for the plugin or another writer to release the lock.
BUSY_TIMEOUT_MS = 5000
DB_FILE_MODE = 0o644
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def migrations_dir() -> Path:
    """Return the folder holding NNNN_name.sql (installed wheel, else the source tree)."""
    here = Path(__file__).resolve().parent
    installed = here / "_data" / "migrations"
    if installed.is_dir():
        return installed
    return here.parent / "migrations"


def migration_files() -> list[tuple[int, Path]]:
    """Return (version, path) of every migration, in order."""
    found = []
    for path in migrations_dir().iterdir():
        m = _MIGRATION_NAME.match(path.name)
        if m:
            found.append((int(m.group(1)), path))
    found.sort()
    versions = [v for v, _ in found]
    if versions != list(range(1, len(versions) + 1)):
        raise SchemaError(f"Migrations in {migrations_dir()} are not numbered 1..N: {versions}.")
    return found


def latest_version() -> int:
    """Return the schema version this code writes and understands."""
    files = migration_files()
    return files[-1][0] if files else 0


def _is_locked(err: sqlite3.Error) -> bool:
    text = str(err).lower()
    return "locked" in text or "busy" in text


def connect(
    path: str | os.PathLike[str],
    *,
    readonly: bool = False,
    create: bool = False,
    check_schema: bool = True,
    busy_timeout_ms: int = BUSY_TIMEOUT_MS,
) -> sqlite3.Connection:
    """Open the ledger; refuse a missing file unless create=True, and an unknown schema."""
    db_path = Path(path)
    if not db_path.exists() and not create:
        raise DatabaseMissing(
            f"The database {db_path} does not exist. Create it with `slurm-quota migrate`."
        )
    try:
        if readonly:
            uri = f"file:{db_path.resolve()}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        else:
            if create:
                db_path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(db_path), isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        conn.execute("PRAGMA foreign_keys = ON")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.Error as err:
        if _is_locked(err):
            raise DatabaseUnavailable(f"The database {db_path} is locked: {err}.") from err
        raise DatabaseUnavailable(f"Cannot open the database {db_path}: {err}.") from err
    if check_schema:
        latest = latest_version()
        if version != latest:
            conn.close()
            if version > latest:
                raise SchemaError(
                    f"The database {db_path} has schema version {version}, newer than this "
                    f"slurm-quota understands ({latest}). Upgrade slurm-quota."
                )
            raise SchemaError(
                f"The database {db_path} has schema version {version}, this slurm-quota needs "
                f"{latest}. Run `slurm-quota migrate`."
            )
    return conn


@contextlib.contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Run the block in one BEGIN IMMEDIATE transaction: all of it or none of it."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as err:
        if _is_locked(err):
            raise DatabaseUnavailable(f"The database is locked by another writer: {err}.") from err
        raise
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    else:
        try:
            conn.execute("COMMIT")
        except sqlite3.OperationalError as err:
            conn.execute("ROLLBACK")
            if _is_locked(err):
                raise DatabaseUnavailable(f"The database is locked: {err}.") from err
            raise


def migrate(path: str | os.PathLike[str]) -> list[int]:
    """Bring the database at path to the latest schema; return the versions applied.

    Each step runs atomically with its version stamp (the BEGIN/COMMIT are in the SQL file,
    because executescript() commits any open transaction first). Idempotent.
    """
    db_path = Path(path)
    conn = connect(db_path, create=True, check_schema=False)
    applied: list[int] = []
    try:
        # WAL is a property of the file and is ignored inside a transaction: set it first.
        conn.execute("PRAGMA journal_mode = WAL")
        current = conn.execute("PRAGMA user_version").fetchone()[0]
        files = migration_files()
        latest = files[-1][0] if files else 0
        if current > latest:
            raise SchemaError(
                f"The database {db_path} has schema version {current}, newer than this "
                f"slurm-quota understands ({latest}). Upgrade slurm-quota."
            )
        for version, sql_path in files:
            if version <= current:
                continue
            try:
                conn.executescript(sql_path.read_text(encoding="utf-8"))
            except sqlite3.Error as err:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if _is_locked(err):
                    raise DatabaseUnavailable(
                        f"The database {db_path} is locked; migration {sql_path.name} was not "
                        f"applied: {err}."
                    ) from err
                raise SchemaError(f"Migration {sql_path.name} failed: {err}.") from err
            applied.append(version)
    finally:
        conn.close()
    fix_file_permissions(db_path)
    return applied


def schema_version(path: str | os.PathLike[str]) -> int:
    """Return PRAGMA user_version of the database at path."""
    conn = connect(path, readonly=True, check_schema=False)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def fix_file_permissions(db_path: Path) -> None:
    """Mode 0644 on the DB and its -wal/-shm; owned by slurm:slurm when we are root."""
    owner = None
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("slurm")
            owner = (pw.pw_uid, pw.pw_gid)
        except KeyError:
            owner = None
    for suffix in ("", "-wal", "-shm"):
        p = Path(str(db_path) + suffix)
        if not p.exists():
            continue
        os.chmod(p, DB_FILE_MODE)
        if owner is not None:
            os.chown(p, *owner)


# ---------------------------------------------------------------------------------------
# Section: admin (quotas, defaults, GPU factors, adjustments, journal) -- issue "Foundation"
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# Section: read models (stats for CLI, serve, dashboard)
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# Section: charges and preallocations (charge, reconcile, prune)
# ---------------------------------------------------------------------------------------
