"""The configuration file: where the ledger is (a SQLite file, or a MariaDB database).

Owns: finding, reading and checking /etc/slurm-quota/slurm-quota.conf (env
SLURM_QUOTA_CONF), and choosing the ledger from it and from --db / SLURM_QUOTA_DB. It must
not open the ledger (db.py does) nor ever put a password into a message, a repr or a log.

The format follows slurm.conf and slurmdbd.conf, so the job_submit plugin reads the same file
with the same rules (lua/slurm_quota.lua):

- one `Key=Value` per line; keys are case-insensitive; blanks around key and value are dropped;
- `#` starts a comment that runs to the end of the line, `\\#` is a literal `#` in a value;
- a key given twice, an unknown key, an empty value or a line without `=` is an error.

An absent file means today's behaviour: a SQLite ledger at --db, SLURM_QUOTA_DB or the
default path. A file that holds a password (StoragePass) and a StoragePassFile must not be
readable by group or others (as slurmdbd.conf, mode 0600 owned by SlurmUser).
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field

from slurm_quota.errors import SlurmQuotaError

CONF_ENV = "SLURM_QUOTA_CONF"
DEFAULT_CONF_PATH = "/etc/slurm-quota/slurm-quota.conf"
DEFAULT_MARIADB_PORT = 3306
DEFAULT_MARIADB_HOST = "localhost"
DEFAULT_MARIADB_DATABASE = "slurm_quota"
# Bounds a person's file must stay within (a config file is small; a runaway file is a mistake).
MAX_CONF_BYTES = 64 * 1024
MAX_PASSWORD_BYTES = 1024

LEDGER_TYPES = ("sqlite", "mariadb")
# Canonical spelling of each key (the documentation's); keys are matched case-insensitively.
KEYS = (
    "LedgerType",
    "LedgerPath",
    "StorageHost",
    "StoragePort",
    "StorageLoc",
    "StorageUser",
    "StoragePass",
    "StoragePassFile",
    "StorageTLS",
    "StorageTLSCA",
    "StorageTLSCert",
    "StorageTLSKey",
)
_KEY_BY_LOWER = {k.lower(): k for k in KEYS}
# A MariaDB database name we accept: plain identifier characters only (it is never quoted into
# SQL by us, but a site's scripts may), at most MariaDB's 64.
_DATABASE_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")
_YES = ("yes", "true", "1", "on")
_NO = ("no", "false", "0", "off")


class ConfigError(SlurmQuotaError):
    """The configuration file is unreadable, malformed or unsafe (a password others can read)."""


@dataclass(frozen=True)
class SQLiteLedger:
    """A SQLite ledger file."""

    path: str
    kind: str = "sqlite"

    def describe(self) -> str:
        """How messages name this ledger."""
        return self.path


@dataclass(frozen=True)
class MariaDBLedger:
    """A MariaDB (or MySQL) ledger: where it is and how to log in. The password never shows."""

    host: str = DEFAULT_MARIADB_HOST
    port: int = DEFAULT_MARIADB_PORT
    database: str = DEFAULT_MARIADB_DATABASE
    user: str = ""
    password: str | None = field(default=None, repr=False, compare=False)
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    # A unix socket instead of host:port (tests and a local server; not a configuration key).
    unix_socket: str | None = None
    source: str | None = None  # the configuration file it came from
    kind: str = "mariadb"

    def describe(self) -> str:
        """How messages name this ledger: user, server and database, never the password."""
        where = self.unix_socket or f"{self.host}:{self.port}"
        return f"mariadb://{self.user}@{where}/{self.database}"


def conf_path(environ: os._Environ[str] | dict[str, str] | None = None) -> str:
    """The configuration file's path: $SLURM_QUOTA_CONF, else the default."""
    env = os.environ if environ is None else environ
    return env.get(CONF_ENV) or DEFAULT_CONF_PATH


def _strip_comment(line: str) -> str:
    """The line up to its first unescaped `#`, with `\\#` turned into `#`."""
    out: list[str] = []
    i = 0
    while i < len(line):
        ch = line[i]
        if ch == "\\" and line[i + 1 : i + 2] == "#":
            out.append("#")
            i += 2
            continue
        if ch == "#":
            break
        out.append(ch)
        i += 1
    return "".join(out)


