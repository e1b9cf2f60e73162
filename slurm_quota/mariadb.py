"""The MariaDB ledger's connection: PyMySQL behind the small part of sqlite3's API db.py uses.

Owns: connecting (credentials from slurm_quota.config, never from a command line), the
session settings every connection of ours has, turning db.py's `?` / `:name` placeholders
into PyMySQL's, rows that answer by index and by column name (as sqlite3.Row), mapping
server errors to slurm-quota's (locked and unreachable: exit 75, as SQLite's busy), and
reading migrations/mariadb/*.sql statement by statement. It is the only module that imports
pymysql. It must not hold ledger SQL (db.py does) nor any business rule.

Session settings (docs/design.md, "The ledger on MariaDB"): time_zone '+00:00' (CURRENT_TIMESTAMP
is UTC, as SQLite's), READ COMMITTED (each statement of a write sees what others committed,
as SQLite writers serialised by BEGIN IMMEDIATE do), innodb_lock_wait_timeout (the busy
timeout), and a strict sql_mode with SIMULTANEOUS_ASSIGNMENT (an UPDATE's right-hand sides
read the old row, as in SQLite).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import pymysql
import pymysql.converters
from pymysql.constants import CLIENT, FIELD_TYPE

from slurm_quota.config import ConfigError, MariaDBLedger
from slurm_quota.errors import (
    DatabaseMissing,
    DatabaseUnavailable,
    NotPermitted,
    SchemaError,
    SlurmQuotaError,
)

CONNECT_TIMEOUT_S = 5
# A statement that waits longer than this for the server gives up (a black-holed server).
READ_TIMEOUT_S = 60
SQL_MODE = (
    "STRICT_TRANS_TABLES,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION,"
    "NO_AUTO_VALUE_ON_ZERO,SIMULTANEOUS_ASSIGNMENT"
)
# Server error numbers (MariaDB's include/mysqld_error.h and errmsg.h).
ER_DUP_ENTRY = 1062
_LOCKED = {1205, 1213}  # lock wait timeout, deadlock (the transaction was rolled back)
_UNREACHABLE = {2002, 2003, 2005, 2006, 2013, 2055, 1040, 1053, 1927}
_DENIED = {1044, 1045, 1142, 1143, 1227, 1370}
_NO_DATABASE = 1049
_NO_TABLE = 1146
_TLS_FAILED = 2026  # CR_SSL_CONNECTION_ERROR: no TLS, or a certificate that does not verify
_IN_TRANS = 1  # SERVER_STATUS_IN_TRANS


def _decimal(text: bytes | str) -> int | float:
    # SUM() of integers is DECIMAL: give db.py's callers what SQLite gives them (int), so
    # JSON output and comparisons are the same on both engines.
    value = text.decode() if isinstance(text, bytes) else text
    if "." not in value or value.rstrip("0").endswith("."):
        return int(value.split(".")[0])
    return float(value)


def _as_text(text: bytes | str) -> str:
    return text.decode() if isinstance(text, bytes) else text


# DATETIME as SQLite returns CURRENT_TIMESTAMP ('YYYY-MM-DD HH:MM:SS' text), DECIMAL as int.
CONVERSIONS = dict(pymysql.converters.conversions)
CONVERSIONS[FIELD_TYPE.NEWDECIMAL] = _decimal
CONVERSIONS[FIELD_TYPE.DECIMAL] = _decimal
CONVERSIONS[FIELD_TYPE.DATETIME] = _as_text
CONVERSIONS[FIELD_TYPE.TIMESTAMP] = _as_text


class Row(tuple):
    """A result row: by index like a tuple, by column name like sqlite3.Row."""

    def __new__(cls, values: tuple, index: dict[str, int]) -> Row:
        row = super().__new__(cls, values)
        row._index = index  # type: ignore[attr-defined]
        return row

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        if isinstance(key, str):
            return tuple.__getitem__(self, self._index[key])  # type: ignore[attr-defined]
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        """Column names, in order."""
        return list(self._index)  # type: ignore[attr-defined]


@lru_cache(maxsize=512)
def translate(sql: str) -> str:
    """db.py's SQL (`?`, `:name`) in PyMySQL's form (`%s`, `%(name)s`, a literal % doubled).

    Quoted strings and identifiers are copied unchanged.
    """
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch in "'\"`":
            end = i + 1
            while end < n:
                if sql[end] == ch:
                    if end + 1 < n and sql[end + 1] == ch:  # doubled quote inside
                        end += 2
                        continue
                    break
                end += 1
            out.append(sql[i : end + 1].replace("%", "%%"))
            i = end + 1
            continue
        if ch == "?":
            out.append("%s")
        elif ch == ":" and i + 1 < n and (sql[i + 1].isalpha() or sql[i + 1] == "_"):
            m = re.match(r"[A-Za-z_][A-Za-z0-9_]*", sql[i + 1 :])
            assert m is not None
            out.append(f"%({m.group(0)})s")
            i += 1 + m.end()
            continue
        elif ch == "%":
            out.append("%%")
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def is_duplicate_key(err: BaseException) -> bool:
    """True for the server's `Duplicate entry` (a unique key already holds the value)."""
    return isinstance(err, pymysql.err.IntegrityError) and err.args[:1] == (ER_DUP_ENTRY,)


