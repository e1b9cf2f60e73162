"""db.connect maps SQLite failures to errors with the right exit codes."""

from __future__ import annotations

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
