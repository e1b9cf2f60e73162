"""Run tests/unit under CPython 3.9 with the library versions EL9 ships (`make test-py39`).

EL9's python3 is 3.9 and its sqlite-libs 3.34.1; Debian 11 (bullseye) has both (python3.9
3.9.2, libsqlite3-0 3.34.1), so a bullseye root filesystem gives a real CPython 3.9 linked to
the same SQLite. Inside it a venv holds this checkout (editable, from /src) with its [test]
and [mariadb] extras, resolved under the pins of tests/py39/el9-constraints.txt (click,
tabulate, requests, PyMySQL as EL9 + EPEL 9 package them): a pyproject.toml range that
excludes an EL9 version fails there. tests/lua runs too (lupa), as its harness executes the
plugin's SQL with Python's sqlite3, so with EL9's SQLite.

    python -m tests.py39.run [PYTEST ARGS...]
        default: tests/unit tests/lua -m 'not integration and not mariadb'

Root only (mmdebstrap, mount, chroot). The tree is built once with mmdebstrap into
SLURM_QUOTA_PY39_ROOT (default /var/cache/slurm-quota-lab/bullseye-py39, outside the
checkout) and rebuilt when missing or incomplete; the venv is rebuilt when the constraints,
pyproject.toml or the package version change. For each run the checkout is bind-mounted on
/src (with /proc and /dev), and everything mounted is unmounted afterwards whatever happens.
Without root or mmdebstrap the run is skipped with the reason on stderr (exit 0), or fails
(exit 1) when SLURM_QUOTA_REQUIRE_SYSTEM=1, as the rest of the suite does.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONSTRAINTS = ROOT / "tests" / "py39" / "el9-constraints.txt"
TREE = Path(os.environ.get("SLURM_QUOTA_PY39_ROOT", "/var/cache/slurm-quota-lab/bullseye-py39"))
MIRROR = os.environ.get("SLURM_QUOTA_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bullseye"
DEBS = ["python3", "python3-venv", "ca-certificates"]
VENV = "/opt/slurm-quota-py39"  # inside the tree
SRC = "/src"  # where the checkout is mounted inside the tree
PYCACHE = "/var/cache/slurm-quota-pycache"  # inside the tree
COMPLETE = ".slurm-quota-py39-complete"  # written last by a successful build
EL9 = {"python": "3.9", "sqlite": "3.34.1"}
REQUIRE_ENV = "SLURM_QUOTA_REQUIRE_SYSTEM"
# tests/unit, and tests/lua for the plugin's SQL: its harness runs it through Python's sqlite3,
# here the 3.34.1 of EL9. Not the lab (integration); tests needing Debian packages (real lua5.1,
# luacheck) skip with the reason (tests/py39/no_system_packages.py). The MariaDB ledger tests
# (marker mariadb) need a server, which this tree has not: they run on the host (PyMySQL at
# EL9's version is installed, so their modules import).
DEFAULT_ARGS = ["tests/unit", "tests/lua", "-m", "not integration and not mariadb"]
HOST_CA = "/etc/ssl/certs/ca-certificates.crt"


class Unavailable(Exception):
    """What the run needs from the machine is missing (mmdebstrap cannot be installed)."""


def say(msg: str) -> None:
    print(f"[py39] {msg}", file=sys.stderr, flush=True)


def skip_or_fail(reason: str) -> int:
    if os.environ.get(REQUIRE_ENV, "") not in ("", "0", "false", "no"):
        say(f"FAILED: {reason} ({REQUIRE_ENV} is set, so this cannot be skipped)")
        return 1
    say(f"SKIPPED LOUDLY: {reason}")
    return 0


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below path, deepest first."""
    prefix = str(path.resolve())
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return sorted(found, key=len, reverse=True)


def umount_all(path: Path) -> None:
    for point in mounts_under(path):
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", point], check=True)


def remove_tree(path: Path) -> None:
    """rm -rf a root filesystem, never through a mount (a bind-mounted checkout above all)."""
    if mounts_under(path):
        umount_all(path)
    if mounts_under(path):
        raise RuntimeError(f"{path} still has mounts: {mounts_under(path)}")
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