def map_error(err: pymysql.err.MySQLError, where: str) -> SlurmQuotaError | None:
    """The slurm-quota error a person reads for a server error, or None (a bug: re-raise).

    `where` names the ledger (config.MariaDBLedger.describe(): no password); the server's
    own messages never hold the password either.
    """
    code = err.args[0] if err.args and isinstance(err.args[0], int) else None
    text = err.args[1] if len(err.args) > 1 else str(err)
    if code in _LOCKED:
        return DatabaseUnavailable(f"The database {where} is locked: {text} ({code}).")
    if code in _UNREACHABLE or (code is None and isinstance(err, pymysql.err.OperationalError)):
        return DatabaseUnavailable(f"The MariaDB ledger {where} is not reachable: {text}.")
    if code == _NO_DATABASE:
        return DatabaseMissing(
            f"The database {where} does not exist on the server: {text}. Create it (CREATE "
            f"DATABASE, GRANT: docs/install.md), then run `slurm-quota migrate`."
        )
    if code in _DENIED:
        return NotPermitted(
            f"The MariaDB server refused {where}: {text}. Check StorageUser/StoragePass in "
            f"the configuration file and the user's GRANTs (docs/install.md)."
        )
    if code == _TLS_FAILED:
        return ConfigError(
            f"TLS to the MariaDB ledger {where} failed ({text}); nothing was sent unencrypted. "
            f"Check that the server has TLS on and StorageTLSCA/StorageTLSCert/StorageTLSKey "
            f"in the configuration file."
        )
    if code == _NO_TABLE:
        return SchemaError(
            f"The database {where} lacks a table of the ledger ({text}). Run `slurm-quota migrate`."
        )
    return None


def _reraise(err: pymysql.err.MySQLError, where: str) -> None:
    mapped = map_error(err, where)
    if mapped is not None:
        raise mapped from err


