"""Debian root filesystems that give the lab another Slurm release on this machine.

Owns: which Slurm each Debian release ships, building a root filesystem of that release from
Debian's own packages (mmdebstrap), caching it outside the checkout, and the mounts a lab
needs to run daemons and clients inside it (chroot). It never changes the cached tree while a
lab runs: each lab gets an overlay (lower = the cached tree, upper = the lab's own directory),
and every mount it makes lies under the lab directory, where `unmount_under` removes them.

The cache: $SLURM_QUOTA_ROOTFS_CACHE (default /var/cache/slurm-quota-lab)/<release>/, with a
stamp file naming the packages it was built with; a missing tree, or one built from another
package list, is built again (into a temporary directory, then renamed into place).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

CACHE_ENV = "SLURM_QUOTA_ROOTFS_CACHE"
DEFAULT_CACHE = "/var/cache/slurm-quota-lab"
MIRROR = "http://deb.debian.org/debian"

# Debian release -> the Slurm series its slurm-wlm packages carry (checked against the
# installed slurmctld's version by the lab).
SLURM_OF = {"bookworm": "22.05", "trixie": "24.11", "sid": "26.05"}
RELEASES = tuple(SLURM_OF)

# What a lab runs, on the host (its own release) and in a tree: the daemons, the clients, the
# plugins (job_submit_lua and jobcomp_script are in slurm-wlm-basic-plugins), munge (only
# Recommended by sid's slurm: named explicitly), MariaDB for slurmdbd (and a MariaDB ledger),
# and the Lua that slurmctld links with LuaDBI (SQLite3 and MySQL drivers) and luaposix.
SLURM_LAB_PACKAGES = (
    "slurmctld",
    "slurmd",
    "slurmdbd",
    "slurm-client",
    "slurm-wlm-basic-plugins",
    "munge",
    "mariadb-server",
    "mariadb-client",
    "lua5.1",
    "lua-dbi-sqlite3",
    "lua-dbi-mysql",
    "lua-posix",
    "sqlite3",
)
# A tree also needs the system python3 with the CLI's libraries (the charge wrapper and the
# service run the CLI inside the tree).
PACKAGES = SLURM_LAB_PACKAGES + (
    "python3",
    "python3-click",
    "python3-tabulate",
    "python3-requests",
    "python3-waitress",
    # the CLI's MariaDB driver: the wrapper charges a MariaDB ledger (SLURM_QUOTA_LAB_LEDGER)
    "python3-pymysql",
    "procps",
)
# Extra packages the project's CLI needs in the tree beyond the list above (e.g. the WSGI
# server); appended here so that a change rebuilds the tree.
EXTRA_PACKAGES: tuple[str, ...] = ()


class RootfsError(RuntimeError):
    """A root filesystem could not be built or mounted; the message says why."""


def host_release() -> str:
    """The codename of the Debian release this machine runs (bookworm, trixie, ...)."""
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            key, _, value = line.partition("=")
            if key == "VERSION_CODENAME" and value.strip('"'):
                return value.strip('"')
    return "bookworm"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def _stamp_text(release: str) -> str:
    packages = ",".join(PACKAGES + EXTRA_PACKAGES)
    digest = hashlib.sha256(f"{release}\n{MIRROR}\n{packages}".encode()).hexdigest()[:16]
    return f"{release} {digest}\n"


def tree(release: str) -> Path:
    return cache_dir() / release


def is_built(release: str) -> bool:
    stamp = tree(release) / ".slurm-quota-rootfs"
    try:
        return stamp.read_text() == _stamp_text(release)
    except OSError:
        return False


def ensure(release: str, log: Path | None = None) -> Path:
    """The cached tree of release, built now when missing or stale. Returns its path."""
    if release not in SLURM_OF:
        raise RootfsError(f"unknown release {release!r}; known: {', '.join(RELEASES)}")
    if is_built(release):
        return tree(release)
    if os.geteuid() != 0:
        raise RootfsError(f"building the {release} root filesystem needs root")
    if not shutil.which("mmdebstrap"):
        from tests import syspkgs

        reason = syspkgs.ensure(["mmdebstrap"])
        if reason:
            raise RootfsError(f"mmdebstrap is needed to build the {release} tree: {reason}")
    cache_dir().mkdir(parents=True, exist_ok=True)
    target = tree(release)
    building = target.with_name(f"{release}.building.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(building)
    argv = [
        "mmdebstrap",
        "--variant=apt",
        "--mode=root",
        "--format=directory",
        # sid's Release file on the mirror can be past its Valid-Until date.
        '--aptopt=Acquire::Check-Valid-Until "false"',
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        f"--include={','.join(PACKAGES + EXTRA_PACKAGES)}",
        release,
        str(building),
        MIRROR,
    ]
    t0 = time.monotonic()
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    try:
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=1800)
    finally:
        if log:
            out.close()
    if proc.returncode != 0:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(building)
        tail = log.read_text(errors="replace")[-2000:] if log else ""
        raise RootfsError(f"mmdebstrap {release} exited {proc.returncode}\n{tail}")
    (building / ".slurm-quota-rootfs").write_text(_stamp_text(release))
    (building / ".slurm-quota-build-seconds").write_text(f"{time.monotonic() - t0:.1f}\n")
    old = target.with_name(f"{release}.old.{os.getpid()}")
    if target.exists():
        os.rename(target, old)
    os.rename(building, target)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(old)
    return target


# ---------------------------------------------------------------------------------- mounts


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below path (from /proc/self/mountinfo), deepest first."""
    base = str(path.resolve())
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point == base or point.startswith(base + "/"):
                found.append(point)
    return sorted(set(found), key=lambda p: (-p.count("/"), p))


