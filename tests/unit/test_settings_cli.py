"""`settings` / `set-setting`: the plugin settings an admin sets without raw SQL."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from slurm_quota import db
from slurm_quota.cli import main


def _settings(path: Path) -> dict[str, str]:
    conn = db.connect(path)
    try:
        return {r[0]: r[1] for r in conn.execute("SELECT key, value FROM settings")}
    finally:
        conn.close()


def _journal(path: Path) -> list[tuple]:
    conn = db.connect(path)
    try:
        return [
            tuple(r)
            for r in conn.execute(
                "SELECT action, target, old_value, new_value, reason FROM journal ORDER BY id"
            )
        ]
    finally:
        conn.close()


def test_set_setting_stores_normalised_value_and_journals(db_path: Path, capsys) -> None:
    assert main(["--db", str(db_path), "set-setting", "node_gpus", " gpu:h100:2, gpu:a100:2 ",
                 "--reason", "new nodes"]) == 0  # fmt: skip
    assert capsys.readouterr().out == "node_gpus: not set -> gpu:h100:2,gpu:a100:2\n"
    assert main(["--db", str(db_path), "set-setting", "node_gpus.gpu", "gpu:8"]) == 0
    assert main(["--db", str(db_path), "set-setting", "default_time_minutes", "60"]) == 0
    assert _settings(db_path) == {
        "node_gpus": "gpu:h100:2,gpu:a100:2",
        "node_gpus.gpu": "gpu:8",
        "default_time_minutes": "60",
    }
    assert _journal(db_path)[0] == (
        "set-setting", "node_gpus", None, "gpu:h100:2,gpu:a100:2", "new nodes")


def test_unset_removes_the_key_and_journals_old_value(db_path: Path) -> None:
    assert main(["--db", str(db_path), "set-setting", "default_time_minutes", "45"]) == 0
    assert main(["--db", str(db_path), "set-setting", "--unset", "default_time_minutes"]) == 0
    assert _settings(db_path) == {}
    assert _journal(db_path)[-1] == ("set-setting", "default_time_minutes", "45", None, None)


@pytest.mark.parametrize(
    "argv",
    [
        ["default_time_minutes", "0"],
        ["default_time_minutes", "-5"],
        ["default_time_minutes", "1.5"],
        ["default_time_minutes", "abc"],
        ["node_gpus", "gpu:h100:x"],
        ["node_gpus", "gpu:h100:0"],
        ["node_gpus", "mps:4"],
        ["node_gpus", ""],
        ["node_gpus.bad partition", "gpu:2"],
        ["default_user_quota_cpu_minutes", "5"],
        ["bogus", "1"],
        ["node_gpus"],
        ["--unset", "node_gpus", "gpu:2"],
    ],
)
def test_bad_settings_are_refused_with_exit_2_and_no_change(db_path: Path, argv, capsys) -> None:
    before = db_path.read_bytes()
    assert main(["--db", str(db_path), "set-setting", *argv]) == 2
    assert capsys.readouterr().err.strip()
    assert _settings(db_path) == {}
    assert _journal(db_path) == []
    assert db_path.read_bytes() == before


def test_set_setting_of_a_non_root_uid_goes_to_the_service(
    db_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(os, "getuid", lambda: 65534)
    monkeypatch.setenv("SLURM_QUOTA_MUNGE_SOCKET", "/nonexistent/munge.socket.2")
    assert main(["--db", str(db_path), "set-setting", "node_gpus", "gpu:2"]) == 75
    assert "Cannot prove who you are to the service" in capsys.readouterr().err
    assert _settings(db_path) == {}


def test_settings_lists_everything_in_json(db_path: Path, capsys) -> None:
    main(["--db", str(db_path), "set-default-quotas", "--user-cpu", "100"])
    main(["--db", str(db_path), "set-setting", "node_gpus", "gpu:4"])
    capsys.readouterr()
    assert main(["--db", str(db_path), "settings", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "default_user_quota_cpu_minutes": "100",
        "node_gpus": "gpu:4",
    }


def test_plugin_reserves_node_gpus_set_by_the_cli_for_exclusive_jobs(db_path: Path) -> None:
    from tests.lua.harness import Plugin, prealloc, submit_case

    assert main(["--db", str(db_path), "set-setting", "node_gpus", "gpu:h100:2,gpu:a100:2"]) == 0
    assert main(["--db", str(db_path), "set-gpu-factor", "h100", "2.0"]) == 0
    plugin = Plugin("lua51", db_path)
    res = plugin.submit(submit_case("c06_exclusive", time_limit=10.0))
    # the whole node: 16 CPUs x 10 min; GPUs (2 x 2.0 + 2 x 1.0) x 10 min
    assert prealloc(db_path, res.uuid)[2:4] == (160, 60)
