"""The ledger on MariaDB: migrations, the configuration file, errors, and engine parity.

Runs against a private mariadbd (tests/mariadb_server.py); skipped loudly without it, failed
under SLURM_QUOTA_REQUIRE_SYSTEM=1.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from slurm_quota import db, mariadb
from slurm_quota.cli import main
from slurm_quota.config import SQLiteLedger
from slurm_quota.errors import DatabaseUnavailable, NotPermitted, SchemaError

pytestmark = pytest.mark.mariadb


def _sqlite_columns(path: Path) -> dict[str, list[str]]:
    conn = sqlite3.connect(path)
    try:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )
        ]
        return {t: [c[1] for c in conn.execute(f"PRAGMA table_info({t})")] for t in tables}
    finally:
        conn.close()


def _mariadb_columns(conn) -> dict[str, list[str]]:
    rows = conn.execute(
        "SELECT TABLE_NAME, COLUMN_NAME FROM information_schema.COLUMNS "
        "WHERE TABLE_SCHEMA = DATABASE() ORDER BY TABLE_NAME, ORDINAL_POSITION"
    ).fetchall()
    out: dict[str, list[str]] = {}
    for table, column in rows:
        out.setdefault(table, []).append(column)
    return out


def test_migrate_creates_the_same_tables_and_columns_as_sqlite(tmp_path, mariadb_ledger) -> None:
    assert db.migrate(mariadb_ledger) == list(range(1, db.latest_version() + 1))
    sqlite_path = tmp_path / "l.db"
    db.migrate(sqlite_path)
    conn = db.connect(mariadb_ledger)
    try:
        on_mariadb = _mariadb_columns(conn)
        assert on_mariadb.pop("schema_version") == ["id", "version"]
        assert on_mariadb == _sqlite_columns(sqlite_path)
        expected = set(db.expected_schema_objects(conn))
        assert expected == set(db.expected_schema_objects())  # same triggers and indexes
        assert expected <= db.schema_objects(conn)
    finally:
        conn.close()


def test_schema_version_is_one_plain_select(mariadb_ledger) -> None:
    db.migrate(mariadb_ledger)
    conn = mariadb.connect(mariadb_ledger)
    try:
        rows = conn.execute("SELECT version FROM schema_version").fetchall()
    finally:
        conn.close()
    assert [tuple(r) for r in rows] == [(db.latest_version(),)]
    assert db.schema_version(mariadb_ledger) == db.latest_version()


def test_migrate_is_idempotent_and_upgrades_step_by_step(mariadb_ledger) -> None:
    conn = mariadb.connect(mariadb_ledger)
    try:
        for _version, path in db.mariadb_migration_files()[:3]:
            mariadb.execute_script(conn, path.read_text())
        assert mariadb.schema_version(conn) == 3
        conn.execute("INSERT INTO users (username) VALUES ('old')")
        conn.execute("UPDATE users SET total_consumed_cpu_minutes = 7 WHERE username = 'old'")
    finally:
        conn.close()
    assert db.migrate(mariadb_ledger) == list(range(4, db.latest_version() + 1))
    assert db.migrate(mariadb_ledger) == []
    conn = db.connect(mariadb_ledger)
    try:
        # 0005's opening balance: the 7 minutes became 420 CPU-seconds, explained
        assert db.owner_consumed_exact(conn, "user", "old") == (420, 0)
        assert db.consumed_drift(conn, "user") == []
    finally:
        conn.close()


def test_a_migration_stopped_after_its_ddl_is_finished_by_migrate(mariadb_ledger) -> None:
    conn = mariadb.connect(mariadb_ledger)
    try:
        for _version, path in db.mariadb_migration_files()[:4]:
            mariadb.execute_script(conn, path.read_text())
        conn.execute("INSERT INTO users (username, total_consumed_cpu_minutes) VALUES ('u', 2)")
        text = db.mariadb_migration_files()[4][1].read_text()
        ddl = text[: text.index("START TRANSACTION;")]
        mariadb.execute_script(conn, ddl)  # the DDL committed, then the process died
        assert mariadb.schema_version(conn) == 4
    finally:
        conn.close()
    assert db.migrate(mariadb_ledger) == list(range(5, db.latest_version() + 1))
    conn = db.connect(mariadb_ledger)
    try:
        assert db.owner_consumed_exact(conn, "user", "u") == (120, 0)
        assert db.consumed_drift(conn, "user") == []
    finally:
        conn.close()


def test_a_newer_schema_is_refused(mariadb_ledger) -> None:
    db.migrate(mariadb_ledger)
    conn = mariadb.connect(mariadb_ledger)
    conn.execute("UPDATE schema_version SET version = 99")
    conn.close()
    with pytest.raises(SchemaError, match="newer than this"):
        db.migrate(mariadb_ledger)
    with pytest.raises(SchemaError, match="version 99"):
        db.connect(mariadb_ledger)


def test_an_unmigrated_database_is_refused_with_what_to_do(mariadb_ledger) -> None:
    with pytest.raises(SchemaError, match="slurm-quota migrate"):
        db.connect(mariadb_ledger)


def test_a_wrong_password_is_not_permitted_and_not_shown(mariadb_ledger) -> None:
    wrong = replace(mariadb_ledger, password="not-the-Password-42")
    with pytest.raises(NotPermitted) as info:
        db.connect(wrong)
    assert "not-the-Password-42" not in str(info.value)
    assert mariadb_ledger.password not in str(info.value)
    assert mariadb_ledger.user in str(info.value)


def test_an_unreachable_server_is_a_temporary_failure(mariadb_ledger) -> None:
    closed = replace(mariadb_ledger, port=1)  # nothing listens on port 1
    with pytest.raises(DatabaseUnavailable, match="not reachable"):
        db.connect(closed)


def test_names_compare_byte_for_byte_as_in_sqlite(any_conn) -> None:
    with db.write_transaction(any_conn):
        for name in ("alice", "Alice", "alice ", "ålice"):
            db.insert_owner(any_conn, "user", name, 10, 20)
    names = sorted(str(r[0]) for r in db.stats_users(any_conn))
    assert names == sorted(["alice", "Alice", "alice ", "ålice"])
    assert db.get_owner(any_conn, "user", "alice ")["name"] == "alice "


def test_values_come_back_as_on_sqlite(any_conn) -> None:
    with db.write_transaction(any_conn):
        db.set_setting(any_conn, "default_time_minutes", "60")
        db.set_setting(any_conn, "default_time_minutes", "90")
        db.set_gpu_factor(any_conn, "h100", 0.75)
        db.add_owner_consumption(any_conn, "user", "bob", 61, 60001)
        db.insert_journal(
            any_conn, actor="root", action="set", target_kind="user", target="bob",
            field="quota", old_value=None, new_value="5", reason="r",
        )  # fmt: skip
    assert [tuple(r) for r in db.list_settings(any_conn)] == [("default_time_minutes", "90")]
    assert db.get_gpu_factor(any_conn, "h100") == 0.75
    row = db.get_owner(any_conn, "user", "bob")
    assert (row["total_consumed_cpu_minutes"], row["total_consumed_gpu_minutes"]) == (2, 2)
    assert isinstance(row["last_updated"], str) and len(row["last_updated"]) == 19
    journal = db.read_journal(any_conn, limit=1)[0]
    assert journal["target"] == "bob" and isinstance(journal["at"], str)
    assert db.charge_totals(any_conn) == (0, 0, 0)
    assert all(isinstance(v, int) for v in db.ledger_row_counts(any_conn).values())


def test_cli_migrate_and_admin_through_the_configuration_file(
    tmp_path, mariadb_ledger, monkeypatch, capsys
) -> None:
    password_file = tmp_path / "pass"
    password_file.write_text(mariadb_ledger.password + "\n")
    os.chmod(password_file, 0o600)
    conf = tmp_path / "slurm-quota.conf"
    conf.write_text(
        f"LedgerType=mariadb\nStorageHost={mariadb_ledger.host}\n"
        f"StoragePort={mariadb_ledger.port}\nStorageLoc={mariadb_ledger.database}\n"
        f"StorageUser={mariadb_ledger.user}\nStoragePassFile={password_file}\n"
    )
    monkeypatch.setenv("SLURM_QUOTA_CONF", str(conf))
    monkeypatch.delenv("SLURM_QUOTA_DB", raising=False)
    assert main(["migrate"]) == 0
    assert f"schema version {db.latest_version()}" in capsys.readouterr().out
    assert main(["user-quota", "alice", "500"]) == 0
    assert main(["stats", "--local", "--json", "--user", "alice"]) == 0
    out = capsys.readouterr().out
    assert '"alice"' in out and mariadb_ledger.password not in out
    conn = db.connect(mariadb_ledger)
    try:
        assert db.get_owner(conn, "user", "alice")["quota_cpu_minutes"] == 500
    finally:
        conn.close()
    # a SQLite file named as well is refused: one ledger, named in one place
    assert main(["--db", str(tmp_path / "x.db"), "stats", "--local", "--all"]) == 1
    assert "LedgerType=mariadb" in capsys.readouterr().err


def test_sqlite_ledger_object_is_the_same_as_its_path(tmp_path) -> None:
    ledger = SQLiteLedger(str(tmp_path / "l.db"))
    assert db.migrate(ledger) == list(range(1, db.latest_version() + 1))
    assert db.schema_version(ledger) == db.schema_version(ledger.path) == db.latest_version()


def _prealloc(conn, uuid: str, user: str, account: str, cpu: int, size: int = 1) -> None:
    conn.execute(
        "INSERT INTO jobs_preallocations (job_uuid, username, account, "
        "preallocated_cpu_minutes, preallocated_gpu_minutes, array_size) VALUES (?, ?, ?, ?, 1, ?)",
        (uuid, user, account, cpu, size),
    )


@pytest.fixture
def checked_ledger(mariadb_ledger):
    db.migrate(mariadb_ledger)
    conn = db.connect(mariadb_ledger)
    conn.execute("INSERT INTO users (username) VALUES ('alice'), ('bob')")
    conn.execute("INSERT INTO accounts (account) VALUES ('physics')")
    _prealloc(conn, "u-1", "alice", "physics", 60)
    _prealloc(conn, "u-2", "alice", "physics", 10, size=4)
    _prealloc(conn, "u-3", "bob", "physics", 5)
    yield conn
    conn.close()


def test_check_passes_on_a_consistent_mariadb_ledger(checked_ledger) -> None:
    from slurm_quota import check

    report = check.check(checked_ledger)
    assert report.ok, report.as_dict()
    assert report.integrity == []
    assert db.stats_accounts(checked_ledger, "physics")[0][2] == 60 + 40 + 5


def test_check_finds_and_repairs_a_hand_edited_total_on_mariadb(checked_ledger) -> None:
    from slurm_quota import check

    checked_ledger.execute("UPDATE users SET reserved_cpu_minutes = 3 WHERE username = 'alice'")
    report = check.check(checked_ledger)
    assert not report.ok
    assert [(d.name, d.stored[0], d.actual[0]) for d in report.drift] == [("alice", 3, 100)]
    fixed = check.check(checked_ledger, repair=True)
    assert fixed.repaired
    assert check.check(checked_ledger).ok
    assert db.get_owner(checked_ledger, "user", "alice") is not None
    assert db.reserved_of(checked_ledger, "user", "alice")[:3] == (100, 5, 5)


def test_check_reports_a_dropped_trigger_on_mariadb(checked_ledger) -> None:
    from slurm_quota import check

    checked_ledger.execute("DROP TRIGGER jobs_preallocations_reserved_delete")
    report = check.check(checked_ledger)
    assert ("trigger", "jobs_preallocations_reserved_delete") in report.missing
    assert not report.ok


def test_triggers_keep_totals_on_update_delete_and_owner_rename(checked_ledger) -> None:
    conn = checked_ledger
    conn.execute("UPDATE jobs_preallocations SET array_size = 2 WHERE job_uuid = 'u-2'")
    conn.execute("DELETE FROM jobs_preallocations WHERE job_uuid = 'u-1'")
    assert db.reserved_of(conn, "user", "alice")[:3] == (20, 2, 2)
    assert db.reserved_drift(conn, "user") == [] and db.reserved_drift(conn, "account") == []
    # an owner row created while preallocations name it starts from its real totals
    conn.execute("SET SESSION foreign_key_checks = 0")
    _prealloc(conn, "u-9", "ghost", "physics", 7)
    conn.execute("SET SESSION foreign_key_checks = 1")
    conn.execute("INSERT INTO users (username) VALUES ('ghost')")
    assert db.reserved_of(conn, "user", "ghost")[:3] == (7, 1, 1)


@pytest.fixture
def mariadb_service(mariadb_ledger):
    """The application `serve` runs, over a seeded MariaDB ledger (tests/web/readside.py)."""
    from slurm_quota.app import Settings, create_app
    from tests.web.readside import SEED_SQL

    db.migrate(mariadb_ledger)
    conn = db.connect(mariadb_ledger)
    try:
        mariadb.execute_script(conn, "START TRANSACTION;\n" + SEED_SQL + "\nCOMMIT;")
    finally:
        conn.close()
    return create_app(Settings(db_path=mariadb_ledger))


def _get(service, target: str):
    import json

    from tests.web.readside import wsgi_request

    status, _headers, body = wsgi_request(service, "GET", target)
    return status, json.loads(body)


def test_serve_answers_from_a_mariadb_ledger(mariadb_service) -> None:
    from tests.web.readside import ACCOUNTS_OF, EXPECTED_ACCOUNTS, EXPECTED_USERS, numbers

    assert _get(mariadb_service, "/health") == (
        200,
        {"status": "ok", "schema_version": db.latest_version()},
    )
    _, body = _get(mariadb_service, "/stats")
    assert {r["username"]: numbers(r) for r in body["users"]} == EXPECTED_USERS
    assert {r["account"]: numbers(r) for r in body["accounts"]} == EXPECTED_ACCOUNTS
    for user, accounts in ACCOUNTS_OF.items():
        _, one = _get(mariadb_service, f"/stats?username={user}")
        assert [r["account"] for r in one["accounts"]] == accounts


def test_serve_sees_every_write_to_a_mariadb_ledger_at_once(mariadb_service, mariadb_ledger):
    # the cached whole-ledger answer follows each commit, even several in one second
    conn = db.connect(mariadb_ledger)
    try:
        for minutes in (4321, 4322, 4323):
            _get(mariadb_service, "/stats")  # cache it
            conn.execute(
                "UPDATE users SET total_consumed_cpu_minutes = ? WHERE username = 'carol'",
                (minutes,),
            )
            _, body = _get(mariadb_service, "/stats")
            carol = next(r for r in body["users"] if r["username"] == "carol")
            assert carol["total_consumed_cpu_minutes"] == minutes
    finally:
        conn.close()


def test_serve_connections_are_read_only_on_mariadb(mariadb_ledger) -> None:
    db.migrate(mariadb_ledger)
    conn = db.connect(mariadb_ledger, readonly=True)
    try:
        with pytest.raises(Exception, match="READ ONLY"):
            conn.execute("INSERT INTO settings (`key`, value) VALUES ('x', 'y')")
    finally:
        conn.close()


def _use_conf(tmp_path, ledger, monkeypatch) -> None:
    conf = tmp_path / "ledger.conf"
    conf.write_text(
        f"LedgerType=mariadb\nStorageHost={ledger.host}\nStoragePort={ledger.port}\n"
        f"StorageLoc={ledger.database}\nStorageUser={ledger.user}\n"
        f"StoragePass={ledger.password}\n"
    )
    os.chmod(conf, 0o600)
    monkeypatch.setenv("SLURM_QUOTA_CONF", str(conf))
    monkeypatch.delenv("SLURM_QUOTA_DB", raising=False)


def test_every_admin_and_read_command_works_on_mariadb(
    tmp_path, mariadb_ledger, monkeypatch, capsys
) -> None:
    _use_conf(tmp_path, mariadb_ledger, monkeypatch)
    assert main(["migrate"]) == 0
    commands = [
        ["user-quota", "alice", "500"],
        ["user-gpu-quota", "alice", "60"],
        ["account-quota", "physics", "9000"],
        ["account-gpu-quota", "physics", "600"],
        ["adjust", "--user", "alice", "--cpu", "--minutes=+30", "--reason", "refund"],
        ["set-default-quotas", "--user-cpu", "100"],
        ["set-gpu-factor", "h100", "2.0"],
        ["set-setting", "node_gpus", "gpu:h100:2"],
        ["default-quotas"],
        ["gpu-factors"],
        ["settings"],
        ["history", "--user", "alice"],
        ["stats", "--local", "--all"],
        ["prune", "--users", "--accounts"],
        ["check"],
    ]
    for argv in commands:
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 0, (argv, out, err)
        assert mariadb_ledger.password not in out + err
    conn = db.connect(mariadb_ledger)
    try:
        alice = db.get_owner(conn, "user", "alice")
        assert (alice["quota_cpu_minutes"], alice["total_consumed_cpu_minutes"]) == (500, 30)
        assert db.get_gpu_factor(conn, "h100") == 2.0
        assert len(db.read_journal(conn, limit=100)) >= 7
    finally:
        conn.close()


def test_the_charge_command_and_its_fast_path_work_on_mariadb(
    tmp_path, mariadb_ledger, monkeypatch, capsys
) -> None:
    from slurm_quota import slurm as S
    from slurm_quota.entry import charge_main
    from tests.unit.slurm_fixtures import case, runner_for

    _use_conf(tmp_path, mariadb_ledger, monkeypatch)
    db.migrate(mariadb_ledger)
    for k, v in case("gpus2_split")["env"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(S, "run_command", runner_for("gpus2_split"))
    assert charge_main([]) == 0
    assert "charged alice/research" in capsys.readouterr().out
    assert main(["charge"]) == 0
    assert "already charged" in capsys.readouterr().out


def test_a_writer_waiting_past_the_lock_timeout_exits_75(mariadb_ledger) -> None:
    db.migrate(mariadb_ledger)
    holder = db.connect(mariadb_ledger)
    waiter = db.connect(mariadb_ledger, busy_timeout_ms=1000)
    try:
        with db.write_transaction(holder):
            with pytest.raises(DatabaseUnavailable, match="locked") as info:
                with db.write_transaction(waiter):
                    pass
            assert info.value.exit_code == 75
    finally:
        holder.close()
        waiter.close()


def test_tls_that_cannot_be_set_up_is_refused_not_skipped(mariadb_ledger) -> None:
    from slurm_quota.config import ConfigError

    db.migrate(mariadb_ledger)
    # the test server has no TLS: the connection must fail, never fall back to plain text
    with pytest.raises(ConfigError, match="nothing was sent unencrypted"):
        db.connect(replace(mariadb_ledger, tls=True))


def test_a_server_killed_with_9_keeps_what_was_committed_and_nothing_else() -> None:
    from slurm_quota import charge as C
    from slurm_quota import check
    from tests.mariadb_server import _free_port, kill_server, require_mariadb, running_server

    def run(job_id: int) -> C.Run:
        start = 1_795_000_000
        return C.Run(job_id, start, start + 60, 2, "alice", "physics", job_state="COMPLETED")

    require_mariadb()
    with running_server(port=_free_port()) as server:  # its own: this one is killed
        ledger = server.new_database()
        db.migrate(ledger)
        conn = db.connect(ledger)
        C.apply_charge(conn, run(1), C.Allocation(None), "test")  # committed: 120 CPU-s
        conn.execute("START TRANSACTION")  # a second charge, in flight when the server dies
        C.charge_in_transaction(conn, run(2), C.Allocation(None), "test", {})
        kill_server(server)
        with pytest.raises(DatabaseUnavailable, match="not reachable"):
            conn.execute("COMMIT")
        conn.close()
        with pytest.raises(DatabaseUnavailable, match="not reachable"):
            db.connect(ledger)
        server.start()  # InnoDB's crash recovery
        conn = db.connect(ledger)
        try:
            assert db.owner_consumed_exact(conn, "user", "alice") == (120, 0)
            assert [r["job_id"] for r in db.read_charges(conn, limit=10)] == [1]
            assert check.check(conn).ok
            C.apply_charge(conn, run(2), C.Allocation(None), "test")  # charged again, once
            assert db.owner_consumed_exact(conn, "user", "alice") == (240, 0)
        finally:
            conn.close()


def test_storage_tls_no_means_no_tls_and_no_ssl_context(mariadb_ledger, monkeypatch) -> None:
    db.migrate(mariadb_ledger)
    # PyMySQL 1.2 "prefers" TLS when given no ssl option: it loads the system's CA store (36 ms
    # on every `charge`) and upgrades when the server offers TLS. StorageTLS=no asks for none.
    import ssl

    built = []
    real = ssl.create_default_context
    monkeypatch.setattr(ssl, "create_default_context", lambda *a, **k: built.append(1) or real())
    conn = db.connect(replace(mariadb_ledger, tls=False))
    try:
        assert conn.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'").fetchall()[0][1] == ""
    finally:
        conn.close()
    if mariadb._TAKES_SSL_DISABLED:
        assert built == []
