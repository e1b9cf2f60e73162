"""copy-ledger: SQLite -> MariaDB -> SQLite, exactly (every table, ids, drift and all), proven
by the per-table digests of `check --digest`; a non-empty target is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from slurm_quota import copyledger, db
from slurm_quota.cli import main
from tests.unit.test_charge import add_prealloc, do_charge, set_factor, token_of

pytestmark = pytest.mark.mariadb


def _conf(tmp_path: Path, ledger) -> Path:
    conf = tmp_path / "slurm-quota.conf"
    conf.write_text(
        f"LedgerType=mariadb\nStorageHost={ledger.host}\nStoragePort={ledger.port}\n"
        f"StorageLoc={ledger.database}\nStorageUser={ledger.user}\n"
        f"StoragePass={ledger.password}\n"
    )
    os.chmod(conf, 0o600)
    return conf


@pytest.fixture
def full_sqlite(tmp_path: Path, monkeypatch, capsys) -> Path:
    """A SQLite ledger with a row in every table, one reserved total hand-edited (drift)."""
    path = tmp_path / "source.db"
    db.migrate(path)
    conn = db.connect(path)
    set_factor(conn, "h100", 100.0)
    add_prealloc(conn, token_of("exclusive"), size=3)
    add_prealloc(conn, "0badc0de-0000-4000-8000-000000000001", user="bob", account="physics")
    do_charge(conn, "exclusive")
    do_charge(conn, "physics_bob")
    conn.execute("UPDATE users SET reserved_jobs = 99 WHERE username = 'bob'")  # drift, kept
    conn.close()
    base = ["--db", str(path)]
    assert main([*base, "user-quota", "alice", "5000", "--reason", "grant 7"]) == 0
    assert main([*base, "adjust", "--user", "alice", "--cpu", "--minutes=-1"]) == 0
    assert main([*base, "set-setting", "default_time_minutes", "60"]) == 0
    capsys.readouterr()
    return path


def _digest_lines(capsys, *args: str) -> list[str]:
    assert main([*args, "check", "--digest"]) == 0
    return capsys.readouterr().out.splitlines()


def test_sqlite_to_mariadb_and_back_is_exact(
    full_sqlite, tmp_path, mariadb_ledger, monkeypatch, capsys
) -> None:
    conf = _conf(tmp_path, mariadb_ledger)
    source_lines = _digest_lines(capsys, "--db", str(full_sqlite))
    assert len(source_lines) == len(db.LEDGER_TABLES)
    assert all(" 0 rows" not in line for line in source_lines), source_lines

    assert main(["copy-ledger", str(full_sqlite), f"mariadb:{conf}"]) == 0
    assert "same rows" in capsys.readouterr().out
    monkeypatch.setenv("SLURM_QUOTA_CONF", str(conf))
    assert _digest_lines(capsys) == source_lines
    # the copy is a working ledger: check sees the same drift as in the source
    assert main(["check", "--json"]) == 1
    assert '"jobs": 99' in capsys.readouterr().out

    back = tmp_path / "back.db"
    assert main(["copy-ledger", "mariadb:", f"sqlite:{back}"]) == 0
    capsys.readouterr()
    monkeypatch.setenv("SLURM_QUOTA_CONF", str(tmp_path / "none.conf"))
    assert _digest_lines(capsys, "--db", str(back)) == source_lines


def test_a_non_empty_target_is_refused_and_unchanged_unless_replace(
    full_sqlite, tmp_path, mariadb_ledger, capsys
) -> None:
    conf = _conf(tmp_path, mariadb_ledger)
    db.migrate(mariadb_ledger)
    conn = db.connect(mariadb_ledger)
    conn.execute("INSERT INTO settings (`key`, value) VALUES ('node_gpus', 'gpu:2')")
    before = copyledger.digests(conn)
    assert main(["copy-ledger", str(full_sqlite), f"mariadb:{conf}"]) == 2
    assert "not empty: settings (1)" in capsys.readouterr().err
    assert copyledger.digests(conn) == before
    assert main(["copy-ledger", "--replace", str(full_sqlite), f"mariadb:{conf}"]) == 0
    source = db.connect(full_sqlite)
    try:
        assert copyledger.digests(conn) == copyledger.digests(source)
    finally:
        source.close()
        conn.close()


def test_digests_change_with_any_value(full_sqlite) -> None:
    conn = db.connect(full_sqlite)
    try:
        before = {d.table: d for d in copyledger.digests(conn)}
        conn.execute("UPDATE journal SET reason = 'other' WHERE id = 1")
        after = {d.table: d for d in copyledger.digests(conn)}
    finally:
        conn.close()
    assert [t for t in before if before[t] != after[t]] == ["journal"]
    assert before["journal"].rows == after["journal"].rows


def test_no_password_on_the_command_line_and_same_ledger_refused(tmp_path, capsys) -> None:
    path = tmp_path / "a.db"
    db.migrate(path)
    assert main(["copy-ledger", str(path), f"sqlite:{path}"]) == 2
    assert "same ledger" in capsys.readouterr().err
    assert main(["copy-ledger", str(path), "mariadb:"]) == 1  # the conf names no MariaDB
    assert "names no MariaDB ledger" in capsys.readouterr().err