def chroot_run(cmd: list[str], *, env: dict[str, str], cwd: str = "/", check: bool = True,
               timeout: float | None = None) -> int:
    tree = str(TREE)

    def enter() -> None:
        os.chroot(tree)
        os.chdir(cwd)

    # Its own process group, so that an interrupted run leaves nothing behind (servers that
    # tests start included) and the checkout can be unmounted.
    proc = subprocess.Popen(cmd, env=env, preexec_fn=enter, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    if check and rc != 0:
        raise RuntimeError(f"in {TREE}: {' '.join(cmd)} exited {rc}")
    return rc


def base_env() -> dict[str, str]:
    return {
        "PATH": f"{VENV}/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_DEFAULT_TIMEOUT": "180",
    }


def build_tree() -> None:
    """mmdebstrap a bullseye tree with python3 into TREE (atomically: build aside, rename)."""
    if not shutil.which("mmdebstrap"):
        from tests import syspkgs

        reason = syspkgs.ensure(["mmdebstrap"])
        if reason:
            raise Unavailable(reason)
    if TREE.exists():
        say(f"{TREE} is incomplete; rebuilding it")
        remove_tree(TREE)
    TREE.parent.mkdir(parents=True, exist_ok=True)
    building = TREE.with_name(f"{TREE.name}.building.{os.getpid()}")
    if building.exists():
        remove_tree(building)
    say(f"building {TREE} (mmdebstrap {SUITE}, about a minute)")
    started = time.monotonic()
    subprocess.run(
        ["mmdebstrap", "--variant=apt", f"--include={','.join(DEBS)}", SUITE, str(building),
         MIRROR],
        check=True, stdout=subprocess.DEVNULL,
    )
    (building / COMPLETE).write_text(f"{SUITE} {MIRROR}\n")
    building.rename(TREE)
    say(f"built {TREE} in {time.monotonic() - started:.0f} s")


def venv_digest() -> str:
    h = hashlib.sha256()
    for path in (CONSTRAINTS, ROOT / "pyproject.toml", ROOT / "slurm_quota" / "__init__.py",
                 Path(__file__)):
        h.update(path.read_bytes())
    return h.hexdigest()


@contextlib.contextmanager
def mounted():
    """/proc, /dev and the checkout (on /src) mounted in the tree; all unmounted on exit."""
    umount_all_inside = [TREE / "proc", TREE / "dev", TREE / SRC.lstrip("/")]
    for point in umount_all_inside:  # left over by a killed run
        umount_all(point)
    try:
        (TREE / "proc").mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "proc", "proc", str(TREE / "proc")], check=True)
        subprocess.run(["mount", "--bind", "/dev", str(TREE / "dev")], check=True)
        (TREE / SRC.lstrip("/")).mkdir(exist_ok=True)
        subprocess.run(["mount", "--bind", str(ROOT), str(TREE / SRC.lstrip("/"))], check=True)
        yield
    finally:
        for point in reversed(umount_all_inside):
            umount_all(point)


