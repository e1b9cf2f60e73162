"""Man pages render without warnings, and slurm-quota(1) documents every command and option.

The coverage test walks the real click tree: a command without its own `.SS` section, or an
option or argument missing from its command's section, fails it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import click
import pytest

import slurm_quota
import slurm_quota.cli as cli_module
from slurm_quota.cli import cli
from tests import syspkgs

ROOT = Path(__file__).resolve().parents[2]
MAN = ROOT / "man"
PAGES = [MAN / "slurm-quota.1", MAN / "slurm-quota-web.1"]
WIDTH = 80


@pytest.fixture(scope="module")
def formatters() -> None:
    syspkgs.require(["groff-base", "man-db"])
    for tool in ("groff", "man"):
        if not shutil.which(tool):
            syspkgs.skip_or_fail(f"{tool} is not on PATH")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_groff_renders_without_warnings(formatters, page):
    proc = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", str(page)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0
    assert proc.stderr == "", proc.stderr


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_man_renders_without_warnings_within_80_columns(formatters, page):
    env = dict(os.environ, MANWIDTH=str(WIDTH), MANPAGER="cat", PAGER="cat", LANG="C.UTF-8")
    proc = subprocess.run(
        ["man", "--warnings", "-l", str(page)],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    assert "NAME" in proc.stdout and "SEE ALSO" in proc.stdout
    too_long = [line for line in proc.stdout.splitlines() if len(line) > WIDTH]
    assert not too_long, too_long


# --- slurm-quota(1) against the click tree -------------------------------------------------


def _plain(line: str) -> str:
    """Roff source line -> the text a reader sees (enough for matching names)."""
    line = re.sub(r"\\f(\[[^\]]*\]|.)", "", line)  # font changes
    line = line.replace("\\-", "-").replace("\\e", "\\").replace("\\c", "")
    line = line.replace("\\&", "").replace("\\ ", " ")
    return line


def _sections(page: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Return ({.SH title: text}, {.SS title: text}) of a roff page, text in _plain form."""
    sh: dict[str, list[str]] = {}
    ss: dict[str, list[str]] = {}
    cur_sh: list[str] | None = None
    cur_ss: list[str] | None = None
    for raw in page.read_text(encoding="utf-8").splitlines():
        if raw.startswith('.\\"'):
            continue
        line = _plain(raw)
        m = re.match(r"\.(SH|SS)\s+(.*)$", line)
        if m:
            title = m.group(2).strip().strip('"')
            if m.group(1) == "SH":
                cur_sh = sh.setdefault(title, [])
                cur_ss = None
            else:
                cur_ss = ss.setdefault(title, [])
            continue
        if cur_sh is not None:
            cur_sh.append(line)
        if cur_ss is not None:
            cur_ss.append(line)
    return ({k: "\n".join(v) for k, v in sh.items()}, {k: "\n".join(v) for k, v in ss.items()})


def _commands(group: click.Group, prefix: str = "") -> list[tuple[str, click.Command]]:
    """Every visible command of the tree, as ("parent child", command), recursively."""
    out = []
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            continue
        path = f"{prefix}{name}"
        out.append((path, cmd))
        if isinstance(cmd, click.Group):
            out.extend(_commands(cmd, path + " "))
    return out


def _long_options(cmd: click.Command) -> list[str]:
    names = []
    for p in cmd.params:
        if isinstance(p, click.Option) and not p.hidden:
            names += [o for o in [*p.opts, *p.secondary_opts] if o.startswith("--")]
    return [n for n in names if n != "--help"]


def _arguments(cmd: click.Command) -> list[str]:
    # A metavar may carry usage decoration: "[USER]", "FILES...".
    return [
        re.sub(r"[\[\].]", "", (p.metavar or p.name or "")).upper()
        for p in cmd.params
        if isinstance(p, click.Argument)
    ]


def _mentions(text: str, word: str) -> bool:
    return re.search(r"(?<![\w-])" + re.escape(word) + r"(?![\w-])", text) is not None


