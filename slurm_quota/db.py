"""The database: connections, migrations and every SQL statement of the Python side.

Owns: opening the SQLite ledger (busy timeout, foreign keys, WAL), applying migrations/*.sql,
file mode and ownership, and the statements the other modules call. It must not hold
business rules (those are in ledger.py) nor talk to Slurm. It is the only module that
imports sqlite3.

The file is shared with the job_submit plugin inside slurmctld: writers take the lock with
BEGIN IMMEDIATE and keep transactions short.

The ledger may also be a MariaDB database (configuration file, slurm_quota.config): the same
statements run there through slurm_quota.mariadb's connection, and the few differences
between the two dialects are all in the section "Dialect" below.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import pwd
import re
import sqlite3
import stat
from collections.abc import Iterator
from functools import cache

from slurm_quota.errors import (
    DatabaseDamaged,
    DatabaseMissing,
    DatabaseUnavailable,
    NotPermitted,
    SchemaError,
    SlurmQuotaError,
)

# pathlib is imported only where a Path is handed out (migrate, migration_files): opening the
# ledger for a charge must not pay its import (slurmctld runs one charge after another).
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from pathlib import Path

# How long a CLI/charge writer waits for the plugin or another writer to release the lock.
BUSY_TIMEOUT_MS = 5000
DB_FILE_MODE = 0o644
_MIGRATION_NAME = r"^(\d{4})_[a-z0-9_]+\.sql$"
# The errors pathlib's Path.exists() takes for "absent" (any other OSError propagates).
_ABSENT_ERRNOS = (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP)


def _migrations_dir_path() -> str:
    here = os.path.dirname(os.path.realpath(__file__))
    installed = os.path.join(here, "_data", "migrations")
    if os.path.isdir(installed):
        return installed
    return os.path.join(os.path.dirname(here), "migrations")


def migrations_dir() -> Path:
    """Return the folder holding NNNN_name.sql (installed wheel, else the source tree)."""
    from pathlib import Path

    return Path(_migrations_dir_path())


def _migration_names() -> list[tuple[int, str]]:
    """(version, file name) of every migration, in order; refuses gaps."""
    directory = _migrations_dir_path()
    found = []
    for name in os.listdir(directory):
        m = re.match(_MIGRATION_NAME, name)
        if m:
            found.append((int(m.group(1)), name))
    found.sort()
    versions = [v for v, _ in found]
    if versions != list(range(1, len(versions) + 1)):
        raise SchemaError(f"Migrations in {directory} are not numbered 1..N: {versions}.")
    return found


def migration_files() -> list[tuple[int, Path]]:
    """Return (version, path) of every migration, in order."""
    directory = migrations_dir()
    return [(version, directory / name) for version, name in _migration_names()]


def latest_version() -> int:
    """Return the schema version this code writes and understands."""
    names = _migration_names()
    return names[-1][0] if names else 0


@cache
def _code_schema_version() -> int:
    # latest_version() once per process: the code loaded cannot change under it, and a
    # long-running reader (serve) connects per request.
    return latest_version()


def _pathlib_form(path: str | os.PathLike[str]) -> str:
    """str(Path(path)) without importing pathlib: "" -> ".", no "." parts, no trailing "/".

    connect() opened and named the file by this form before; e.g. `--db ledger.db/` worked.
    """
    text = os.fspath(path)
    if text.startswith("//") and not text.startswith("///"):
        root = "//"  # POSIX keeps exactly two leading slashes
    elif text.startswith("/"):
        root = "/"
    else:
        root = ""
    parts = [part for part in text.split("/") if part and part != "."]
    return (root + "/".join(parts)) or "."


def _exists(path: str) -> bool:
    # pathlib's Path.exists() without importing pathlib (same errors ignored, others raised).
    try:
        os.stat(path)
    except OSError as err:
        if err.errno in _ABSENT_ERRNOS:
            return False
        raise
    except ValueError:
        return False
    return True


def _where(*filters: tuple[str, object]) -> tuple[str, list[object]]:
    """` WHERE a AND b` from (condition, value) pairs whose value is not None; one value is
    bound to every `?` of its condition."""
    parts: list[str] = []
    params: list[object] = []
    for condition, value in filters:
        if value is not None:
            parts.append(condition)
            params += [value] * condition.count("?")
    return (" WHERE " + " AND ".join(parts) if parts else ""), params


# ---------------------------------------------------------------------------------------
# Section: Dialect -- every difference between SQLite and MariaDB SQL of the Python side.
# ---------------------------------------------------------------------------------------
# Placeholders (`?`, `:name`) are written once, SQLite's way; the MariaDB connection
# translates them (slurm_quota.mariadb.translate). Column names that are reserved words in
# MariaDB (`key`, `partition`) are quoted with backticks, which SQLite accepts too.


def is_mariadb(conn: object) -> bool:
    """True when conn is a connection to a MariaDB ledger."""
    return getattr(conn, "engine", "sqlite") == "mariadb"


def _idiv(conn: object, a: str, b: int) -> str:
    """Integer division truncating toward zero: SQLite's `/` on integers, MariaDB's DIV."""
    return f"({a}) DIV {b}" if is_mariadb(conn) else f"({a}) / {b}"


def _differs(conn: object, a: str, b: str) -> str:
    """a and b differ, NULL counting as a value: SQLite's IS NOT, MariaDB's NOT <=>."""
    return f"NOT ({a} <=> {b})" if is_mariadb(conn) else f"{a} IS NOT {b}"


def _total(conn: object, expr: str) -> str:
    """Sum that is 0 over no rows and never overflows: SQLite's TOTAL(), MariaDB's exact
    DECIMAL SUM()."""
    return f"COALESCE(SUM({expr}), 0)" if is_mariadb(conn) else f"TOTAL({expr})"


def _as_integer(conn: object, expr: str) -> str:
    return f"CAST({expr} AS SIGNED)" if is_mariadb(conn) else f"CAST({expr} AS INTEGER)"


def _upsert(conn: object, table: str, key: str, value: str) -> str:
    """INSERT (key, value) or overwrite the value of an existing key."""
    if is_mariadb(conn):
        return (
            f"INSERT INTO {table} ({key}, {value}) VALUES (?, ?) "
            f"ON DUPLICATE KEY UPDATE {value} = VALUES({value})"
        )
    return (
        f"INSERT INTO {table} ({key}, {value}) VALUES (?, ?) "
        f"ON CONFLICT ({key}) DO UPDATE SET {value} = excluded.{value}"
    )


def _insert_if_absent(conn, sql: str, conflict_key: str, params) -> bool:
    """Run an INSERT; False (and no change) when the unique conflict_key already holds it.

    SQLite: ON CONFLICT DO NOTHING. MariaDB: the plain INSERT, whose duplicate-key error
    InnoDB rolls back alone (the transaction goes on); INSERT IGNORE would also turn other
    errors into warnings, and ON DUPLICATE KEY would fire the row's update triggers.
    """
    if not is_mariadb(conn):
        return conn.execute(f"{sql} ON CONFLICT ({conflict_key}) DO NOTHING", params).rowcount == 1
    from slurm_quota import mariadb

    try:
        conn.execute(sql, params)
    except Exception as err:
        if mariadb.is_duplicate_key(err):
            return False
        raise
    return True


def _for_update(conn: object) -> str:
    """Suffix of a read whose row the transaction then writes: SQLite's writer holds the
    whole file already (BEGIN IMMEDIATE); InnoDB locks the row."""
    return " FOR UPDATE" if is_mariadb(conn) else ""


def _is_locked(err: sqlite3.Error) -> bool:
    text = str(err).lower()
    return "locked" in text or "busy" in text


def _is_damaged(err: sqlite3.Error) -> bool:
    text = str(err).lower()
    return "not a database" in text or "malformed" in text


def _damaged(db_path: str, detail: str) -> DatabaseDamaged:
    return DatabaseDamaged(
        f"The database {db_path} is not a SQLite database or is damaged ({detail}); nothing "
        f"was written. See what is wrong with `slurm-quota check`, then restore it from a "
        f"backup (sqlite3 .backup) or recover it with `sqlite3 {db_path} .recover`."
    )


def _ledger_error(err: sqlite3.DatabaseError, db_path: str) -> SlurmQuotaError | None:
    """The error a person reads for a SQLite error that retrying cannot fix, else None.

    Locks stay sqlite3 errors: their callers map them with a message of their own.
    """
    text = str(err).lower()
    if _is_damaged(err):
        return _damaged(db_path, str(err))
    if "readonly database" in text:
        return NotPermitted(
            f"The database {db_path} is read-only for uid {os.getuid()} ({err}); nothing was "
            f"written. Writing needs write access to the file, its -wal and -shm files and "
            f"its directory on a file system mounted read-write: run as root or as the "
            f"ledger's owner (SlurmUser); `slurm-quota migrate` as root restores its owner "
            f"and mode."
        )
    return None


class _LedgerCursor(sqlite3.Cursor):
    """A cursor whose damaged-file and read-only errors are SlurmQuotaErrors (see _Ledger)."""

    def _reraise(self, err: sqlite3.DatabaseError) -> None:
        path = getattr(self.connection, "ledger_path", None)
        mapped = _ledger_error(err, path) if path is not None else None
        if mapped is not None:
            raise mapped from err

    def execute(self, *args):  # type: ignore[override]
        try:
            return super().execute(*args)
        except sqlite3.DatabaseError as err:
            self._reraise(err)
            raise

    def executemany(self, *args):  # type: ignore[override]
        try:
            return super().executemany(*args)
        except sqlite3.DatabaseError as err:
            self._reraise(err)
            raise

    def fetchone(self):  # type: ignore[override]
        try:
            return super().fetchone()
        except sqlite3.DatabaseError as err:
            self._reraise(err)
            raise

    def fetchmany(self, *args):  # type: ignore[override]
        try:
            return super().fetchmany(*args)
        except sqlite3.DatabaseError as err:
            self._reraise(err)
            raise

    def fetchall(self):  # type: ignore[override]
        try:
            return super().fetchall()
        except sqlite3.DatabaseError as err:
            self._reraise(err)
            raise

    def __next__(self):
        try:
            return super().__next__()
        except sqlite3.DatabaseError as err:
            self._reraise(err)
            raise


class _Ledger(sqlite3.Connection):
    """A connection to the ledger: a damaged page or a read-only file met by ANY statement,
    at any time, becomes DatabaseDamaged or NotPermitted with what to do, never a bare
    sqlite3 error (ledger_path is set once connect() has set the connection up)."""

    ledger_path: str | None = None
    engine = "sqlite"

    def cursor(self, factory=_LedgerCursor):  # type: ignore[override]
        return super().cursor(factory)

    def execute(self, sql, parameters=(), /):  # type: ignore[override]
        return self.cursor().execute(sql, parameters)

    def executemany(self, sql, parameters, /):  # type: ignore[override]
        return self.cursor().executemany(sql, parameters)

    def executescript(self, script, /):  # type: ignore[override]
        try:
            return super().executescript(script)
        except sqlite3.DatabaseError as err:
            mapped = _ledger_error(err, self.ledger_path) if self.ledger_path else None
            if mapped is not None:
                raise mapped from err
            raise


def _require_regular_files(db_path: str) -> None:
    """Refuse a ledger (or -wal/-shm) that is not a regular file: opening a FIFO blocks."""
    for suffix in ("", "-wal", "-shm"):
        try:
            mode = os.stat(db_path + suffix).st_mode
        except (OSError, ValueError):
            continue
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) \
                else "a device or socket"
            raise DatabaseDamaged(
                f"{db_path}{suffix} is {kind}, not a regular file, so it is not opened (reading "
                f"it could block forever). Point --db (SLURM_QUOTA_DB) at the ledger file, or "
                f"remove what is at that path and restore the ledger from a backup."
            )


def require_intact(conn: sqlite3.Connection, db_path: str) -> None:
    """Refuse (DatabaseDamaged) a ledger that fails SQLite's quick_check: no admin write then.

    Not on MariaDB: InnoDB verifies each page's checksum as it reads it, and CHECK TABLE of
    the whole ledger before every admin change would cost seconds; `check` runs it.
    """
    if is_mariadb(conn):
        return
    problems = quick_check(conn)
    if problems:
        raise DatabaseDamaged(
            f"The database {db_path} fails SQLite's integrity check ({problems[0]}), so no "
            f"change is written to it. Run `slurm-quota check` for the details, then restore "
            f"it from a backup or recover it with `sqlite3 {db_path} .recover`."
        )


def connect(
    path: str | os.PathLike[str],
    *,
    readonly: bool = False,
    create: bool = False,
    check_schema: bool = True,
    busy_timeout_ms: int = BUSY_TIMEOUT_MS,
    durable: bool = True,
    intact: bool = False,
) -> sqlite3.Connection:
    """Open the ledger; refuse a missing file unless create=True, and an unknown schema.

    path is a SQLite file, or a config.SQLiteLedger / config.MariaDBLedger (the
    configuration file's choice, slurm_quota.config.resolve).

    durable=False sets `PRAGMA synchronous = NORMAL` on this connection (WAL: a commit is not
    fsynced until the next checkpoint; a power loss may drop the last commits, never corrupts
    the file). Only for writers whose rows `reconcile` rebuilds from Slurm (the jobcomp charge),
    as the plugin's connection does (DESIGN §6). intact=True also refuses a file that fails
    SQLite's quick_check (admin writes). Only regular files are opened: a FIFO at the path
    would block the open or the first read forever.
    """
    kind = getattr(path, "kind", None)
    if kind == "mariadb":
        return _connect_mariadb(
            path, readonly=readonly, check_schema=check_schema, busy_timeout_ms=busy_timeout_ms
        )
    if kind == "sqlite":
        path = path.path  # type: ignore[union-attr]
    db_path = _pathlib_form(path)
    try:
        present = _exists(db_path)
    except PermissionError as err:
        raise NotPermitted(
            f"The database {db_path} cannot be accessed by uid {os.getuid()}: {err.strerror}. "
            f"Users read the ledger through the service (`slurm-quota stats`)."
        ) from err
    except OSError as err:  # e.g. a name too long: no file can be there
        shown = db_path if len(db_path) <= 200 else db_path[:200] + "..."
        raise DatabaseMissing(f"The database {shown} cannot be opened: {err.strerror}.") from err
    if not present and not create:
        raise DatabaseMissing(
            f"The database {db_path} does not exist. Create it with `slurm-quota migrate`."
        )
    _require_regular_files(db_path)
    try:
        if readonly:
            uri = f"file:{os.path.realpath(db_path)}?mode=ro"
            conn = sqlite3.connect(
                uri, uri=True, isolation_level=None, check_same_thread=False, factory=_Ledger
            )
        else:
            if create:
                from pathlib import Path

                Path(db_path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(db_path, isolation_level=None, factory=_Ledger)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        conn.execute("PRAGMA foreign_keys = ON")
        if not durable:
            conn.execute("PRAGMA synchronous = NORMAL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.Error as err:
        if _is_locked(err):
            raise DatabaseUnavailable(f"The database {db_path} is locked: {err}.") from err
        if readonly and "readonly database" in str(err).lower():
            # WAL: with no connection open, SQLite removed the -wal/-shm files and a reader
            # must create them. Not temporary for this caller: exit 1, not 75.
            raise NotPermitted(
                f"The database {db_path} cannot be read by uid {os.getuid()} ({err}): in WAL "
                f"mode a reader creates {os.path.basename(db_path)}-shm next to it when no "
                f"writer has it open, which needs write access to its directory. Run this as "
                f"root or as the ledger's owner; users read the ledger through the service "
                f"(`slurm-quota stats`)."
            ) from err
        if _is_damaged(err):
            # Not worth retrying: exit 1, not 75.
            raise _damaged(db_path, str(err)) from err
        raise DatabaseUnavailable(f"Cannot open the database {db_path}: {err}.") from err
    conn.ledger_path = db_path
    if check_schema:
        latest = _code_schema_version()
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
    if intact:
        try:
            require_intact(conn, db_path)
        except BaseException:
            conn.close()
            raise
    return conn



def _schema_mismatch(where: str, version: int, latest: int) -> SchemaError:
    if version > latest:
        return SchemaError(
            f"The database {where} has schema version {version}, newer than this "
            f"slurm-quota understands ({latest}). Upgrade slurm-quota."
        )
    return SchemaError(
        f"The database {where} has schema version {version}, this slurm-quota needs "
        f"{latest}. Run `slurm-quota migrate`."
    )


def _connect_mariadb(ledger, *, readonly: bool, check_schema: bool, busy_timeout_ms: int):
    """A connection to a MariaDB ledger (mariadb.Connection), its schema checked."""
    from slurm_quota import mariadb

    conn = mariadb.connect(ledger, lock_timeout_s=max(1, -(-int(busy_timeout_ms) // 1000)))
    if readonly:
        conn.execute("SET SESSION TRANSACTION READ ONLY")
    if check_schema:
        try:
            version = mariadb.schema_version(conn)
        except BaseException:
            conn.close()
            raise
        latest = _code_schema_version()
        if version != latest:
            conn.close()
            raise _schema_mismatch(ledger.describe(), version, latest)
    return conn


def checkpoint(conn: sqlite3.Connection) -> None:
    """A PASSIVE WAL checkpoint (copies what no reader still needs; never waits for locks).

    The plugin's connection never checkpoints (wal_autocheckpoint = 0: not on slurmctld's
    path), so the Python side does: every commit here past SQLite's 1000-page threshold, and
    this at the end of each reconcile (the timer), which bounds the WAL on a cluster where
    nothing completes. A busy or failing checkpoint is harmless: the next one catches up.
    MariaDB (InnoDB) checkpoints by itself: nothing to do.
    """
    if is_mariadb(conn):
        return
    with contextlib.suppress(sqlite3.Error):
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

@contextlib.contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Run the block in one BEGIN IMMEDIATE transaction: all of it or none of it.

    MariaDB: one InnoDB transaction that first locks the schema_version row, so the Python
    writers (charge, reconcile, admin, check --repair) follow one another as they do on
    SQLite; the plugin never takes that lock (it reads schema_version without locking) and
    meets them only on the rows both write.
    """
    if is_mariadb(conn):
        with _mariadb_write_transaction(conn):
            yield conn
        return
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
        except SlurmQuotaError:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error, SlurmQuotaError):
                    conn.execute("ROLLBACK")
            raise