def ensure_venv() -> None:
    """The venv with EL9's pins, the test tools and /src (editable); rebuilt on change."""
    stamp = TREE / VENV.lstrip("/") / ".slurm-quota-digest"
    digest = venv_digest()
    if stamp.exists() and stamp.read_text() == digest:
        return
    say(f"creating the venv {VENV} in {TREE} (pip from PyPI)")
    started = time.monotonic()
    venv = TREE / VENV.lstrip("/")
    if venv.exists():
        shutil.rmtree(venv)
    # Name resolution for pip, and EL9's pins for every pip in the tree (test_wheel's too).
    shutil.copyfile("/etc/resolv.conf", TREE / "etc" / "resolv.conf")
    pinned = TREE / "etc" / "slurm-quota-el9-constraints.txt"
    shutil.copyfile(CONSTRAINTS, pinned)
    # The host's CA bundle: it trusts whatever TLS proxy stands between this machine and PyPI.
    shutil.copyfile(HOST_CA, TREE / "etc" / "slurm-quota-host-ca.crt")
    (TREE / "etc" / "pip.conf").write_text(
        "# Written by slurm-quota tests/py39/run.py: EL9's library versions for every pip here.\n"
        "[global]\nconstraint = /etc/slurm-quota-el9-constraints.txt\n"
        "cert = /etc/slurm-quota-host-ca.crt\n"
    )
    env = base_env()
    chroot_run(["/usr/bin/python3", "-m", "venv", VENV], env=env)
    pip = [f"{VENV}/bin/python", "-m", "pip", "install", "-q"]
    # bullseye's pip 20.3 cannot install a pyproject-only project in editable mode (PEP 660).
    chroot_run([*pip, "--upgrade", "pip>=21.3"], env=env)
    # The project with its [test] and [mariadb] extras: pip must find that pyproject.toml's
    # ranges accept every EL9 pin (pip.conf above), else this fails here, before any test.
    # PyMySQL at EL9's version: slurm_quota.mariadb imports under it (no server here, so the
    # tests marked mariadb are deselected).
    chroot_run([*pip, "-e", f"{SRC}[test,mariadb]"], env=env, cwd=SRC)
    chroot_run([f"{VENV}/bin/python", "-m", "pip", "check"], env=env)
    # Byte code of /src goes to the tree, not the checkout: every process of this venv, even
    # the ones tests start with a clean environment, reads this .pth at start-up.
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = subprocess.run(["chroot", str(TREE), f"{VENV}/bin/python", "-c", code], env=env,
                          capture_output=True, text=True, check=True).stdout.strip()
    (TREE / site.lstrip("/") / "zz_slurm_quota_pycache.pth").write_text(
        f"import sys; sys.pycache_prefix = {PYCACHE!r}\n"
    )
    stamp.write_text(digest)
    say(f"venv ready in {time.monotonic() - started:.0f} s")


def ensure_slurm_user() -> None:
    """A system user `slurm`, as on a controller (test_migrations chowns the ledger to it)."""
    if not any(line.startswith("slurm:") for line in (TREE / "etc" / "passwd").open()):
        chroot_run(["useradd", "--system", "--user-group", "--no-create-home",
                    "--shell", "/usr/sbin/nologin", "slurm"], env=base_env())


def report_versions() -> None:
    code = (
        "import sys, sqlite3, importlib.metadata as m\n"
        "print('python', sys.version.split()[0], '| sqlite', sqlite3.sqlite_version, '|',\n"
        "      ', '.join(f'{p} {m.version(p)}' for p in\n"
        "                ('click', 'tabulate', 'requests', 'urllib3', 'pytest')))\n"
        f"assert sys.version_info[:2] == (3, 9), sys.version\n"
        f"assert sqlite3.sqlite_version == {EL9['sqlite']!r}, sqlite3.sqlite_version\n"
    )
    chroot_run([f"{VENV}/bin/python", "-c", code], env=base_env())


def interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    if sys.platform != "linux" or os.geteuid() != 0:
        return skip_or_fail("tests/py39 needs root (mmdebstrap, mount, chroot)")
    # TERM and HUP (a CI timeout, a closed terminal) unwind like ^C: the finally blocks stop
    # the tests and unmount. INT too, even when the shell started us with it ignored.
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, interrupted)
    TREE.parent.mkdir(parents=True, exist_ok=True)
    lock = open(TREE.with_name(f"{TREE.name}.lock"), "w")  # one run at a time per tree
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        if not (TREE / COMPLETE).exists():
            try:
                build_tree()
            except Unavailable as exc:
                return skip_or_fail(f"cannot build the Python 3.9 tree: {exc}")
        with mounted():
            ensure_venv()
            ensure_slurm_user()
            report_versions()
            args = argv or DEFAULT_ARGS
            env = base_env()
            for key in (REQUIRE_ENV, "PYTHONUNBUFFERED"):
                if key in os.environ:
                    env[key] = os.environ[key]
            say(f"running pytest {' '.join(args)} under Python 3.9")
            started = time.monotonic()
            rc = chroot_run(
                [f"{VENV}/bin/python", "-m", "pytest", "-p", "no:cacheprovider",
                 "-p", "tests.py39.no_system_packages", *args],
                env=env, cwd=SRC, check=False,
            )
            say(f"pytest exited {rc} after {time.monotonic() - started:.0f} s")
            return rc
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt as exc:
        say(f"interrupted ({exc or 'SIGINT'}); tests stopped, tree unmounted")
        sys.exit(130)