def missing_from_man() -> list[str]:
    """Everything of the click tree slurm-quota(1) does not document, one entry each."""
    sh, ss = _sections(MAN / "slurm-quota.1")
    missing = []
    for opt in _long_options(cli):
        if not _mentions(sh.get("GLOBAL OPTIONS", ""), opt):
            missing.append(f"global option {opt}")
    for path, cmd in _commands(cli):
        text = ss.get(path)
        if text is None:
            missing.append(f"command {path}")
            continue
        for opt in _long_options(cmd):
            if not _mentions(text, opt):
                missing.append(f"{path} {opt}")
        for arg in _arguments(cmd):
            if not _mentions(text, arg):
                missing.append(f"{path} argument {arg}")
    return missing


def test_every_command_option_and_argument_is_in_the_man_page():
    assert missing_from_man() == []


def _documented_options(text: str) -> set[str]:
    """Long options named in the item terms (the line after each .TP) of a section."""
    lines = text.splitlines()
    terms = [lines[i + 1] for i, line in enumerate(lines[:-1]) if line.strip() == ".TP"]
    return {o for term in terms for o in re.findall(r"--[a-z][\w-]*", term)}


def test_man_page_documents_nothing_the_cli_lacks():
    _, ss = _sections(MAN / "slurm-quota.1")
    commands = dict(_commands(cli))
    assert sorted(set(ss) - set(commands)) == []
    extra = {
        f"{name} {opt}"
        for name, text in ss.items()
        for opt in _documented_options(text) - set(_long_options(commands[name]))
    }
    assert sorted(extra) == []


def test_coverage_check_notices_a_missing_option(tmp_path, monkeypatch):
    # Guard against a check that cannot fail: add an option the page cannot know.
    cmd = cli.commands["stats"] if "stats" in cli.commands else next(iter(cli.commands.values()))
    extra = click.Option(["--not-documented-anywhere"], is_flag=True)
    monkeypatch.setattr(cmd, "params", [*cmd.params, extra])
    assert any(m.endswith("--not-documented-anywhere") for m in missing_from_man())


def test_exit_statuses_match_the_cli():
    sh, _ = _sections(MAN / "slurm-quota.1")
    documented = {int(n) for n in re.findall(r"^\.B (\d+)$", sh["EXIT STATUS"], re.M)}
    codes = {v for k, v in vars(cli_module).items() if k.startswith("EXIT_")}
    assert codes == {0, 1, 2, 75, 130}
    assert documented == codes


def test_environment_and_files_are_documented():
    sh, _ = _sections(MAN / "slurm-quota.1")
    for var in ("SLURM_QUOTA_DB", "SLURM_QUOTA_URL", "NO_COLOR", "SLURM_CONF",
                "SLURM_QUOTA_CONFIG"):
        assert _mentions(sh["ENVIRONMENT"], var), var
    for path in (
        slurm_quota.DEFAULT_DB_PATH,
        "slurm-quota.db-wal",
        "slurm-quota.db-shm",
        "/etc/default/slurm-quota",
        "/var/log/slurm/charge/slurm-quota-charge.log",
        "/var/spool/slurm-quota/charge/",
        "/usr/share/slurm-quota/job_submit.lua",
        "/usr/libexec/slurm-quota/slurm-quota-charge-wrapper",
    ):
        assert path in sh["FILES"], path
    for line in ("JobSubmitPlugins=lua", "JobCompType=jobcomp/script",
                 "JobCompLoc=/usr/libexec/slurm-quota/slurm-quota-charge-wrapper",
                 "AccountingStorageTRES=gres/gpu,gres/gpu:"):
        assert line in sh["SLURM CONFIGURATION"], line


def test_pages_carry_the_package_version():
    for page in PAGES:
        th = next(line for line in page.read_text().splitlines() if line.startswith(".TH "))
        assert f'"slurm-quota {slurm_quota.__version__}"' in th, page.name