@contextlib.contextmanager
def _mariadb_write_transaction(conn) -> Iterator[None]:
    conn.execute("START TRANSACTION")
    try:
        conn.execute("SELECT version FROM schema_version WHERE id = 1 FOR UPDATE").fetchall()
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            conn.execute("ROLLBACK")
        raise
    else:
        try:
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                conn.execute("ROLLBACK")
            raise


def mariadb_migration_files() -> list[tuple[int, Path]]:
    """(version, path) of migrations/mariadb/NNNN_name.sql, the same versions as SQLite's."""
    directory = migrations_dir() / "mariadb"
    found = sorted(
        (int(m.group(1)), directory / name)
        for name in os.listdir(directory)
        if (m := re.match(_MIGRATION_NAME, name))
    )
    expected = [(v, n) for v, n in _migration_names()]
    if [(v, p.name) for v, p in found] != expected:
        raise SchemaError(
            f"The MariaDB migrations in {directory} do not match the SQLite ones "
            f"({[p.name for _, p in found]} vs {[n for _, n in expected]})."
        )
    return found


def _migrate_mariadb(ledger) -> list[int]:
    from slurm_quota import mariadb

    conn = mariadb.connect(ledger, lock_timeout_s=BUSY_TIMEOUT_MS // 1000)
    applied: list[int] = []
    try:
        current = mariadb.schema_version(conn)
        files = mariadb_migration_files()
        latest = files[-1][0] if files else 0
        if current > latest:
            raise _schema_mismatch(ledger.describe(), current, latest)
        for version, sql_path in files:
            if version <= current:
                continue
            mariadb.execute_script(conn, sql_path.read_text(encoding="utf-8"))
            if mariadb.schema_version(conn) != version:
                raise SchemaError(
                    f"Migration mariadb/{sql_path.name} ran but did not stamp version "
                    f"{version} on {ledger.describe()}."
                )
            applied.append(version)
    finally:
        conn.close()
    return applied


def migrate(path: str | os.PathLike[str]) -> list[int]:
    """Bring the database at path to the latest schema; return the versions applied.

    Each step runs atomically with its version stamp (the BEGIN/COMMIT are in the SQL file,
    because executescript() commits any open transaction first). Idempotent.

    path may be a config.MariaDBLedger: migrations/mariadb/ are applied in order; DDL commits
    at once there, so each file is written to be re-run after a stop half-way, and its data
    changes and version stamp commit together.
    """
    from pathlib import Path

    kind = getattr(path, "kind", None)
    if kind == "mariadb":
        return _migrate_mariadb(path)
    if kind == "sqlite":
        path = path.path  # type: ignore[union-attr]

    db_path = Path(path)
    conn = connect(db_path, create=True, check_schema=False)
    applied: list[int] = []
    try:
        current = conn.execute("PRAGMA user_version").fetchone()[0]
        files = migration_files()
        latest = files[-1][0] if files else 0
        if current > latest:
            raise SchemaError(
                f"The database {db_path} has schema version {current}, newer than this "
                f"slurm-quota understands ({latest}). Upgrade slurm-quota."
            )
        if current == 0 and files:
            _check_adopted_tables(conn, db_path, files[0][1])
        # WAL is a property of the file and is ignored inside a transaction: set it first.
        # Switching a rollback-journal file to WAL needs an exclusive lock: it can be busy.
        try:
            conn.execute("PRAGMA journal_mode = WAL")
        except sqlite3.Error as err:
            if _is_locked(err):
                raise DatabaseUnavailable(
                    f"The database {db_path} is locked; no migration was applied: {err}."
                ) from err
            raise DatabaseUnavailable(f"Cannot use the database {db_path}: {err}.") from err
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


def _check_adopted_tables(conn: sqlite3.Connection, db_path: Path, first: Path) -> None:
    """Refuse to adopt existing (seed) tables that lack a column migration 0001 creates.

    0001 creates tables only if absent, so an older seed file (e.g. before its array_size
    upgrade) would otherwise be stamped current while the plugin's queries fail on it.
    """
    reference = sqlite3.connect(":memory:", isolation_level=None)
    try:
        reference.executescript(first.read_text(encoding="utf-8"))
        rows = reference.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        tables = [r[0] for r in rows.fetchall()]
        expected = {t: [c[1] for c in reference.execute(f"PRAGMA table_info({t})")] for t in tables}
    finally:
        reference.close()
    missing: list[str] = []
    for table, columns in expected.items():
        present = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        if present:
            missing += [f"{table}.{c}" for c in columns if c not in present]
    if missing:
        raise SchemaError(
            f"The database {db_path} has the seed system's tables but lacks "
            f"{', '.join(missing)}: it predates the seed's own upgrades. Run the seed's "
            f"migrate-slurm-quota on it first (it adds jobs_preallocations.array_size), then "
            f"`slurm-quota migrate`. Nothing was changed."
        )


def schema_version(path: str | os.PathLike[str]) -> int:
    """Return PRAGMA user_version of the database at path (MariaDB: its schema_version row)."""
    if getattr(path, "kind", None) == "mariadb":
        from slurm_quota import mariadb

        conn = mariadb.connect(path)
        try:
            return mariadb.schema_version(conn)
        finally:
            conn.close()
    if getattr(path, "kind", None) == "sqlite":
        path = path.path  # type: ignore[union-attr]
    conn = connect(path, readonly=True, check_schema=False)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def fix_file_permissions(db_path: Path) -> None:
    """Mode 0644 on the DB and its -wal/-shm; owned by slurm:slurm when we are root."""
    from pathlib import Path

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
# Table and column names below come only from these fixed maps (identifiers cannot be bound);
# every value is a bound parameter.

_OWNER_TABLES = {"user": ("users", "username"), "account": ("accounts", "account")}
_QUOTA_COLUMNS = {"cpu": "quota_cpu_minutes", "gpu": "quota_gpu_minutes"}
_CONSUMED_COLUMNS = {"cpu": "total_consumed_cpu_minutes", "gpu": "total_consumed_gpu_minutes"}


def _owner_table(kind: str) -> tuple[str, str]:
    try:
        return _OWNER_TABLES[kind]
    except KeyError:
        raise ValueError(f"unknown owner kind {kind!r}") from None


def quota_column(resource: str) -> str:
    """Column holding the quota of a resource ('cpu' or 'gpu')."""
    return _QUOTA_COLUMNS[resource]


def consumed_column(resource: str) -> str:
    """Column holding the consumed total of a resource ('cpu' or 'gpu')."""
    return _CONSUMED_COLUMNS[resource]


def get_owner(conn: sqlite3.Connection, kind: str, name: str) -> sqlite3.Row | None:
    """The users/accounts row of a user or account (columns named as in the seed), or None."""
    table, key = _owner_table(kind)
    return conn.execute(
        f"SELECT {key} AS name, total_consumed_cpu_minutes, quota_cpu_minutes, "
        f"total_consumed_gpu_minutes, quota_gpu_minutes, last_updated "
        f"FROM {table} WHERE {key} = ?",
        (name,),
    ).fetchone()


def insert_owner(
    conn: sqlite3.Connection,
    kind: str,
    name: str,
    quota_cpu_minutes: int,
    quota_gpu_minutes: int,
) -> None:
    """Create a user/account row with nothing consumed and the given quotas."""
    table, key = _owner_table(kind)
    conn.execute(
        f"INSERT INTO {table} ({key}, total_consumed_cpu_minutes, quota_cpu_minutes, "
        f"total_consumed_gpu_minutes, quota_gpu_minutes, last_updated) "
        f"VALUES (?, 0, ?, 0, ?, CURRENT_TIMESTAMP)",
        (name, quota_cpu_minutes, quota_gpu_minutes),
    )


def set_owner_quota(
    conn: sqlite3.Connection, kind: str, name: str, resource: str, minutes: int
) -> None:
    """Set one quota of an existing user/account row."""
    table, key = _owner_table(kind)
    column = quota_column(resource)
    conn.execute(
        f"UPDATE {table} SET {column} = ?, last_updated = CURRENT_TIMESTAMP WHERE {key} = ?",
        (minutes, name),
    )


def get_setting(conn: sqlite3.Connection, key: str) -> str | None:
    """The text value of a settings key, or None when absent."""
    row = conn.execute("SELECT value FROM settings WHERE `key` = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def set_setting(conn: sqlite3.Connection, key: str, value: str) -> None:
    """Insert or replace a settings key (the upsert form SQLite and PostgreSQL share)."""
    conn.execute(_upsert(conn, "settings", "`key`", "value"), (key, value))


def delete_setting(conn: sqlite3.Connection, key: str) -> bool:
    """Remove a settings key; False when it was not set."""
    return conn.execute("DELETE FROM settings WHERE `key` = ?", (key,)).rowcount == 1


def list_settings(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    """Every stored (key, value) row, by key."""
    return conn.execute("SELECT `key`, value FROM settings ORDER BY `key`").fetchall()


def list_gpu_factors(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    """Every stored (gpu_type, factor) row, unordered (callers sort: collations differ)."""
    return conn.execute("SELECT gpu_type, factor FROM gpu_factors").fetchall()


def get_gpu_factor(conn: sqlite3.Connection, gpu_type: str) -> float | None:
    """The stored factor of one GPU type, or None when it has no row."""
    row = conn.execute(
        "SELECT factor FROM gpu_factors WHERE gpu_type = ?", (gpu_type,)
    ).fetchone()
    return None if row is None else float(row[0])


def set_gpu_factor(conn: sqlite3.Connection, gpu_type: str, factor: float) -> None:
    """Insert or replace the factor of a GPU type."""
    conn.execute(_upsert(conn, "gpu_factors", "gpu_type", "factor"), (gpu_type, factor))


def insert_journal(
    conn: sqlite3.Connection,
    *,
    actor: str,
    action: str,
    target_kind: str,
    target: str,
    field: str | None,
    old_value: str | None,
    new_value: str | None,
    reason: str | None,
) -> int:
    """Append one journal row (time = now, UTC) and return its id."""
    cur = conn.execute(
        "INSERT INTO journal (at, actor, action, target_kind, target, field, old_value, "
        "new_value, reason) VALUES (CURRENT_TIMESTAMP, ?, ?, ?, ?, ?, ?, ?, ?)",
        (actor, action, target_kind, target, field, old_value, new_value, reason),
    )
    return int(cur.lastrowid)


# The rows history shows (read_journal*, read_charges*): one column list each.
_SELECT_JOURNAL_ROWS = (
    "SELECT id, at, actor, action, target_kind, target, field, old_value, new_value, "
    "reason FROM journal"
)
_SELECT_CHARGE_ROWS = (
    "SELECT id, charge_key, job_id, array_job_id, array_task_id, het_job_id, "
    "het_job_offset, username, account, job_uuid, `partition`, job_state, start_time, "
    "end_time, elapsed_s, cpus, gpus, gpu_factors, cpu_minutes, gpu_minutes, "
    "released_prealloc, source, charged_at, cpu_s, gpu_ms FROM charges"
)


def read_journal(
    conn: sqlite3.Connection,
    *,
    target_kind: str | None = None,
    target: str | None = None,
    limit: int,
) -> list[sqlite3.Row]:
    """Journal rows, newest first, optionally for one target (kind + name)."""
    sql = _SELECT_JOURNAL_ROWS
    params: list[object] = []
    if target_kind is not None and target is not None:
        sql += " WHERE target_kind = ? AND target = ?"
        params += [target_kind, target]
    sql += " ORDER BY id DESC LIMIT ?"
    params.append(int(limit))
    return conn.execute(sql, params).fetchall()


def read_charges(
    conn: sqlite3.Connection,
    *,
    username: str | None = None,
    account: str | None = None,
    job_id: int | None = None,
    limit: int,
) -> list[sqlite3.Row]:
    """Charge rows, newest first, filtered by user, account and/or job (array/het parent too)."""
    sql = _SELECT_CHARGE_ROWS
    clause, params = _where(
        ("username = ?", username),
        ("account = ?", account),
        ("(job_id = ? OR array_job_id = ? OR het_job_id = ?)", job_id),
    )
    sql += clause + " ORDER BY id DESC LIMIT ?"
    return conn.execute(sql, [*params, int(limit)]).fetchall()


# ---------------------------------------------------------------------------------------
# Section: read models (stats for CLI, serve, dashboard)
# ---------------------------------------------------------------------------------------

# One statement per view. The reservations come from the per-owner running totals that the
# triggers of migration 0003 keep exact (reserved_* = Σ amount × array_size, reserved_jobs =
# Σ array_size), so no view sums jobs_preallocations. Columns, in order: name, consumed cpu,
# preallocated cpu, quota cpu, consumed gpu, preallocated gpu, quota gpu, last_updated,
# job_count.
_USAGE_COLUMNS = """
    COALESCE(t.total_consumed_cpu_minutes, 0), t.reserved_cpu_minutes,
    COALESCE(t.quota_cpu_minutes, -1),
    COALESCE(t.total_consumed_gpu_minutes, 0), t.reserved_gpu_minutes,
    COALESCE(t.quota_gpu_minutes, -1),
    t.last_updated, t.reserved_jobs
"""
SQL_STATS_USERS_ALL = f"SELECT t.username, {_USAGE_COLUMNS} FROM users AS t ORDER BY t.username"
SQL_STATS_ACCOUNTS_ALL = (
    f"SELECT t.account, {_USAGE_COLUMNS} FROM accounts AS t ORDER BY t.account"
)
SQL_STATS_ACCOUNT = f"SELECT t.account, {_USAGE_COLUMNS} FROM accounts AS t WHERE t.account = ?"
# A user and their accounts in one statement (one statement reads one consistent state,
# without the BEGIN and COMMIT of read_snapshot): the first column tells which is which.
# A user's accounts are those they have open jobs (preallocations) or charged runs in. The
# ledger has no association table; Slurm's associations would need sacctmgr.
SQL_STATS_USER_VIEW = f"""
WITH mine(account) AS (
    SELECT account FROM jobs_preallocations WHERE username = :username
    UNION
    SELECT account FROM charges WHERE username = :username
)
SELECT 0, t.username, {_USAGE_COLUMNS} FROM users AS t WHERE t.username = :username
UNION ALL
SELECT 1, t.account, {_USAGE_COLUMNS} FROM accounts AS t JOIN mine ON mine.account = t.account
ORDER BY 1, 2
"""
SQL_LEDGER_ROW_COUNTS = """
SELECT 'users', COUNT(*) FROM users
UNION ALL SELECT 'accounts', COUNT(*) FROM accounts
UNION ALL SELECT 'jobs_preallocations', COUNT(*) FROM jobs_preallocations
UNION ALL SELECT 'gpu_factors', COUNT(*) FROM gpu_factors
UNION ALL SELECT 'settings', COUNT(*) FROM settings
UNION ALL SELECT 'charges', COUNT(*) FROM charges
UNION ALL SELECT 'journal', COUNT(*) FROM journal
"""
# Charged minutes = the one rule (ledger.minutes_from_exact, ceil) on the exact sums.
def _sql_charge_totals(conn: object) -> str:
    return (
        f"SELECT COUNT(*), {_idiv(conn, 'COALESCE(SUM(cpu_s), 0) + 59', 60)}, "
        f"{_idiv(conn, 'COALESCE(SUM(gpu_ms), 0) + 59999', 60000)} FROM charges"
    )

UsageTuple = tuple  # (name, cpu consumed, cpu prealloc, cpu quota, gpu ..., last_updated, jobs)


@contextlib.contextmanager
def read_snapshot(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Run several reads in one read transaction, so they see one consistent state."""
    if is_mariadb(conn):
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
        try:
            yield conn
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")
        return
    try:
        conn.execute("BEGIN")
    except sqlite3.Error as err:
        raise DatabaseUnavailable(f"Cannot start a read on the database: {err}.") from err
    try:
        yield conn
    finally:
        if conn.in_transaction:
            conn.execute("COMMIT")


def _usage_rows(
    conn: sqlite3.Connection, sql: str, params: tuple | dict[str, str] = ()
) -> list[UsageTuple]:
    try:
        cursor = conn.cursor()
        cursor.row_factory = None  # plain tuples: sqlite3.Row costs 2-3 us a row here
        return cursor.execute(sql, params).fetchall()
    except sqlite3.Error as err:
        if _is_locked(err):
            raise DatabaseUnavailable(f"The database is locked: {err}.") from err
        raise DatabaseUnavailable(f"Cannot read the database: {err}.") from err


def stats_users(conn: sqlite3.Connection) -> list[UsageTuple]:
    """Usage rows of every user, by name (one user and their accounts: stats_user_view)."""
    return _usage_rows(conn, SQL_STATS_USERS_ALL)


def stats_accounts(conn: sqlite3.Connection, account: str | None = None) -> list[UsageTuple]:
    """Usage rows of every account (by name), or of one account (zero or one row)."""
    if account is None:
        return _usage_rows(conn, SQL_STATS_ACCOUNTS_ALL)
    return _usage_rows(conn, SQL_STATS_ACCOUNT, (account,))


def stats_user_view(
    conn: sqlite3.Connection, username: str
) -> tuple[list[UsageTuple], list[UsageTuple]]:
    """(the user's usage row or none, the usage rows of their accounts), read at once."""
    rows = _usage_rows(conn, SQL_STATS_USER_VIEW, {"username": username})
    return [r[1:] for r in rows if r[0] == 0], [r[1:] for r in rows if r[0] == 1]


def ledger_row_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Number of rows in each ledger table."""
    return {str(name): int(count) for name, count in _usage_rows(conn, SQL_LEDGER_ROW_COUNTS)}


def charge_totals(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """(number of charged runs, CPU minutes, GPU minutes) over the whole charges table
    (minutes of the exact sums, by the one rule)."""
    count, cpu, gpu = _usage_rows(conn, _sql_charge_totals(conn))[0]
    return int(count), int(cpu), int(gpu)


def ping(conn: sqlite3.Connection) -> int:
    """Read the schema version: proves the file is readable; returns PRAGMA user_version."""
    if is_mariadb(conn):
        return int(_usage_rows(conn, "SELECT version FROM schema_version WHERE id = 1")[0][0])
    return int(_usage_rows(conn, "PRAGMA user_version")[0][0])


def data_version(conn: sqlite3.Connection) -> int:
    """PRAGMA data_version: changes when any other connection has committed (change probe).

    MariaDB has no such counter: this is a number that changes whenever a ledger table was
    written (InnoDB's UPDATE_TIME of the tables, kept by the server at each commit, to the
    second), and that is new at every call while the last write is under 2 s old, since a
    second commit within the same second would not move UPDATE_TIME. A change is never
    missed; a busy ledger is only cached less.
    """
    if is_mariadb(conn):
        row = _usage_rows(
            conn,
            "SELECT UNIX_TIMESTAMP(MAX(UPDATE_TIME)), UNIX_TIMESTAMP(NOW()), COUNT(*) "
            "FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE()",
        )[0]
        newest = int(row[0] or 0)
        now = int(row[1])
        if now - newest < 2:
            return -next(_RECENT_WRITE)
        return newest
    return int(_usage_rows(conn, "PRAGMA data_version")[0][0])


_RECENT_WRITE = itertools.count(1)



# ---------------------------------------------------------------------------------------
# Section: charges and preallocations (charge, reconcile, prune)
# ---------------------------------------------------------------------------------------
# Identifiers come only from _OWNER_TABLES (above) and the fixed default-quota keys below.
_DEFAULT_QUOTA_KEY = "default_{kind}_quota_{resource}_minutes"

_CHARGE_COLUMNS = (
    "charge_key", "job_id", "array_job_id", "array_task_id", "het_job_id", "het_job_offset",
    "username", "account", "job_uuid", "`partition`", "job_state", "start_time", "end_time",
    "elapsed_s", "cpus", "gpus", "gpu_factors", "cpu_minutes", "gpu_minutes",
    "released_prealloc", "source", "cpu_s", "gpu_ms",
)  # fmt: skip
SQL_INSERT_CHARGE = (
    f"INSERT INTO charges ({', '.join(_CHARGE_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _CHARGE_COLUMNS)})"
)  # + the dialect's "if absent" (_insert_if_absent)


def charge_exists(conn: sqlite3.Connection, charge_key: str) -> bool:
    """True when this run (charge_key) is already in `charges`."""
    row = conn.execute("SELECT 1 FROM charges WHERE charge_key = ?", (charge_key,)).fetchone()
    return row is not None


def charged_keys_since(conn: sqlite3.Connection, end_time_min: int) -> set[str]:
    """charge_key of every run that ended at or after end_time_min (epoch s)."""
    rows = conn.execute(
        "SELECT charge_key FROM charges WHERE end_time >= ?", (int(end_time_min),)
    ).fetchall()
    return {r[0] for r in rows}


def newest_charge_end(conn: sqlite3.Connection) -> int | None:
    """The latest end_time of any charged run, None when nothing was charged yet."""
    row = conn.execute("SELECT MAX(end_time) FROM charges").fetchone()
    return None if row is None or row[0] is None else int(row[0])


def insert_charge(conn: sqlite3.Connection, values: dict[str, object]) -> bool:
    """Insert one charged run; False (and no change) when its charge_key already exists."""
    params = tuple(values.get(c.strip("`")) for c in _CHARGE_COLUMNS)
    return _insert_if_absent(conn, SQL_INSERT_CHARGE, "charge_key", params)


def set_charge_released(conn: sqlite3.Connection, charge_key: str, elements: int) -> None:
    """Record how many preallocated elements the charge of a run released."""
    conn.execute(
        "UPDATE charges SET released_prealloc = ? WHERE charge_key = ?", (elements, charge_key)
    )


def _minutes_sql(exact: str, per_minute: int, conn: object = None) -> str:
    """SQL of ledger.minutes_from_exact (ceil) on an integer expression, for any sign:
    integer division truncates toward zero (SQLite's / and MariaDB's DIV), which is the
    ceiling below 0."""
    return (
        f"(CASE WHEN {exact} > 0 THEN {_idiv(conn, f'{exact} + {per_minute - 1}', per_minute)} "
        f"ELSE {_idiv(conn, exact, per_minute)} END)"
    )


def add_owner_consumption(
    conn: sqlite3.Connection, kind: str, name: str, cpu_s: int, gpu_ms: int
) -> None:
    """Add exact consumption (CPU-s, GPU-ms) to a user/account, creating it if absent.

    The seed's minute columns are rewritten from the new exact values by the one rule.
    """
    table, key = _owner_table(kind)
    cpu_key = _DEFAULT_QUOTA_KEY.format(kind=kind, resource="cpu")
    gpu_key = _DEFAULT_QUOTA_KEY.format(kind=kind, resource="gpu")
    if not is_mariadb(conn) or conn.execute(
        f"SELECT 1 FROM {table} WHERE {key} = ?", (name,)
    ).fetchone() is None:
        _insert_if_absent(
            conn,
            f"INSERT INTO {table} ({key}, total_consumed_cpu_minutes, quota_cpu_minutes, "
            f"total_consumed_gpu_minutes, quota_gpu_minutes, last_updated) VALUES (?, 0, "
            f"COALESCE((SELECT {_as_integer(conn, 'value')} FROM settings WHERE `key` = ?), "
            f"-1), 0, COALESCE((SELECT {_as_integer(conn, 'value')} FROM settings "
            f"WHERE `key` = ?), -1), CURRENT_TIMESTAMP)",
            key,
            (name, cpu_key, gpu_key),
        )
    # The right-hand sides all read the old row: the minutes come from old + delta. (The
    # minutes are assigned first so that this holds even where assignments run left to right,
    # as in MariaDB without SIMULTANEOUS_ASSIGNMENT.)
    conn.execute(
        f"UPDATE {table} SET "
        f"total_consumed_cpu_minutes = {_minutes_sql('(consumed_cpu_s + :cpu)', 60, conn)}, "
        f"total_consumed_gpu_minutes = "
        f"{_minutes_sql('(consumed_gpu_ms + :gpu)', 60000, conn)}, "
        f"consumed_cpu_s = consumed_cpu_s + :cpu, "
        f"consumed_gpu_ms = consumed_gpu_ms + :gpu, "
        f"last_updated = CURRENT_TIMESTAMP WHERE {key} = :name",
        {"cpu": int(cpu_s), "gpu": int(gpu_ms), "name": name},
    )


def owner_consumed_exact(conn: sqlite3.Connection, kind: str, name: str) -> tuple | None:
    """(consumed CPU-s, consumed GPU-ms) of a user/account, or None when it has no row."""
    table, key = _owner_table(kind)
    row = conn.execute(
        f"SELECT consumed_cpu_s, consumed_gpu_ms FROM {table} WHERE {key} = ?", (name,)
    ).fetchone()
    return None if row is None else (int(row[0]), int(row[1]))


def set_consumed(conn: sqlite3.Connection, kind: str, name: str, cpu_s: int, gpu_ms: int) -> bool:
    """Overwrite one owner's exact totals and their minutes (adjust, check's repair)."""
    table, key = _owner_table(kind)
    cur = conn.execute(
        f"UPDATE {table} SET consumed_cpu_s = :cpu, consumed_gpu_ms = :gpu, "
        f"total_consumed_cpu_minutes = {_minutes_sql(':cpu', 60, conn)}, "
        f"total_consumed_gpu_minutes = {_minutes_sql(':gpu', 60000, conn)}, "
        f"last_updated = CURRENT_TIMESTAMP WHERE {key} = :name",
        {"cpu": int(cpu_s), "gpu": int(gpu_ms), "name": name},
    )
    return cur.rowcount == 1


def insert_consumption_adjustment(
    conn: sqlite3.Connection, kind: str, name: str, cpu_s: int, gpu_ms: int, reason: str
) -> None:
    """Record a change of consumption that is no charged run (adjust), to keep totals checkable."""
    _owner_table(kind)
    conn.execute(
        "INSERT INTO consumption_adjustments (owner_kind, owner, cpu_s, gpu_ms, reason) "
        "VALUES (?, ?, ?, ?, ?)",
        (kind, name, int(cpu_s), int(gpu_ms), reason),
    )


def _consumed_sums(kind: str) -> str:
    table, key = _owner_table(kind)
    charge_key = "username" if kind == "user" else "account"
    return (
        f"SELECT t.{key}, t.consumed_cpu_s, t.consumed_gpu_ms, "
        f"t.total_consumed_cpu_minutes, t.total_consumed_gpu_minutes, "
        f"COALESCE(c.cpu, 0) + COALESCE(a.cpu, 0), COALESCE(c.gpu, 0) + COALESCE(a.gpu, 0) "
        f"FROM {table} AS t "
        f"LEFT JOIN (SELECT {charge_key} AS name, SUM(cpu_s) AS cpu, SUM(gpu_ms) AS gpu "
        f"FROM charges GROUP BY {charge_key}) AS c ON c.name = t.{key} "
        f"LEFT JOIN (SELECT owner AS name, SUM(cpu_s) AS cpu, SUM(gpu_ms) AS gpu "
        f"FROM consumption_adjustments WHERE owner_kind = '{kind}' GROUP BY owner) AS a "
        f"ON a.name = t.{key} "
    )


def consumed_drift(conn: sqlite3.Connection, kind: str) -> list[tuple]:
    """Owners whose exact totals differ from Σ charges + Σ adjustments, or whose minute
    columns differ from the one rule applied to the stored exact totals.

    Rows of (name, stored cpu_s, stored gpu_ms, stored cpu min, stored gpu min, actual cpu_s,
    actual gpu_ms), by name.
    """
    _, key = _owner_table(kind)
    cpu_min = _minutes_sql("consumed_cpu_s", 60, conn)
    gpu_min = _minutes_sql("consumed_gpu_ms", 60000, conn)
    sql = (
        _consumed_sums(kind)
        + f"WHERE {_differs(conn, 't.consumed_cpu_s', 'COALESCE(c.cpu, 0) + COALESCE(a.cpu, 0)')} "
        f"OR {_differs(conn, 't.consumed_gpu_ms', 'COALESCE(c.gpu, 0) + COALESCE(a.gpu, 0)')} "
        f"OR {_differs(conn, 't.total_consumed_cpu_minutes', cpu_min)} "
        f"OR {_differs(conn, 't.total_consumed_gpu_minutes', gpu_min)} "
        f"ORDER BY t.{key}"
    )
    return _usage_rows(conn, sql)


def consumed_of(conn: sqlite3.Connection, kind: str, name: str) -> tuple | None:
    """consumed_drift's row for one owner (name first), drifted or not; None without a row."""
    _, key = _owner_table(kind)
    rows = _usage_rows(conn, _consumed_sums(kind) + f"WHERE t.{key} = :name", {"name": name})
    return rows[0] if rows else None


def release_preallocation(
    conn: sqlite3.Connection, job_uuid: str, *, all_elements: bool = False
) -> int:
    """Release one array element's share (or all of them); return the elements released.

    array_size counts elements not yet charged: decrement it, delete the row at 0.
    """
    row = conn.execute(
        "SELECT array_size FROM jobs_preallocations WHERE job_uuid = ?" + _for_update(conn),
        (job_uuid,),
    ).fetchone()
    if row is None:
        return 0
    size = 1 if row[0] is None else int(row[0])
    if all_elements or size <= 1:
        conn.execute("DELETE FROM jobs_preallocations WHERE job_uuid = ?", (job_uuid,))
        return max(size, 1) if all_elements else 1
    conn.execute(
        "UPDATE jobs_preallocations SET array_size = array_size - 1 WHERE job_uuid = ?",
        (job_uuid,),
    )
    return 1


def list_preallocations(
    conn: sqlite3.Connection, *, username: str | None = None, account: str | None = None
) -> list[sqlite3.Row]:
    """Open preallocation rows, optionally only one user's and/or one account's."""
    sql = (
        "SELECT job_uuid, username, account, preallocated_cpu_minutes, "
        "preallocated_gpu_minutes, array_size, created_at, cluster FROM jobs_preallocations"
    )
    clause, params = _where(("username = ?", username), ("account = ?", account))
    return conn.execute(sql + clause, params).fetchall()


def delete_preallocation(conn: sqlite3.Connection, job_uuid: str) -> bool:
    """Delete one preallocation row; False when it was already gone."""
    cur = conn.execute("DELETE FROM jobs_preallocations WHERE job_uuid = ?", (job_uuid,))
    return cur.rowcount == 1


def _prunable_where(kind: str) -> str:
    table, key = _owner_table(kind)
    prealloc_key = "username" if kind == "user" else "account"
    return (
        f"COALESCE(t.total_consumed_cpu_minutes, 0) = 0 "
        f"AND COALESCE(t.total_consumed_gpu_minutes, 0) = 0 "
        f"AND COALESCE(t.quota_cpu_minutes, -1) = -1 "
        f"AND COALESCE(t.quota_gpu_minutes, -1) = -1 "
        f"AND NOT EXISTS (SELECT 1 FROM jobs_preallocations p "
        f"WHERE p.{prealloc_key} = t.{key})"
    )


def prunable_owners(
    conn: sqlite3.Connection, kind: str, name: str | None = None
) -> list[sqlite3.Row]:
    """Users/accounts with no quota set, nothing consumed and no open preallocation."""
    table, key = _owner_table(kind)
    sql = (
        f"SELECT t.{key} AS name, t.total_consumed_cpu_minutes, t.quota_cpu_minutes, "
        f"t.total_consumed_gpu_minutes, t.quota_gpu_minutes, t.last_updated "
        f"FROM {table} AS t WHERE {_prunable_where(kind)}"
    )
    params: tuple = ()
    if name is not None:
        sql += f" AND t.{key} = ?"
        params = (name,)
    return conn.execute(sql + f" ORDER BY t.{key}", params).fetchall()


def delete_prunable_owner(conn: sqlite3.Connection, kind: str, name: str) -> bool:
    """Delete a user/account only if it is still prunable (checked in the same statement)."""
    table, key = _owner_table(kind)
    cur = conn.execute(
        f"DELETE FROM {table} WHERE {key} = ? AND {key} IN "
        f"(SELECT t.{key} FROM {table} AS t WHERE {_prunable_where(kind)})",
        (name,),
    )
    return cur.rowcount == 1


# ---------------------------------------------------------------------------------------
# Section: ledger check (`slurm-quota check`)
# ---------------------------------------------------------------------------------------
_SCHEMA_OBJECT = re.compile(
    r"^\s*(CREATE|DROP)\s+(TRIGGER|INDEX)\s+IF\s+(?:NOT\s+)?EXISTS\s+(\w+)", re.I | re.M
)


def expected_schema_objects(conn: object = None) -> list[tuple[str, str]]:
    """(type, name) of every trigger and index the migrations leave, in creation order
    (those of migrations/mariadb/ for a MariaDB connection)."""
    found: dict[tuple[str, str], None] = {}
    files = mariadb_migration_files() if is_mariadb(conn) else migration_files()
    for _version, path in files:
        for verb, kind, name in _SCHEMA_OBJECT.findall(path.read_text(encoding="utf-8")):
            if verb.upper() == "CREATE":
                found[(kind.lower(), name)] = None
            else:
                found.pop((kind.lower(), name), None)
    return list(found)


def schema_objects(conn: sqlite3.Connection) -> set[tuple[str, str]]:
    """(type, name) of the triggers and indexes in the database."""
    if is_mariadb(conn):
        rows = _usage_rows(
            conn,
            "SELECT 'trigger', TRIGGER_NAME FROM information_schema.TRIGGERS "
            "WHERE TRIGGER_SCHEMA = DATABASE() UNION "
            "SELECT 'index', INDEX_NAME FROM information_schema.STATISTICS "
            "WHERE TABLE_SCHEMA = DATABASE() AND INDEX_NAME <> 'PRIMARY'",
        )
        return {(str(kind), str(name)) for kind, name in rows}
    rows = _usage_rows(
        conn, "SELECT type, name FROM sqlite_master WHERE type IN ('trigger', 'index')"
    )
    return {(str(kind), str(name)) for kind, name in rows}


def quick_check(conn: sqlite3.Connection) -> list[str]:
    """PRAGMA quick_check: [] when SQLite finds the file sound, else its messages.

    MariaDB: CHECK TABLE of every ledger table ([] when each is OK).
    """
    if is_mariadb(conn):
        sql = "SHOW FULL TABLES WHERE Table_type = 'BASE TABLE'"
        tables = [r[0] for r in _usage_rows(conn, sql)]
        if not tables:
            return []
        rows = _usage_rows(conn, "CHECK TABLE " + ", ".join(f"`{t}`" for t in tables))
        return [
            f"{table}: {text}"
            for table, _op, msg_type, text in rows
            if str(msg_type).lower() in ("error", "warning") or (
                str(msg_type).lower() == "status" and str(text).upper() != "OK"
            )
        ]
    try:
        messages = [str(row[0]) for row in conn.execute("PRAGMA quick_check").fetchall()]
    except DatabaseDamaged as err:  # damaged past what quick_check can list
        return [str(err.__cause__ or err)]
    except sqlite3.DatabaseError as err:
        if _is_damaged(err):
            return [str(err)]
        if _is_locked(err):
            raise DatabaseUnavailable(f"The database is locked: {err}.") from err
        raise DatabaseUnavailable(f"Cannot read the database: {err}.") from err
    return [] if messages == ["ok"] else messages


# Migration 0003's definition of the reserved totals over a set of preallocations: NULL
# array_size counts as one element, a NULL GPU amount as 0; TOTAL() cannot overflow.
def _reserved_sums(conn: object) -> str:
    return (
        f"{_total(conn, 'preallocated_cpu_minutes * COALESCE(array_size, 1)')} AS cpu, "
        f"{_total(conn, 'COALESCE(preallocated_gpu_minutes, 0) * COALESCE(array_size, 1)')} "
        f"AS gpu, {_total(conn, 'COALESCE(array_size, 1)')} AS jobs"
    )


def reserved_drift(conn: sqlite3.Connection, kind: str) -> list[tuple]:
    """Owners whose stored reserved totals differ from their preallocations.

    Rows of (name, stored cpu, stored gpu, stored jobs, actual cpu, actual gpu, actual jobs),
    by name; one pass over jobs_preallocations.
    """
    table, key = _owner_table(kind)
    sql = (
        f"SELECT t.{key}, t.reserved_cpu_minutes, t.reserved_gpu_minutes, t.reserved_jobs, "
        f"COALESCE(p.cpu, 0), COALESCE(p.gpu, 0), COALESCE(p.jobs, 0) "
        f"FROM {table} AS t LEFT JOIN ("
        f"SELECT {key} AS name, {_reserved_sums(conn)} FROM jobs_preallocations "
        f"GROUP BY {key}) AS p ON p.name = t.{key} "
        f"WHERE {_differs(conn, 't.reserved_cpu_minutes', 'COALESCE(p.cpu, 0)')} "
        f"OR {_differs(conn, 't.reserved_gpu_minutes', 'COALESCE(p.gpu, 0)')} "
        f"OR {_differs(conn, 't.reserved_jobs', 'COALESCE(p.jobs, 0)')} "
        f"ORDER BY t.{key}"
    )
    return _usage_rows(conn, sql)


def reserved_of(conn: sqlite3.Connection, kind: str, name: str) -> tuple | None:
    """(stored cpu, stored gpu, stored jobs, actual cpu, actual gpu, actual jobs) of one owner,
    None without a row; the actual sums read through the owner's index."""
    table, key = _owner_table(kind)
    rows = _usage_rows(
        conn,
        f"SELECT t.reserved_cpu_minutes, t.reserved_gpu_minutes, t.reserved_jobs, p.* "
        f"FROM {table} AS t, (SELECT {_reserved_sums(conn)} FROM jobs_preallocations "
        f"WHERE {key} = :name) AS p WHERE t.{key} = :name",
        {"name": name},
    )
    return rows[0] if rows else None


def unowned_preallocations(conn: sqlite3.Connection, kind: str) -> list[tuple[str, int]]:
    """(owner name, preallocations) for preallocations whose user/account has no row."""
    table, key = _owner_table(kind)
    sql = (
        f"SELECT p.{key}, COUNT(*) FROM jobs_preallocations AS p "
        f"WHERE NOT EXISTS (SELECT 1 FROM {table} AS t WHERE t.{key} = p.{key}) "
        f"GROUP BY p.{key} ORDER BY p.{key}"
    )
    return [(str(name), int(count)) for name, count in _usage_rows(conn, sql)]


def set_reserved(
    conn: sqlite3.Connection, kind: str, name: str, cpu: int, gpu: int, jobs: int
) -> bool:
    """Overwrite one owner's reserved totals (the repair of `check`); True when the row exists."""
    table, key = _owner_table(kind)
    cur = conn.execute(
        f"UPDATE {table} SET reserved_cpu_minutes = ?, reserved_gpu_minutes = ?, "
        f"reserved_jobs = ? WHERE {key} = ?",
        (cpu, gpu, jobs, name),
    )
    return cur.rowcount == 1


# ---------------------------------------------------------------------------------------
# Section: allocation periods (migration 0006) -- issue 18
# ---------------------------------------------------------------------------------------
# Owner kinds come only from _OWNER_TABLES (and 'site' for the default rule).


def period_rule(conn: sqlite3.Connection, kind: str, name: str) -> tuple | None:
    """(spec, carry_over_percent, time_zone) of an owner's own rule ('site', '' = default)."""
    row = conn.execute(
        "SELECT spec, carry_over_percent, time_zone FROM period_rules "
        "WHERE owner_kind = ? AND owner = ?",
        (kind, name),
    ).fetchone()
    return None if row is None else (str(row[0]), int(row[1]), row[2])


def period_time_zone(conn: sqlite3.Connection) -> str | None:
    """The site's time zone of calendar boundaries, None when not set."""
    row = period_rule(conn, "site", "")
    return None if row is None or not row[2] else str(row[2])


def set_period_rule(
    conn: sqlite3.Connection, kind: str, name: str, spec: str, percent: int, tz: str | None
) -> None:
    """Insert or replace the period rule of an owner (or of the site)."""
    conn.execute(
        # REPLACE: both engines (no trigger or foreign key involves this table)
        "REPLACE INTO period_rules (owner_kind, owner, spec, carry_over_percent, time_zone) "
        "VALUES (?, ?, ?, ?, ?)",
        (kind, name, spec, int(percent), tz),
    )


def delete_period_rule(conn: sqlite3.Connection, kind: str, name: str) -> bool:
    """Remove an owner's own rule; False when it had none."""
    cur = conn.execute(
        "DELETE FROM period_rules WHERE owner_kind = ? AND owner = ?", (kind, name)
    )
    return cur.rowcount == 1


def periods_in_use(conn: sqlite3.Connection) -> bool:
    """Any rule other than none, or any owner still in a period (one indexed probe each)."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM period_rules WHERE spec <> 'none') "
        "OR EXISTS (SELECT 1 FROM period_state)"
    ).fetchone()
    return bool(row[0])


def period_state(conn: sqlite3.Connection, kind: str, name: str) -> sqlite3.Row | None:
    """The current period of an owner, or None."""
    return conn.execute(
        "SELECT owner_kind, owner, spec, period_start, period_end, window_aged_until, "
        "carry_in_cpu_s, carry_in_gpu_ms FROM period_state WHERE owner_kind = ? AND owner = ?",
        (kind, name),
    ).fetchone()


def set_period_state(
    conn: sqlite3.Connection,
    kind: str,
    name: str,
    spec: str,
    start: int,
    end: int | None,
    aged_until: int | None,
    carry_in_cpu_s: int,
    carry_in_gpu_ms: int,
) -> None:
    """Insert or replace the current period of an owner."""
    conn.execute(
        # REPLACE: both engines (no trigger or foreign key involves this table)
        "REPLACE INTO period_state (owner_kind, owner, spec, period_start, period_end, "
        "window_aged_until, carry_in_cpu_s, carry_in_gpu_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (kind, name, spec, int(start), end, aged_until, int(carry_in_cpu_s), int(carry_in_gpu_ms)),
    )


def delete_period_state(conn: sqlite3.Connection, kind: str, name: str) -> None:
    """Forget an owner's current period (its rule became none)."""
    conn.execute("DELETE FROM period_state WHERE owner_kind = ? AND owner = ?", (kind, name))


def insert_period_archive(
    conn: sqlite3.Connection,
    kind: str,
    name: str,
    spec: str,
    start: int,
    end: int,
    quota_cpu_minutes: int,
    quota_gpu_minutes: int,
    used_cpu_s: int,
    used_gpu_ms: int,
    carry_in_cpu_s: int,
    carry_in_gpu_ms: int,
    carry_out_cpu_s: int,
    carry_out_gpu_ms: int,
) -> None:
    """Archive one closed period of an owner."""
    conn.execute(
        "INSERT INTO period_archive (owner_kind, owner, spec, period_start, period_end, "
        "quota_cpu_minutes, quota_gpu_minutes, used_cpu_s, used_gpu_ms, carry_in_cpu_s, "
        "carry_in_gpu_ms, carry_out_cpu_s, carry_out_gpu_ms) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (kind, name, spec, int(start), int(end), int(quota_cpu_minutes), int(quota_gpu_minutes),
         int(used_cpu_s), int(used_gpu_ms), int(carry_in_cpu_s), int(carry_in_gpu_ms),
         int(carry_out_cpu_s), int(carry_out_gpu_ms)),
    )  # fmt: skip


def add_period_archive_late(
    conn: sqlite3.Connection, kind: str, name: str, end_time: int, cpu_s: int, gpu_ms: int
) -> bool:
    """Add a run charged after its period closed to that period's archive row; False when no
    archived period of the owner contains end_time."""
    cur = conn.execute(
        "UPDATE period_archive SET used_cpu_s = used_cpu_s + :cpu, "
        "used_gpu_ms = used_gpu_ms + :gpu, late_cpu_s = late_cpu_s + :cpu, "
        "late_gpu_ms = late_gpu_ms + :gpu WHERE owner_kind = :kind AND owner = :name "
        "AND period_start <= :t AND :t < period_end",
        {"cpu": int(cpu_s), "gpu": int(gpu_ms), "kind": kind, "name": name, "t": int(end_time)},
    )
    return cur.rowcount >= 1


def charge_sums_ended_between(
    conn: sqlite3.Connection, kind: str, name: str, after: int, until: int
) -> tuple[int, int]:
    """(Σ cpu_s, Σ gpu_ms) of an owner's charged runs with after < end_time <= until."""
    column = "username" if kind == "user" else "account"
    _owner_table(kind)
    row = conn.execute(
        f"SELECT COALESCE(SUM(cpu_s), 0), COALESCE(SUM(gpu_ms), 0) FROM charges "
        f"WHERE {column} = ? AND end_time > ? AND end_time <= ?",
        (name, int(after), int(until)),
    ).fetchone()
    return int(row[0]), int(row[1])


def period_owners(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    """Every (kind, name) the upkeep looks at: all users and accounts when a site default
    applies, else those with a rule or a period of their own."""
    site = period_rule(conn, "site", "")
    if site is not None and site[0] != "none":
        rows = conn.execute(
            "SELECT 'user', username FROM users UNION ALL SELECT 'account', account FROM accounts"
        ).fetchall()
    else:
        rows = conn.execute(
            "SELECT owner_kind, owner FROM period_rules WHERE owner_kind IN ('user', 'account') "
            "UNION SELECT owner_kind, owner FROM period_state"
        ).fetchall()
    return sorted({(str(r[0]), str(r[1])) for r in rows})


def period_overview(conn: sqlite3.Connection) -> list[tuple]:
    """(kind, name, state spec, start, end, carry-in cpu_s, carry-in gpu_ms, own rule spec,
    own carry %) of every owner with a period or a rule of its own, by kind and name."""
    return [
        tuple(r)
        for r in conn.execute(
            "SELECT k.owner_kind, k.owner, s.spec, s.period_start, s.period_end, "
            "s.carry_in_cpu_s, s.carry_in_gpu_ms, r.spec, r.carry_over_percent FROM "
            "(SELECT owner_kind, owner FROM period_state UNION SELECT owner_kind, owner "
            "FROM period_rules WHERE owner_kind IN ('user', 'account')) AS k "
            "LEFT JOIN period_state AS s ON s.owner_kind = k.owner_kind AND s.owner = k.owner "
            "LEFT JOIN period_rules AS r ON r.owner_kind = k.owner_kind AND r.owner = k.owner "
            "ORDER BY k.owner_kind, k.owner"
        ).fetchall()
    ]


def period_archive_at(
    conn: sqlite3.Connection, at: int, kind: str | None = None, name: str | None = None
) -> list[sqlite3.Row]:
    """Archived periods containing the instant at, optionally of one owner, by kind, name."""
    sql = (
        "SELECT owner_kind, owner, spec, period_start, period_end, quota_cpu_minutes, "
        "quota_gpu_minutes, used_cpu_s, used_gpu_ms, carry_in_cpu_s, carry_in_gpu_ms, "
        "carry_out_cpu_s, carry_out_gpu_ms, late_cpu_s, late_gpu_ms FROM period_archive "
        "WHERE period_start <= ? AND ? < period_end"
    )
    params: list[object] = [int(at), int(at)]
    if kind is not None and name is not None:
        sql += " AND owner_kind = ? AND owner = ?"
        params += [kind, name]
    return conn.execute(sql + " ORDER BY owner_kind DESC, owner", params).fetchall()


def read_charges_ended_between(
    conn: sqlite3.Connection,
    start: int,
    end: int,
    *,
    username: str | None = None,
    account: str | None = None,
    limit: int,
) -> list[sqlite3.Row]:
    """read_charges' rows of the runs that ended in [start, end) (a period), newest first."""
    sql = _SELECT_CHARGE_ROWS
    clause, params = _where(
        ("username = ?", username), ("account = ?", account), ("end_time >= ?", int(start)),
        ("end_time < ?", int(end)),
    )  # fmt: skip
    sql += clause + " ORDER BY id DESC LIMIT ?"
    return conn.execute(sql, [*params, int(limit)]).fetchall()


def read_journal_between(
    conn: sqlite3.Connection,
    start_utc: str,
    end_utc: str,
    *,
    target_kind: str | None = None,
    target: str | None = None,
    limit: int,
) -> list[sqlite3.Row]:
    """read_journal's rows written in [start_utc, end_utc) ('YYYY-MM-DD HH:MM:SS' UTC)."""
    sql = _SELECT_JOURNAL_ROWS + " WHERE at >= ? AND at < ?"
    params: list[object] = [start_utc, end_utc]
    if target_kind is not None and target is not None:
        sql += " AND target_kind = ? AND target = ?"
        params += [target_kind, target]
    sql += " ORDER BY id DESC LIMIT ?"
    params.append(int(limit))
    return conn.execute(sql, params).fetchall()


# ---------------------------------------------------------------------------------------
# Section: forecasts and usage over time (issue 18)
# ---------------------------------------------------------------------------------------


def first_charge_end(conn: sqlite3.Connection) -> int | None:
    """The earliest end_time of any charged run (None when nothing was charged)."""
    row = conn.execute("SELECT MIN(end_time) FROM charges").fetchone()
    return None if row is None or row[0] is None else int(row[0])


def charge_sums_by_owner_since(
    conn: sqlite3.Connection, kind: str, since: int, until: int
) -> dict[str, tuple[int, int]]:
    """{owner: (Σ cpu_s, Σ gpu_ms)} of the runs that ended in [since, until]."""
    _owner_table(kind)
    column = "username" if kind == "user" else "account"
    rows = conn.execute(
        f"SELECT {column}, SUM(cpu_s), SUM(gpu_ms) FROM charges WHERE end_time >= ? "
        f"AND end_time <= ? GROUP BY {column}",
        (int(since), int(until)),
    ).fetchall()
    return {str(r[0]): (int(r[1] or 0), int(r[2] or 0)) for r in rows if r[0] is not None}


def period_states(conn: sqlite3.Connection, kind: str) -> dict[str, tuple[int, int | None]]:
    """{owner: (period_start, period_end)} of every owner of a kind in a period."""
    rows = conn.execute(
        "SELECT owner, period_start, period_end FROM period_state WHERE owner_kind = ?", (kind,)
    ).fetchall()
    return {str(r[0]): (int(r[1]), None if r[2] is None else int(r[2])) for r in rows}


def charge_usage_by_bucket(
    conn: sqlite3.Connection, kind: str, name: str, since: int, bucket_s: int, offset_s: int
) -> list[tuple[int, int, int]]:
    """[(bucket start, Σ cpu_s, Σ gpu_ms)] of an owner's runs that ended at or after since,
    by end time in buckets of bucket_s seconds (shifted by offset_s: local midnights)."""
    _owner_table(kind)
    column = "username" if kind == "user" else "account"
    rows = conn.execute(
        f"SELECT ((end_time + :off) / :b) * :b - :off AS t, SUM(cpu_s), SUM(gpu_ms) "
        f"FROM charges WHERE {column} = :name AND end_time >= :since GROUP BY t ORDER BY t",
        {"off": int(offset_s), "b": int(bucket_s), "name": name, "since": int(since)},
    ).fetchall()
    return [(int(r[0]), int(r[1] or 0), int(r[2] or 0)) for r in rows]


# ---------------------------------------------------------------------------------------
# Section: usage thresholds (migration 0006) -- issue 18
# ---------------------------------------------------------------------------------------


def insert_threshold_event(
    conn: sqlite3.Connection,
    kind: str,
    name: str,
    period_start: int,
    resource: str,
    threshold_percent: int,
    usage_percent: float,
    quota_minutes: int,
    consumed_minutes: int,
    reserved_minutes: int,
    crossed_at: int,
) -> int:
    """Record a threshold crossed; 1 when new, 0 when already recorded for this period."""
    return int(_insert_if_absent(
        conn,
        "INSERT INTO threshold_events (owner_kind, owner, period_start, resource, "
        "threshold_percent, usage_percent, quota_minutes, consumed_minutes, reserved_minutes, "
        "crossed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        "owner_kind, owner, period_start, resource, threshold_percent",
        (kind, name, int(period_start), resource, int(threshold_percent), float(usage_percent),
         int(quota_minutes), int(consumed_minutes), int(reserved_minutes), int(crossed_at)),
    ))  # fmt: skip


def pending_threshold_events(conn: sqlite3.Connection, max_attempts: int) -> list[sqlite3.Row]:
    """Events whose command has not succeeded yet (fewer than max_attempts tries), oldest first."""
    return conn.execute(
        "SELECT id, owner_kind, owner, period_start, resource, threshold_percent, "
        "usage_percent, quota_minutes, consumed_minutes, reserved_minutes, crossed_at, "
        "attempts, last_error FROM threshold_events WHERE done_at IS NULL AND attempts < ? "
        "ORDER BY id",
        (int(max_attempts),),
    ).fetchall()


def finish_threshold_event(
    conn: sqlite3.Connection, event_id: int, error: str | None, now: int
) -> None:
    """Count one attempt: done (error None) or failed with its error, left pending."""
    conn.execute(
        "UPDATE threshold_events SET attempts = attempts + 1, last_error = ?, "
        "done_at = CASE WHEN ? IS NULL THEN ? ELSE NULL END WHERE id = ?",
        (error, error, int(now), int(event_id)),
    )


def threshold_events(conn: sqlite3.Connection, limit: int) -> list[sqlite3.Row]:
    """The newest threshold events, newest first."""
    return conn.execute(
        "SELECT id, owner_kind, owner, period_start, resource, threshold_percent, "
        "usage_percent, quota_minutes, consumed_minutes, reserved_minutes, crossed_at, "
        "attempts, last_error, done_at FROM threshold_events ORDER BY id DESC LIMIT ?",
        (int(limit),),
    ).fetchall()


def database_file(conn: sqlite3.Connection) -> str:
    """The file of the connection's main database (a cache key)."""
    for row in conn.execute("PRAGMA database_list").fetchall():
        if row[1] == "main":
            return str(row[2])
    return ""


def period_rules_all(conn: sqlite3.Connection) -> dict[tuple[str, str], tuple]:
    """{(kind, owner): (spec, carry_over_percent, time_zone)} of every rule, site's included."""
    rows = conn.execute(
        "SELECT owner_kind, owner, spec, carry_over_percent, time_zone FROM period_rules"
    ).fetchall()
    return {(str(r[0]), str(r[1])): (str(r[2]), int(r[3]), r[4]) for r in rows}


def period_states_all(conn: sqlite3.Connection) -> dict[tuple[str, str], tuple]:
    """{(kind, owner): (spec, period_start, period_end, window_aged_until)} of every owner."""
    rows = conn.execute(
        "SELECT owner_kind, owner, spec, period_start, period_end, window_aged_until "
        "FROM period_state"
    ).fetchall()
    return {
        (str(r[0]), str(r[1])): (
            str(r[2]), int(r[3]), None if r[4] is None else int(r[4]),
            None if r[5] is None else int(r[5]),
        )
        for r in rows
    }  # fmt: skip


def threshold_candidates(
    conn: sqlite3.Connection, min_percent: int, kind: str | None = None, name: str | None = None
) -> list[tuple]:
    """(kind, name, resource, quota, consumed, reserved, period_start, period_end) of every
    owner (or the one named) and resource with a positive quota whose consumption reached
    min_percent of it (minutes; the period columns NULL without a period)."""
    parts = []
    for owner_kind, (table, key) in _OWNER_TABLES.items():
        if kind is not None and owner_kind != kind:
            continue
        for res in ("cpu", "gpu"):
            parts.append(
                f"SELECT '{owner_kind}', t.{key}, '{res}', t.quota_{res}_minutes, "
                f"COALESCE(t.total_consumed_{res}_minutes, 0), t.reserved_{res}_minutes, "
                f"s.period_start, s.period_end FROM {table} AS t LEFT JOIN period_state AS s "
                f"ON s.owner_kind = '{owner_kind}' AND s.owner = t.{key} "
                f"WHERE t.quota_{res}_minutes > 0 AND "
                f"COALESCE(t.total_consumed_{res}_minutes, 0) * 100 >= :p * t.quota_{res}_minutes"
                + ("" if name is None else f" AND t.{key} = :name")
            )
    params = {"p": int(min_percent), "name": name}
    return [tuple(r) for r in conn.execute(" UNION ALL ".join(parts), params)]


# ---------------------------------------------------------------------------------------
# Section: whole tables (copy-ledger, the digests of `check --digest`)
# ---------------------------------------------------------------------------------------
# Every table of the ledger with its key, in an order that satisfies the foreign keys. Not
# MariaDB's schema_version: that is the schema's, stamped by migrate on each side.
LEDGER_TABLES: tuple[tuple[str, str], ...] = (
    ("users", "username"),
    ("accounts", "account"),
    ("gpu_factors", "gpu_type"),
    ("settings", "`key`"),
    ("jobs_preallocations", "job_uuid"),
    ("charges", "id"),
    ("journal", "id"),
    ("consumption_adjustments", "id"),
)
_LEDGER_TABLE_NAMES = {name for name, _ in LEDGER_TABLES}


def table_columns(conn, table: str) -> list[str]:
    """The columns of a ledger table, in their order."""
    if table not in _LEDGER_TABLE_NAMES:
        raise ValueError(f"not a ledger table: {table!r}")
    if is_mariadb(conn):
        rows = _usage_rows(
            conn,
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = "
            "DATABASE() AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
            (table,),
        )
        return [str(r[0]) for r in rows]
    return [str(r[1]) for r in _usage_rows(conn, f"PRAGMA table_info({table})")]


def _quoted(columns: list[str]) -> str:
    return ", ".join(f"`{c}`" for c in columns)


def table_rows(conn, table: str, columns: list[str]) -> Iterator[tuple]:
    """Every row of a ledger table as plain tuples, in key order (the same on both engines:
    names compare byte for byte on both)."""
    key = dict(LEDGER_TABLES)[table]
    cursor = conn.cursor()
    cursor.row_factory = None
    cursor.execute(f"SELECT {_quoted(columns)} FROM {table} ORDER BY {key}")
    while True:
        batch = cursor.fetchmany(1000)
        if not batch:
            return
        yield from (tuple(r) for r in batch)


def count_rows(conn, table: str) -> int:
    """The number of rows of a ledger table."""
    if table not in _LEDGER_TABLE_NAMES:
        raise ValueError(f"not a ledger table: {table!r}")
    return int(_usage_rows(conn, f"SELECT COUNT(*) FROM {table}")[0][0])


def insert_rows(conn, table: str, columns: list[str], rows: list[tuple]) -> None:
    """Insert rows verbatim (every column given, the ids too)."""
    if table not in _LEDGER_TABLE_NAMES:
        raise ValueError(f"not a ledger table: {table!r}")
    marks = ", ".join("?" for _ in columns)
    conn.executemany(f"INSERT INTO {table} ({_quoted(columns)}) VALUES ({marks})", rows)


def delete_all_rows(conn, table: str) -> None:
    """Empty a ledger table (copy-ledger --replace; the triggers keep the totals)."""
    if table not in _LEDGER_TABLE_NAMES:
        raise ValueError(f"not a ledger table: {table!r}")
    conn.execute(f"DELETE FROM {table}")


def restore_owner_columns(
    conn, kind: str, columns: list[str], rows: list[tuple]
) -> None:
    """Overwrite columns of existing user/account rows with the given values (name first):
    the totals the triggers recomputed while preallocations were copied go back to what the
    source held, drift and all, so the copy is exact."""
    table, key = _owner_table(kind)
    assignments = ", ".join(f"`{c}` = ?" for c in columns)
    conn.executemany(
        f"UPDATE {table} SET {assignments} WHERE {key} = ?",
        [(*values, name) for name, *values in rows],
    )
