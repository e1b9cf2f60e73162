"""The configuration file (slurm_quota.config): format, defaults, refusals, password safety."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from slurm_quota import config
from slurm_quota.config import ConfigError, MariaDBLedger, SQLiteLedger

SECRET = "s3cr#t pa55"


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text, encoding="utf-8")
    os.chmod(path, mode)
    return path


def test_absent_file_means_sqlite_at_the_default(tmp_path: Path) -> None:
    conf = config.load(str(tmp_path / "absent.conf"))
    assert conf == config.Config()
    assert config.resolve(None, "/default.db", conf=conf) == SQLiteLedger("/default.db")


def test_conf_path_comes_from_the_environment() -> None:
    assert config.conf_path({}) == config.DEFAULT_CONF_PATH
    assert config.conf_path({"SLURM_QUOTA_CONF": "/x.conf"}) == "/x.conf"


def test_ledger_path_is_used_and_db_option_overrides_it(tmp_path: Path) -> None:
    path = write(tmp_path / "c.conf", "LedgerType=sqlite\nLedgerPath=/srv/ledger.db\n", 0o644)
    conf = config.load(str(path))
    assert config.resolve(None, "/default.db", conf=conf) == SQLiteLedger("/srv/ledger.db")
    assert config.resolve("/other.db", "/default.db", conf=conf) == SQLiteLedger("/other.db")


def test_mariadb_keys_defaults_and_case(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.conf",
        "# the shared ledger\n"
        "  ledgertype = MariaDB   # comment after a value\n"
        "STORAGEUSER=slurm_quota\n"
        "StoragePass=s3cr\\#t pa55\n",
    )
    ledger = config.resolve(None, "/default.db", conf=config.load(str(path)))
    assert isinstance(ledger, MariaDBLedger)
    assert (ledger.host, ledger.port, ledger.database, ledger.user) == (
        "localhost",
        3306,
        "slurm_quota",
        "slurm_quota",
    )
    assert ledger.password == SECRET
    assert ledger.tls is False
    assert ledger.source == str(path)


def test_password_never_in_repr_or_description(tmp_path: Path) -> None:
    path = write(tmp_path / "c.conf", "LedgerType=mariadb\nStorageUser=u\nStoragePass=hunter2x\n")
    ledger = config.load(str(path)).mariadb
    assert "hunter2x" not in repr(ledger)
    assert "hunter2x" not in ledger.describe()
    assert ledger.describe() == "mariadb://u@localhost:3306/slurm_quota"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_a_password_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path / "c.conf", "LedgerType=mariadb\nStorageUser=u\nStoragePass=pw\n", mode)
    with pytest.raises(ConfigError, match="readable by group or others") as info:
        config.load(str(path))
    assert "pw" not in str(info.value).replace(str(path), "")


def test_a_conf_without_password_may_be_world_readable(tmp_path: Path) -> None:
    pw = write(tmp_path / "pw", "filepass\n")
    path = write(
        tmp_path / "c.conf",
        f"LedgerType=mariadb\nStorageUser=u\nStoragePassFile={pw}\nStorageHost=db1\n"
        "StoragePort=3307\nStorageLoc=quota_a\n",
        0o644,
    )
    ledger = config.load(str(path)).mariadb
    assert ledger.password == "filepass"
    assert (ledger.host, ledger.port, ledger.database) == ("db1", 3307, "quota_a")


def test_a_password_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    pw = write(tmp_path / "pw", "filepass\n", 0o644)
    path = write(tmp_path / "c.conf", f"LedgerType=mariadb\nStorageUser=u\nStoragePassFile={pw}\n")
    with pytest.raises(ConfigError, match="readable by group or others") as info:
        config.load(str(path))
    assert "filepass" not in str(info.value)


@pytest.mark.parametrize("content", ["", "\n", "one\ntwo\n"])
def test_a_password_file_must_hold_one_line(tmp_path: Path, content: str) -> None:
    pw = write(tmp_path / "pw", content)
    path = write(tmp_path / "c.conf", f"LedgerType=mariadb\nStorageUser=u\nStoragePassFile={pw}\n")
    with pytest.raises(ConfigError, match="alone on one line") as info:
        config.load(str(path))
    assert "two" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("LedgerType=postgres\n", "must be sqlite or mariadb"),
        ("Ledger=sqlite\n", "unknown key Ledger"),
        ("LedgerType=sqlite\nledgertype=sqlite\n", "given twice"),
        ("LedgerPath=\n", "has no value"),
        ("just words\n", "expected Key=Value"),
        ("LedgerType=sqlite\nStorageHost=db\n", "only apply to LedgerType=mariadb"),
        ("LedgerType=mariadb\n", "needs StorageUser"),
        ("LedgerType=mariadb\nStorageUser=u\nStoragePort=0\n", "1 to 65535"),
        ("LedgerType=mariadb\nStorageUser=u\nStoragePort=65536\n", "1 to 65535"),
        ("LedgerType=mariadb\nStorageUser=u\nStoragePort=33O6\n", "1 to 65535"),
        ("LedgerType=mariadb\nStorageUser=u\nStoragePort=٣٣\n", "1 to 65535"),
        ("LedgerType=mariadb\nStorageUser=u\nStorageLoc=a-b\n", "database name"),
        ("LedgerType=mariadb\nStorageUser=u\nStorageTLS=maybe\n", "yes or no"),
        ("LedgerType=mariadb\nStorageUser=u\nStorageTLSCA=/ca.pem\n", "need StorageTLS=yes"),
        ("LedgerType=mariadb\nStorageUser=u\nStorageTLS=yes\nStorageTLSCert=/c\n", "together"),
        ("LedgerType=mariadb\nStorageUser=u\nStorageTLS=yes\nStorageTLSCA=ca.pem\n", "absolute"),
        ("LedgerType=mariadb\nStorageUser=u\nLedgerPath=/x.db\n", "LedgerPath is for"),
        ("LedgerType=mariadb\nStorageUser=u\nStoragePass=a\nStoragePassFile=/p\n", "not both"),
    ],
)
def test_bad_files_are_refused_with_the_reason(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "c.conf", text)
    with pytest.raises(ConfigError, match=message):
        config.load(str(path))


def test_an_unparsable_line_is_not_quoted(tmp_path: Path) -> None:
    path = write(tmp_path / "c.conf", "LedgerType=mariadb\nStorageUser=u\nhunter2x\n")
    with pytest.raises(ConfigError) as info:
        config.load(str(path))
    assert "hunter2x" not in str(info.value)
    assert "line 3" in str(info.value)


def test_tls_settings_are_read(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.conf",
        "LedgerType=mariadb\nStorageUser=u\nStorageTLS=yes\nStorageTLSCA=/etc/ca.pem\n"
        "StorageTLSCert=/etc/c.pem\nStorageTLSKey=/etc/k.pem\n",
    )
    ledger = config.load(str(path)).mariadb
    assert (ledger.tls, ledger.tls_ca, ledger.tls_cert, ledger.tls_key) == (
        True,
        "/etc/ca.pem",
        "/etc/c.pem",
        "/etc/k.pem",
    )


def test_db_option_with_a_mariadb_conf_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "c.conf", "LedgerType=mariadb\nStorageUser=u\n")
    with pytest.raises(ConfigError, match="LedgerType=mariadb, but a SQLite file"):
        config.resolve("/x.db", "/default.db", conf=config.load(str(path)))


def test_a_directory_or_fifo_is_not_read(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        config.load(str(fifo))
    with pytest.raises(ConfigError):
        config.load(str(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_an_error_not_the_default(tmp_path: Path) -> None:
    path = write(tmp_path / "c.conf", "LedgerType=mariadb\nStorageUser=u\n", 0o000)
    with pytest.raises(ConfigError, match="cannot be read"):
        config.load(str(path))