class Cursor:
    """The part of sqlite3.Cursor db.py uses, over a PyMySQL cursor."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.row_factory: Any = Row
        self._cursor = connection.raw.cursor()

    @property
    def rowcount(self) -> int:
        """Rows matched by the last UPDATE/DELETE (CLIENT_FOUND_ROWS), inserted by INSERT."""
        return int(self._cursor.rowcount)

    @property
    def lastrowid(self) -> int:
        """The AUTO_INCREMENT id of the last inserted row."""
        return int(self._cursor.lastrowid)

    def execute(self, sql: str, params: Any = ()) -> Cursor:
        """Run one statement (db.py's placeholders)."""
        try:
            self._cursor.execute(translate(sql), _params(params))
        except pymysql.err.MySQLError as err:
            _reraise(err, self.connection.where)
            raise
        return self

    def executemany(self, sql: str, seq: Any) -> Cursor:
        """Run one statement once per parameter set."""
        try:
            self._cursor.executemany(translate(sql), [_params(p) for p in seq])
        except pymysql.err.MySQLError as err:
            _reraise(err, self.connection.where)
            raise
        return self

    def _row(self, values: tuple | None) -> Any:
        if values is None or self.row_factory is None:
            return values
        names = self._names()
        return Row(values, names)

    def _names(self) -> dict[str, int]:
        description = self._cursor.description or ()
        return {d[0]: i for i, d in enumerate(description)}

    def fetchone(self) -> Any:
        """The next row, or None."""
        return self._row(self._cursor.fetchone())

    def fetchmany(self, size: int = 1000) -> list[Any]:
        """Up to size more rows."""
        rows = self._cursor.fetchmany(size)
        if self.row_factory is None:
            return list(rows)
        names = self._names()
        return [Row(r, names) for r in rows]

    def fetchall(self) -> list[Any]:
        """Every remaining row."""
        rows = self._cursor.fetchall()
        if self.row_factory is None:
            return list(rows)
        names = self._names()
        return [Row(r, names) for r in rows]

    def __iter__(self):
        return iter(self.fetchall())

    def close(self) -> None:
        """Close the cursor."""
        self._cursor.close()


def _params(params: Any) -> Any:
    if isinstance(params, dict):
        return params
    return tuple(params) if params is not None else ()


class Connection:
    """A connection to the MariaDB ledger with sqlite3.Connection's methods db.py calls."""

    engine = "mariadb"

    def __init__(self, raw: Any, ledger: MariaDBLedger) -> None:
        self.raw = raw
        self.ledger = ledger
        self.where = ledger.describe()
        self.ledger_path = self.where
        self.row_factory: Any = Row

    def cursor(self) -> Cursor:
        """A new cursor."""
        cur = Cursor(self)
        cur.row_factory = self.row_factory
        return cur

    def execute(self, sql: str, params: Any = ()) -> Cursor:
        """Run one statement on a new cursor and return it (as sqlite3.Connection.execute)."""
        return self.cursor().execute(sql, params)

    def executemany(self, sql: str, seq: Any) -> Cursor:
        """Run one statement per parameter set on a new cursor."""
        return self.cursor().executemany(sql, seq)

    @property
    def in_transaction(self) -> bool:
        """True while a transaction is open on the server."""
        return bool(self.raw.server_status & _IN_TRANS)

    def close(self) -> None:
        """Close the connection (an open transaction is rolled back by the server)."""
        try:
            self.raw.close()
        except pymysql.err.Error:
            pass

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# PyMySQL 0.10 (EL9) has no ssl_disabled and never uses TLS unless asked to.
_TAKES_SSL_DISABLED = "ssl_disabled" in pymysql.connections.Connection.__init__.__code__.co_varnames


def _ssl_context(ledger: MariaDBLedger) -> Any:
    import ssl

    context = ssl.create_default_context(cafile=ledger.tls_ca)
    if ledger.tls_cert:
        context.load_cert_chain(ledger.tls_cert, ledger.tls_key)
    return context


def connect(
    ledger: MariaDBLedger,
    *,
    lock_timeout_s: int = 5,
    connect_timeout_s: int = CONNECT_TIMEOUT_S,
    read_timeout_s: int | None = READ_TIMEOUT_S,
) -> Connection:
    """Open a connection to the MariaDB ledger in autocommit mode, our session settings set."""
    options: dict[str, Any] = {
        "user": ledger.user,
        "password": ledger.password or "",
        "database": ledger.database,
        "charset": "utf8mb4",
        "autocommit": True,
        "connect_timeout": connect_timeout_s,
        "read_timeout": read_timeout_s,
        "write_timeout": read_timeout_s,
        # UPDATE's rowcount = rows matched, as SQLite's (not rows whose value changed)
        "client_flag": CLIENT.FOUND_ROWS,
        "conv": CONVERSIONS,
    }
    if ledger.unix_socket:
        options["unix_socket"] = ledger.unix_socket
    else:
        options["host"] = ledger.host
        options["port"] = ledger.port
    try:
        if ledger.tls:
            options["ssl"] = _ssl_context(ledger)
        elif _TAKES_SSL_DISABLED:
            # StorageTLS=no means no TLS. PyMySQL 1.2 otherwise "prefers" TLS: it builds a
            # default SSL context (36 ms of loading the system's CA certificates, measured, on
            # every `charge`) and upgrades to unverified TLS when the server offers it.
            options["ssl_disabled"] = True
        raw = pymysql.connect(**options)
    except pymysql.err.MySQLError as err:
        mapped = map_error(err, ledger.describe())
        if mapped is not None:
            raise mapped from None
        detail = err.args[1] if len(err.args) > 1 else err.__class__.__name__
        raise DatabaseUnavailable(
            f"Cannot open the MariaDB ledger {ledger.describe()}: {detail} {err.args[:1]}."
        ) from None
    except OSError as err:  # TLS files
        raise DatabaseUnavailable(
            f"Cannot open the MariaDB ledger {ledger.describe()}: {err}."
        ) from None
    conn = Connection(raw, ledger)
    try:
        conn.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
        conn.execute(
            "SET time_zone = '+00:00', innodb_lock_wait_timeout = ?, sql_mode = ?",
            (max(1, int(lock_timeout_s)), SQL_MODE),
        )
    except BaseException:
        conn.close()
        raise
    return conn


def split_statements(text: str) -> list[str]:
    """The statements of a migration file, as the mariadb client reads it: `;` (or the
    DELIMITER in force) at the end of a line ends a statement; `--` lines are comments."""
    statements: list[str] = []
    delimiter = ";"
    current: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("--")):
            continue
        if stripped.upper().startswith("DELIMITER "):
            delimiter = stripped.split(None, 1)[1]
            continue
        if stripped.startswith("--"):
            continue
        if stripped.endswith(delimiter):
            current.append(line.rstrip()[: -len(delimiter)])
            statement = "\n".join(current).strip()
            if statement:
                statements.append(statement)
            current = []
        else:
            current.append(line)
    if "\n".join(current).strip():
        statements.append("\n".join(current).strip())
    return statements


def execute_script(conn: Connection, text: str) -> None:
    """Run a migration file's statements verbatim (no placeholder translation)."""
    cur = conn.raw.cursor()
    try:
        for statement in split_statements(text):
            cur.execute(statement)
    except pymysql.err.MySQLError as err:
        if conn.in_transaction:
            conn.raw.rollback()
        _reraise(err, conn.where)
        raise SchemaError(f"A migration statement failed on {conn.where}: {err}.") from err
    finally:
        cur.close()


def schema_version(conn: Connection) -> int:
    """The version stamped in schema_version (0 when the database has no ledger yet)."""
    try:
        row = conn.execute("SELECT version FROM schema_version WHERE id = 1").fetchone()
    except SchemaError:  # no schema_version table: an empty database
        return 0
    return 0 if row is None else int(row[0])
