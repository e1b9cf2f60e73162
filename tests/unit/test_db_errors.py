"""db.connect maps SQLite failures to errors with the right exit codes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from slurm_quota import db
from slurm_quota.cli import main
from slurm_quota.errors import DatabaseMissing, SchemaError


def test_non_database_file_is_an_error_not_a_temporary_failure(tmp_path: Path, capsys) -> None:
    path = tmp_path / "ledger.db"
    path.write_bytes(b"this is not sqlite " * 20)
    before = path.read_bytes()
    with pytest.raises(SchemaError):
        db.connect(path)
    rc = main(["--db", str(path), "history"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "is not a SQLite database or is damaged" in err
    assert path.read_bytes() == before


def test_missing_database_is_not_created_by_connect(tmp_path: Path) -> None:
    path = tmp_path / "absent.db"
    with pytest.raises(DatabaseMissing):
        db.connect(path)
    assert not path.exists()


def _as_nobody(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         str(Path(sys.executable).parent / "slurm-quota"), *args],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip


@pytest.fixture
def shared_dir():
    """A directory every uid can reach (pytest's own tmp base is private to root)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to another uid")
    path = Path(tempfile.mkdtemp(prefix="slurm-quota-access-", dir="/tmp"))
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path)


def test_reconcile_is_refused_for_a_user_who_does_not_own_the_ledger(shared_dir: Path) -> None:
    path = shared_dir / "ledger.db"
    db.migrate(path)
    os.chmod(path, 0o666)
    before = path.read_bytes()
    proc = _as_nobody("--db", str(path), "reconcile")
    assert proc.returncode == 1, proc.stderr
    assert "runs as root or as the owner of" in proc.stderr
    assert path.read_bytes() == before


def test_unreachable_database_is_a_clear_error_not_a_traceback(shared_dir: Path) -> None:
    private = shared_dir / "private"
    private.mkdir(mode=0o700)
    db.migrate(private / "ledger.db")
    for argv in (["history"], ["reconcile"], ["charge"]):
        proc = _as_nobody("--db", str(private / "ledger.db"), *argv)
        assert "Traceback" not in proc.stderr, (argv, proc.stderr)
        assert proc.returncode == 1, (argv, proc.stderr)
        assert "cannot be accessed" in proc.stderr, (argv, proc.stderr)


def test_reconcile_is_allowed_for_the_ledger_owner(tmp_path: Path) -> None:
    from slurm_quota.access import require_ledger_writer
    from slurm_quota.errors import NotPermitted

    path = tmp_path / "ledger.db"
    db.migrate(path)
    real = os.getuid
    try:
        os.getuid = lambda: 4242  # type: ignore[assignment]
        with pytest.raises(NotPermitted):
            require_ledger_writer(str(path), "reconcile")
        os.chown(path, 4242, 4242) if real() == 0 else pytest.skip("needs root to chown")
        require_ledger_writer(str(path), "reconcile")
    finally:
        os.getuid = real  # type: ignore[assignment]


def test_a_wal_ledger_in_a_directory_the_reader_cannot_write_is_a_clear_error(
    shared_dir: Path,
) -> None:
    """No writer connected: SQLite removed -wal/-shm and a reader must create them."""
    closed = shared_dir / "closed"
    closed.mkdir(mode=0o755)  # root's: nobody can create q.db-shm here
    path = closed / "q.db"
    db.migrate(path)
    assert not Path(f"{path}-shm").exists()
    before = path.read_bytes()
    for argv in (["history"], ["check"], ["stats", "--local", "--all"]):
        proc = _as_nobody("--db", str(path), *argv)
        assert "Traceback" not in proc.stderr, (argv, proc.stderr)
        assert proc.returncode == 1, (argv, proc.stderr)  # not 75: retrying will not help
        assert "needs write access to its directory" in proc.stderr, (argv, proc.stderr)
        assert "slurm-quota stats" in proc.stderr
    assert path.read_bytes() == before
    assert sorted(p.name for p in closed.iterdir()) == ["q.db"]