def parse(text: str, path: str) -> dict[str, str]:
    """The keys of a configuration text, by canonical name; ConfigError on any bad line.

    Values are returned verbatim (after the comment and the surrounding blanks are dropped);
    a message never quotes a line's value, because a line may hold a password.
    """
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = _strip_comment(raw).strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"{path}, line {number}: expected Key=Value (see `man slurm-quota`, "
                f"CONFIGURATION); the file was not used."
            )
        canonical = _KEY_BY_LOWER.get(key.lower())
        if canonical is None:
            shown = key if re.fullmatch(r"[A-Za-z0-9_]{1,40}", key) else "(a key not shown)"
            raise ConfigError(
                f"{path}, line {number}: unknown key {shown}; known keys: {', '.join(KEYS)}."
            )
        if canonical in values:
            raise ConfigError(f"{path}, line {number}: {canonical} is given twice.")
        value = value.strip()
        if not value:
            raise ConfigError(
                f"{path}, line {number}: {canonical} has no value (leave the line out for the "
                f"default)."
            )
        values[canonical] = value
    return values


def _readable_by_others(mode: int) -> bool:
    return bool(mode & (stat.S_IRGRP | stat.S_IROTH))


def _read_private_file(path: str, what: str) -> tuple[str, os.stat_result]:
    """Read a small regular file (the config, a password file); ConfigError when it cannot be."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except ValueError:  # an embedded NUL
        raise ConfigError(f"The {what} path {path!r} is not a usable file name.") from None
    except OSError as err:
        raise ConfigError(
            f"The {what} {path} cannot be read by uid {os.getuid()}: {err.strerror}. It is "
            f"meant to be owned by SlurmUser with mode 0600; run as root or as SlurmUser."
        ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"The {what} {path} is not a regular file.")
        data = os.read(fd, MAX_CONF_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_CONF_BYTES:
        raise ConfigError(f"The {what} {path} is larger than {MAX_CONF_BYTES} bytes.")
    try:
        return data.decode("utf-8"), info
    except UnicodeDecodeError:
        raise ConfigError(f"The {what} {path} is not UTF-8 text.") from None


def _require_private(path: str, info: os.stat_result, what: str) -> None:
    if _readable_by_others(info.st_mode):
        raise ConfigError(
            f"The {what} {path} holds a password and is readable by group or others (mode "
            f"{stat.S_IMODE(info.st_mode):04o}); it was not used. Make it private: "
            f"`chmod 0600 {path}` (owned by SlurmUser, as slurmdbd.conf)."
        )


def _read_password_file(path: str, source: str) -> str:
    if not os.path.isabs(path):
        raise ConfigError(f"{source}: StoragePassFile must be an absolute path.")
    try:
        text, info = _read_private_file(path, "password file")
    except FileNotFoundError:
        raise ConfigError(
            f"{source}: StoragePassFile {path} does not exist; nothing was done."
        ) from None
    _require_private(path, info, "password file")
    # The file holds the password alone; one final line end (an editor's) is not part of it.
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if not text or "\n" in text or "\r" in text or len(text.encode()) > MAX_PASSWORD_BYTES:
        raise ConfigError(
            f"The password file {path} must hold the password alone on one line "
            f"(1 to {MAX_PASSWORD_BYTES} bytes)."
        )
    return text


def _port(value: str, source: str) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", value) or not 1 <= int(value) <= 65535:
        raise ConfigError(
            f"{source}: StoragePort must be a TCP port number from 1 to 65535; "
            f"{value[:20]!r} is not."
        )
    return int(value)


def _boolean(key: str, value: str, source: str) -> bool:
    if value.lower() in _YES:
        return True
    if value.lower() in _NO:
        return False
    raise ConfigError(f"{source}: {key} must be yes or no, not {value[:20]!r}.")


def _tls_file(key: str, value: str | None, source: str) -> str | None:
    if value is None:
        return None
    if not os.path.isabs(value):
        raise ConfigError(f"{source}: {key} must be an absolute path.")
    return value


def _mariadb(values: dict[str, str], source: str) -> MariaDBLedger:
    if "LedgerPath" in values:
        raise ConfigError(f"{source}: LedgerPath is for LedgerType=sqlite; remove it.")
    user = values.get("StorageUser")
    if user is None:
        raise ConfigError(f"{source}: LedgerType=mariadb needs StorageUser.")
    if "StoragePass" in values and "StoragePassFile" in values:
        raise ConfigError(f"{source}: give StoragePass or StoragePassFile, not both.")
    database = values.get("StorageLoc", DEFAULT_MARIADB_DATABASE)
    if not _DATABASE_NAME.fullmatch(database):
        raise ConfigError(
            f"{source}: StorageLoc must be a database name of letters, digits and _ (at most 64)."
        )
    host = values.get("StorageHost", DEFAULT_MARIADB_HOST)
    if any(ch.isspace() for ch in host) or len(host) > 255:
        raise ConfigError(f"{source}: StorageHost must be a host name or an address.")
    password = values.get("StoragePass")
    if "StoragePassFile" in values:
        password = _read_password_file(values["StoragePassFile"], source)
    tls = _boolean("StorageTLS", values.get("StorageTLS", "no"), source)
    tls_ca = _tls_file("StorageTLSCA", values.get("StorageTLSCA"), source)
    tls_cert = _tls_file("StorageTLSCert", values.get("StorageTLSCert"), source)
    tls_key = _tls_file("StorageTLSKey", values.get("StorageTLSKey"), source)
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError(f"{source}: StorageTLSCert and StorageTLSKey go together.")
    if not tls and (tls_ca or tls_cert):
        raise ConfigError(
            f"{source}: StorageTLSCA/StorageTLSCert/StorageTLSKey need StorageTLS=yes."
        )
    return MariaDBLedger(
        host=host,
        port=_port(values.get("StoragePort", str(DEFAULT_MARIADB_PORT)), source),
        database=database,
        user=user,
        password=password,
        tls=tls,
        tls_ca=tls_ca,
        tls_cert=tls_cert,
        tls_key=tls_key,
        source=source,
    )


@dataclass(frozen=True)
class Config:
    """What the configuration file says (an absent file: every key at its default)."""

    ledger_type: str = "sqlite"
    ledger_path: str | None = None
    mariadb: MariaDBLedger | None = None
    source: str | None = None  # None: no file


def load(path: str | None = None) -> Config:
    """Read and check the configuration file (default: conf_path()); absent = defaults."""
    source = conf_path() if path is None else path
    try:
        text, info = _read_private_file(source, "configuration file")
    except FileNotFoundError:
        return Config()
    values = parse(text, source)
    if "StoragePass" in values:
        _require_private(source, info, "configuration file")
    ledger_type = values.get("LedgerType", "sqlite").lower()
    if ledger_type not in LEDGER_TYPES:
        raise ConfigError(
            f"{source}: LedgerType must be sqlite or mariadb, not {values['LedgerType'][:20]!r}."
        )
    if ledger_type == "sqlite":
        storage = sorted(k for k in values if k.startswith("Storage"))
        if storage:
            raise ConfigError(
                f"{source}: {', '.join(storage)} only apply to LedgerType=mariadb "
                f"(LedgerType is sqlite)."
            )
        return Config(ledger_path=values.get("LedgerPath"), source=source)
    return Config(ledger_type="mariadb", mariadb=_mariadb(values, source), source=source)


def resolve(
    db_option: str | None, default_path: str, *, conf: Config | None = None
) -> SQLiteLedger | MariaDBLedger:
    """The ledger to open: SQLiteLedger or MariaDBLedger.

    db_option is --db or SLURM_QUOTA_DB when given (None otherwise). It names a SQLite file
    and overrides LedgerPath; with LedgerType=mariadb it is refused, so that one setting left
    behind (e.g. SLURM_QUOTA_DB in /etc/default/slurm-quota) cannot split the ledger in two.
    """
    config = load() if conf is None else conf
    if config.ledger_type == "mariadb":
        if db_option is not None:
            raise ConfigError(
                f"{config.source} says LedgerType=mariadb, but a SQLite file was also named "
                f"(--db or SLURM_QUOTA_DB: {db_option}). Remove the one that is wrong; to "
                f"open that SQLite file anyway, point {CONF_ENV} at a file without "
                f"LedgerType=mariadb."
            )
        assert config.mariadb is not None
        return config.mariadb
    return SQLiteLedger(db_option or config.ledger_path or default_path)


def ledger_argument(text: str) -> SQLiteLedger | MariaDBLedger:
    """A ledger named on a command line (copy-ledger), never with a password in it.

    `mariadb:` is the MariaDB ledger of the configuration file ($SLURM_QUOTA_CONF or the
    default), `mariadb:FILE` the one of another configuration file; `sqlite:PATH` or a plain
    PATH is a SQLite file.
    """
    if text.startswith("mariadb:"):
        path = text[len("mariadb:") :] or None
        conf = load(path)
        if conf.mariadb is None:
            raise ConfigError(
                f"{conf.source or conf_path()} does not say LedgerType=mariadb, so {text!r} "
                f"names no MariaDB ledger."
            )
        return conf.mariadb
    if text.startswith("sqlite:"):
        text = text[len("sqlite:") :]
    if not text:
        raise ConfigError("An empty ledger name: give a SQLite file, mariadb: or mariadb:FILE.")
    return SQLiteLedger(text)