def unmount_under(path: Path) -> None:
    """Unmount everything mounted at or below path; raise when something stays mounted."""
    for _ in range(5):
        points = mounts_under(path)
        if not points:
            return
        for point in points:
            subprocess.run(["umount", point], capture_output=True)
        for point in mounts_under(path):
            # still busy (a process of the lab not yet reaped): detach it
            subprocess.run(["umount", "-l", point], capture_output=True)
        time.sleep(0.1)
    left = mounts_under(path)
    if left:
        raise RootfsError(f"still mounted under {path}: {left}")


def _mount(*argv: str) -> None:
    proc = subprocess.run(["mount", *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RootfsError(f"mount {' '.join(argv)}: {proc.stderr.strip()}")


def _inside(root: Path, path: Path) -> Path:
    return root / str(path.resolve()).lstrip("/")


def mount_lab_root(
    release: str,
    overlay_dir: Path,
    root: Path,
    binds: list[tuple[Path, bool]],
    log: Path | None = None,
) -> None:
    """Mount the release's tree at root (overlay, upper in overlay_dir) with /proc, /sys, /dev
    and the given host directories (path, read_only) at the same paths inside."""
    lower = ensure(release, log)
    upper, work = overlay_dir / "upper", overlay_dir / "work"
    for d in (upper, work, root):
        d.mkdir(parents=True, exist_ok=True)
    _mount(
        "-t",
        "overlay",
        "overlay",
        "-o",
        f"lowerdir={lower},upperdir={upper},workdir={work}",
        str(root),
    )
    _mount("-t", "proc", "proc", str(root / "proc"))
    # slurmd needs /sys/fs/cgroup too: bind recursively, and never let an unmount inside
    # propagate back to the host (rslave).
    for host in ("/sys", "/dev"):
        _mount("--rbind", host, str(root / host.lstrip("/")))
        _mount("--make-rslave", str(root / host.lstrip("/")))
    for path, read_only in binds:
        target = _inside(root, path)
        target.mkdir(parents=True, exist_ok=True)
        _mount("--bind", str(path), str(target))
        if read_only:
            _mount("-o", "remount,bind,ro", str(target))
    with contextlib.suppress(OSError):
        shutil.copyfile("/etc/hosts", root / "etc" / "hosts")
        shutil.copyfile("/etc/resolv.conf", root / "etc" / "resolv.conf")
