"""Bash completion: the shipped script is click's, current, and completes in a real bash."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from slurm_quota.cli import cli

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "packaging" / "completion" / "slurm-quota.bash"
VENV_BIN = Path(sys.executable).parent


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("_SLURM_QUOTA_COMPLETE")}
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    env.update(extra)
    return env


def test_shipped_completion_equals_regenerated():
    proc = subprocess.run(
        [str(VENV_BIN / "slurm-quota")],
        env=_env(_SLURM_QUOTA_COMPLETE="bash_source"),
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), "click printed no completion script"
    assert SHIPPED.read_text(encoding="utf-8") == proc.stdout, (
        "packaging/completion/slurm-quota.bash is stale: run `make completion` and commit it"
    )


def _complete(words: list[str]) -> list[str]:
    """Source the shipped script in bash and return COMPREPLY for the words typed."""
    if not shutil.which("bash"):
        pytest.fail("bash is missing")
    quoted = " ".join("'" + w.replace("'", "'\\''") + "'" for w in words)
    script = (
        f"source '{SHIPPED}'\n"
        f"COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}\n"
        "_slurm_quota_completion slurm-quota\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    proc = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", script],
        env=_env(), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return [line for line in proc.stdout.splitlines() if line]


def test_completes_every_command_name():
    assert sorted(_complete(["slurm-quota", ""])) == sorted(
        name for name, cmd in cli.commands.items() if not cmd.hidden
    )


def test_completes_command_prefix():
    got = _complete(["slurm-quota", "set-"])
    assert got and all(name.startswith("set-") for name in got)
    assert sorted(got) == sorted(n for n in cli.commands if n.startswith("set-"))


def test_completes_global_option():
    assert "--db" in _complete(["slurm-quota", "--d"])


def test_completes_options_of_a_subcommand():
    name, command = next(
        (n, c) for n, c in sorted(cli.commands.items())
        if any(o.startswith("--") and o != "--help" for p in c.params
               if isinstance(p, click.Option) for o in p.opts)
    )
    expected = {
        o for p in command.params if isinstance(p, click.Option) and not p.hidden
        for o in p.opts if o.startswith("--")
    }
    got = set(_complete(["slurm-quota", name, "--"]))
    assert expected <= got, (name, expected - got)
