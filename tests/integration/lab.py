"""A real single-node Slurm lab: munged, MariaDB, slurmdbd, slurmctld and slurmd, all private.

Owns: bringing the lab up from nothing under one directory (default /tmp/slurmlab, env
SLURM_QUOTA_LAB_DIR) on loopback ports (base 16817, env SLURM_QUOTA_LAB_PORT_BASE), running
Slurm clients against it, and stopping exactly the processes it started. It must never touch a
process it cannot prove is its own: daemons are found by the PID files in this lab's run/
directory and checked by name and by the lab marker in their environment.

Several Slurm releases: SLURM_QUOTA_LAB_RELEASE (or --release) picks the Debian release whose
Slurm the lab runs: the host's own (bookworm = Slurm 22.05 on Debian 12) runs the host's
packages; another (trixie = 24.11, sid = 26.05) runs the daemons and every Slurm client inside
a root filesystem of that release (tests/integration/rootfs.py: built once with mmdebstrap,
cached outside the checkout, mounted per lab as an overlay and entered with chroot).

Usable as a module (`Lab`, used by tests/integration/conftest.py) and as a command:

    python -m tests.integration.lab [--release R] up|down [--purge]|status|env|exec -- CMD...

Standard library only (plus tests.syspkgs to install the Debian packages when root).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import string
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

try:
    from tests.integration import rootfs
except ImportError:  # run as a script from outside the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.integration import rootfs

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = Path(__file__).resolve().parent / "templates"

DIR_ENV = "SLURM_QUOTA_LAB_DIR"
PORT_ENV = "SLURM_QUOTA_LAB_PORT_BASE"
RELEASE_ENV = "SLURM_QUOTA_LAB_RELEASE"
DEFAULT_ROOT = "/tmp/slurmlab"
DEFAULT_PORT_BASE = 16817
# Labs of other releases default to their own directory and ports (/tmp/slurmlab-sid, base +
# 100 per release), so that labs of two releases can run side by side.
RELEASE_PORT_OFFSET = {"bookworm": 0, "trixie": 100, "sid": 200}
# Set in the environment of every daemon the lab starts (and, via slurm-quota.conf, of the
# jobcomp wrapper): `down` kills leftovers only when this carries this lab's directory.
MARKER = "SLURM_QUOTA_LAB_OWNER"

# The host lab installs the same Slurm packages a tree of another release has.
PACKAGES = list(rootfs.SLURM_LAB_PACKAGES)

CLUSTER = "lab"
ACCOUNTS = ("research", "physics")
# user -> (default account, every account)
USERS = {
    "alice": ("research", ("research", "physics")),
    "bob": ("physics", ("physics",)),
    "root": ("research", ("research",)),
}
UNIX_USERS = ("alice", "bob")
MYSQL_PASSWORD = "slurmpw"
# The ledger: a SQLite file (default) or a database in the lab's own MariaDB (the one slurmdbd
# uses), named by a 0600 configuration file that the plugin, the charge wrapper and the CLI read.
LEDGER_ENV = "SLURM_QUOTA_LAB_LEDGER"
LEDGERS = ("sqlite", "mariadb")
LEDGER_DATABASE, LEDGER_USER, LEDGER_PASSWORD = "slurm_quota", "slurm_quota", "quotapw"


def session_ledgers() -> list[str]:
    """The ledger engines a test session runs on: SLURM_QUOTA_LAB_LEDGER (one, or several
    separated by commas, e.g. `sqlite,mariadb`, as `make test` sets it), else every engine."""
    chosen = [e.strip() for e in os.environ.get(LEDGER_ENV, "").split(",") if e.strip()]
    return chosen or list(LEDGERS)

# Start order; stop runs in reverse, in the waves of STOP_WAVES.
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")
STOP_WAVES = (("slurmd", "slurmctld"), ("slurmdbd",), ("mariadbd", "munged"))
# slurmctld drains its whole jobcomp backlog on SIGTERM before it exits.
STOP_TIMEOUT_S = {"slurmctld": 120.0}
DEFAULT_STOP_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 60.0
POLL_S = 0.1

FINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "SPECIAL_EXIT",
        "TIMEOUT",
    }
)
# What set_jobcomp(False) puts at JobCompLoc: it charges nothing but logs one line to the
# charge log, so a test can see that slurmctld has run jobcomp for the job.
NOOP_MARK = "jobcomp off (Lab.set_jobcomp(False)): not charged"
NOOP_JOBCOMP = """#!/bin/sh
# slurm-quota lab: the charge wrapper is switched off (Lab.set_jobcomp(False)).
echo "$(date '+%Y-%m-%dT%H:%M:%S%z') job ${{JOBID:-?}} \\
(${{USERNAME:-?}}/${{ACCOUNT:-?}} ${{JOBSTATE:-?}}): {mark}" >> {log}
exit 0
"""
# Inherited variables that would change what a Slurm client does or prints.
_CLIENT_ENV_DROP = re.compile(r"^(SLURM_|SBATCH_|SALLOC_|SRUN_|SQUEUE_|SACCT_|SINFO_|SCONTROL_)")


class LabError(RuntimeError):
    """The lab could not be brought up, driven or stopped; the message says why."""


class LabCommandError(LabError):
    """A Slurm client run with check=True exited non-zero."""

    def __init__(self, argv: list[str], proc: subprocess.CompletedProcess) -> None:
        self.proc = proc
        super().__init__(
            f"`{' '.join(argv)}` exited {proc.returncode}\n"
            f"stdout: {proc.stdout.strip()}\nstderr: {proc.stderr.strip()}"
        )


@dataclass(frozen=True)
class SbatchResult:
    """What one sbatch returned: job_id is None when the submission was refused."""

    rc: int
    job_id: int | None
    stdout: str
    stderr: str


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no {path})"
    return "\n".join(text.splitlines()[-lines:])


def _proc_state(pid: int) -> str | None:
    """Return the one-letter state of pid, or None when there is no such process."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and parentheses: the state follows the last ')'.
    return data[data.rindex(")") + 2 :].split(" ", 1)[0]


def alive(pid: int) -> bool:
    """True when pid is a running process (a zombie counts as gone, and is reaped if ours)."""
    state = _proc_state(pid)
    if state == "Z":
        # Our own child (mariadbd is started with Popen): reap it.
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return state is not None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def _argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _ancestors() -> set[int]:
    """This process and its parents: never killed by a sweep."""
    pids = set()
    pid = os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            data = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(data[data.rindex(")") + 2 :].split(" ")[1])
    return pids


def _hostname_is_loopback() -> bool:
    try:
        return socket.gethostbyname(socket.gethostname()).startswith("127.")
    except OSError:
        return False


def _quota_bin() -> str:
    """The slurm-quota entry point of the interpreter running this (the repo's venv)."""
    candidates = [
        Path(sys.executable).parent / "slurm-quota",
        REPO / ".venv" / "bin" / "slurm-quota",
    ]
    for cand in candidates:
        if cand.exists():
            return str(cand)
    return shutil.which("slurm-quota") or str(candidates[-1])


def _read_pid(path: Path) -> int | None:
    """The PID in a PID file, or None while it is missing, empty or half written."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _render(template: str, **values: str) -> str:
    return string.Template((TEMPLATES / template).read_text()).substitute(values)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


class Lab:
    """One lab: its directory, ports, daemons, and helpers to drive Slurm inside it."""

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        port_base: int | None = None,
        release: str | None = None,
        ledger: str | None = None,
    ):
        self.release = release or os.environ.get(RELEASE_ENV) or rootfs.host_release()
        self.ledger_type = ledger or os.environ.get(LEDGER_ENV) or "sqlite"
        if self.ledger_type not in LEDGERS:
            raise LabError(
                f"unknown lab ledger {self.ledger_type!r} ({LEDGER_ENV}); known: "
                f"{', '.join(LEDGERS)}"
            )
        if self.release not in rootfs.SLURM_OF:
            raise LabError(
                f"unknown Slurm lab release {self.release!r}; known: {', '.join(rootfs.RELEASES)}"
            )
        # True: daemons and clients run inside a root filesystem of that release (chroot).
        self.chrooted = self.release != rootfs.host_release()
        default_root = DEFAULT_ROOT + (f"-{self.release}" if self.chrooted else "")
        self.root = Path(root or os.environ.get(DIR_ENV) or default_root).resolve()
        base = port_base or int(
            os.environ.get(PORT_ENV)
            or DEFAULT_PORT_BASE
            + (RELEASE_PORT_OFFSET.get(self.release, 300) if self.chrooted else 0)
        )
        self.port_base = base
        # ClusterName, and the value of MARKER its processes carry (a cluster added beside
        # this lab, tests/integration/cluster2.py, has its own name and this lab's marker).
        self.cluster = CLUSTER
        self.marker = str(self.root)
        self.ctld_port = base
        self.slurmd_port = base + 1
        self.dbd_port = base + 2
        self.mysql_port = base + 3
        self.etc = self.root / "etc"
        self.log_dir = self.root / "log"
        self.run_dir = self.root / "run"
        self.jobs_dir = self.root / "jobs"
        self.spool_dir = self.root / "spool" / "charge"
        self.db_path = self.root / "quota" / "slurm-quota.db"
        # LedgerType=mariadb: the configuration file (slurm_quota.config's format)
        self.ledger_conf = self.etc / "ledger.conf"
        self.slurm_conf = self.etc / "slurm.conf"
        self.plugin_path = self.etc / "job_submit.lua"
        self.wrapper_path = self.etc / "slurm-quota-charge-wrapper"
        self.charge_log = self.log_dir / "charge.log"
        self.mysql_socket = self.run_dir / "mysqld.sock"
        # Where MariaDB listens, the address the ledger's clients reach it at, and the hosts
        # its ledger user may connect from (a lab with controllers in network namespaces,
        # tests/integration/ha.py, changes all three).
        self.mysql_bind = "127.0.0.1"
        self.ledger_host = "127.0.0.1"
        self.ledger_grant_hosts: tuple[str, ...] = ("127.0.0.1",)
        self.munge_socket = self.run_dir / "munge" / "munge.socket.2"
        # The chroot of a lab of another release, and its overlay's upper and work dirs.
        self.chroot_root = self.root / "root"
        self.overlay_dir = self.root / "overlay"
        # Inside a chroot the CLI runs on that release's python3 from a shim in $LAB/bin.
        self.quota_bin = str(self.root / "bin" / "slurm-quota") if self.chrooted else _quota_bin()
        # (stage, seconds since up() began) of the last up()
        self.timings: list[tuple[str, float]] = []
        path = os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        if self.chrooted:
            path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        venv_bin = str(Path(self.quota_bin).parent)
        self.env = {
            "SLURM_CONF": str(self.slurm_conf),
            **self._ledger_env(),
            # The lab's own munged, for slurm-quota's credentials (CLI and service).
            "SLURM_QUOTA_MUNGE_SOCKET": str(self.munge_socket),
            "PATH": f"{venv_bin}:{path}" if venv_bin not in path.split(":") else path,
        }

    def _ledger_env(self) -> dict[str, str]:
        """Where the plugin, the wrapper and the CLI find the ledger."""
        if self.ledger_type == "mariadb":
            return {"SLURM_QUOTA_CONF": str(self.ledger_conf)}
        return {"SLURM_QUOTA_DB": str(self.db_path)}

    def running_ledger(self) -> str:
        """The engine of the ledger of the lab in this directory (as last brought up)."""
        return "mariadb" if self.ledger_conf.exists() else "sqlite"

    @property
    def ledger(self):
        """The ledger, as slurm_quota.db.connect() takes it (SQLiteLedger / MariaDBLedger)."""
        from slurm_quota import config

        if self.ledger_type == "mariadb":
            return config.resolve(None, str(self.db_path), conf=config.load(str(self.ledger_conf)))
        return config.SQLiteLedger(str(self.db_path))

    # ------------------------------------------------------------------ paths and records

    def pid_file(self, daemon: str) -> Path:
        """Where daemon's PID is recorded (the daemons write these themselves)."""
        name = {"mariadbd": "mysqld", "munged": "munged"}.get(daemon, daemon)
        return self.run_dir / f"{name}.pid"

    def _log_file(self, daemon: str) -> Path:
        name = {"mariadbd": "mysqld"}.get(daemon, daemon)
        return self.log_dir / f"{name}.log"

    @property
    def _record(self) -> Path:
        return self.run_dir / "lab.json"

    def _recorded_pids(self) -> dict[str, int]:
        """daemon -> PID, from the daemons' PID files, else from lab.json."""
        pids: dict[str, int] = {}
        with contextlib.suppress(OSError, ValueError):
            pids.update({k: int(v) for k, v in json.loads(self._record.read_text()).items()})
        for daemon in DAEMONS:
            pid = _read_pid(self.pid_file(daemon))
            if pid is not None:
                pids[daemon] = pid
        return pids

    def _save_pid(self, daemon: str, pid: int) -> None:
        pids = {}
        with contextlib.suppress(OSError, ValueError):
            pids = json.loads(self._record.read_text())
        pids[daemon] = pid
        _write(self._record, json.dumps(pids, indent=1) + "\n")

    def _is_ours(self, daemon: str, pid: int) -> bool:
        """pid is alive, is that daemon, and was started by this lab (marker in environ)."""
        if not alive(pid) or _comm(pid) != daemon:
            return False
        return _environ(pid).get(MARKER) == self.marker

    def daemon_pids(self) -> dict[str, int]:
        """daemon -> PID of every daemon of this lab that is running now."""
        return {d: p for d, p in self._recorded_pids().items() if self._is_ours(d, p)}

    def is_up(self) -> bool:
        """True when all five daemons of this lab are running."""
        return set(self.daemon_pids()) == set(DAEMONS)

    # ------------------------------------------------------------------ running things

    def _client_env(self, user: str | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not _CLIENT_ENV_DROP.match(k)}
        env.pop(MARKER, None)
        env.update(self.env)
        if user is not None:
            pw = pwd.getpwnam(user)
            env.update(HOME=pw.pw_dir, USER=user, LOGNAME=user)
        return env

    def _daemon_env(self) -> dict[str, str]:
        return {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "HOME": "/root",
            "SLURM_CONF": str(self.slurm_conf),
            **self._ledger_env(),
            MARKER: self.marker,
        }

    def run(
        self,
        *argv: str,
        user: str | None = None,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,  # noqa: A002 - mirrors subprocess.run
    ) -> subprocess.CompletedProcess:
        """Run a command (any Slurm client) with the lab environment, as root or as user."""
        kwargs: dict = {}
        cwd = str(self.jobs_dir if self.jobs_dir.is_dir() else "/")
        command = list(argv)
        if self.chrooted:
            command = self.in_chroot(command, user=user, cwd=cwd)
        elif user is not None and user != "root":
            pw = pwd.getpwnam(user)
            kwargs = {
                "user": pw.pw_uid,
                "group": pw.pw_gid,
                "extra_groups": os.getgrouplist(user, pw.pw_gid),
            }
        proc = subprocess.run(
            command,
            env=self._client_env(user),
            cwd=cwd,
            input=input if input is not None else "",
            capture_output=True,
            text=True,
            timeout=timeout,
            **kwargs,
        )
        if check and proc.returncode != 0:
            raise LabCommandError(list(argv), proc)
        return proc

    def in_chroot(
        self, argv: list[str], user: str | None = None, cwd: str | None = None
    ) -> list[str]:
        """argv made to run inside this lab's root filesystem (as user, in cwd); unchanged
        for a lab of the host's release."""
        if not self.chrooted:
            return list(argv)
        pre = ["chroot"]
        if user is not None and user != "root":
            # numeric ids: no name service lookups on either side of the chroot
            pw = pwd.getpwnam(user)
            groups = ",".join(str(g) for g in os.getgrouplist(user, pw.pw_gid))
            pre += [f"--userspec={pw.pw_uid}:{pw.pw_gid}", f"--groups={groups}"]
        script = 'cd "$1" || exit 125; shift; exec "$@"'
        return [*pre, str(self.chroot_root), "/bin/sh", "-c", script, "sh", cwd or "/", *argv]

    def slurm_version(self) -> str:
        """The running Slurm's version as `scontrol -V` prints it (e.g. 24.11.5)."""
        out = self.run("scontrol", "-V", check=False).stdout.split()
        return out[1] if len(out) > 1 else ""

    def sbatch(
        self, *args: str, user: str | None = "alice", script: str = "#!/bin/sh\ntrue\n"
    ) -> SbatchResult:
        """Submit script as user (root uses `sbatch --uid`); output goes to the lab jobs dir."""
        argv = ["sbatch", "--parsable", "-D", str(self.jobs_dir)]
        # %x would be expanded to "(null)" for `--uid` submissions: keep to the job id.
        argv += ["-o", str(self.jobs_dir / "slurm-%j.out")]
        if user is not None and user != "root":
            # Without --gid the job would run with root's group (GroupId=root(0)).
            pw = pwd.getpwnam(user)
            argv += [f"--uid={user}", f"--gid={pw.pw_gid}"]
        argv += list(args)
        proc = self.run(*argv, check=False, input=script)
        job_id = None
        if proc.returncode == 0:
            first = proc.stdout.strip().split(";", 1)[0]
            if first.isdigit():
                job_id = int(first)
        return SbatchResult(proc.returncode, job_id, proc.stdout, proc.stderr)

    def job_state(self, job_id: int) -> str | None:
        """JobState from slurmctld (None when it no longer knows the job)."""
        proc = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        m = re.search(r"\bJobState=(\S+)", proc.stdout)
        return m.group(1) if m else None

    def wait_job_end(self, job_id: int, timeout: float = 120) -> str:
        """Wait until the job is in a final state; return that state (e.g. COMPLETED)."""
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state is None:
                rows = self.sacct(job_id, ["State"])
                state = (rows[0]["State"].split() or [None])[0] if rows else None
            if state in FINAL_STATES:
                return state
            time.sleep(POLL_S * 2)
        raise LabError(f"job {job_id} did not end within {timeout} s (last state {state})")

    def sacct(
        self, job_id: int, fields: list[str] | tuple[str, ...] | str, *, allocations: bool = True
    ) -> list[dict[str, str]]:
        """sacct rows of job_id as dicts keyed by field name (-X: allocations only)."""
        names = fields.split(",") if isinstance(fields, str) else list(fields)
        argv = ["sacct", "-n", "-P", "-j", str(job_id), "-o", ",".join(names)]
        if allocations:
            argv.append("-X")
        proc = self.run(*argv, timeout=30)
        rows = []
        for line in proc.stdout.splitlines():
            if line.strip():
                rows.append(dict(zip(names, line.split("|"))))
        return rows

    def wait_sacct_final(
        self, job_id: int, fields: list[str] | tuple[str, ...], timeout: float = 30
    ) -> dict[str, str]:
        """Poll sacct until job_id's own row is final and complete; return that row.

        slurmdbd can lag the job's end: State=RUNNING with End=Unknown for a moment, and for a
        fast job a row that is already COMPLETED but still has JobName "allocation" and an
        empty Partition (the start record applied after the end). Waits for all three.
        """
        names = ["JobIDRaw", "State", "End", "Partition"]
        names += [f for f in fields if f not in names]
        deadline = time.monotonic() + timeout
        row: dict[str, str] = {}
        while time.monotonic() < deadline:
            for cand in self.sacct(job_id, names):
                if cand["JobIDRaw"] == str(job_id):
                    row = cand
            if (
                row
                and (row["State"].split() or [""])[0] in FINAL_STATES
                and row["End"] != "Unknown"
                and row["Partition"]
            ):
                return row
            time.sleep(POLL_S * 2)
        raise LabError(f"sacct never showed job {job_id} finished within {timeout} s: {row}")

    def squeue(self) -> list[dict[str, str]]:
        """Jobs slurmctld holds (all states) as dicts: job_id, user, account, state, name, ..."""
        keys = ("job_id", "user", "account", "state", "name", "partition", "reason")
        proc = self.run("squeue", "-h", "-t", "all", "-o", "%A|%u|%a|%T|%j|%P|%r")
        return [dict(zip(keys, line.split("|"))) for line in proc.stdout.splitlines() if line]

    def cancel_all(self, timeout: float = 60) -> list[int]:
        """Cancel every unfinished job, wait until none is left active; return their ids."""
        active = {"PENDING", "RUNNING", "SUSPENDED", "COMPLETING", "CONFIGURING", "REQUEUED"}
        cancelled: list[int] = []
        deadline = time.monotonic() + timeout
        while True:
            left = [j for j in self.squeue() if j["state"] in active]
            if not left:
                return cancelled
            if time.monotonic() >= deadline:
                raise LabError(f"jobs still active after {timeout} s: {left}")
            to_cancel = [j["job_id"] for j in left if j["state"] != "COMPLETING"]
            if to_cancel:
                self.run("scancel", *to_cancel, check=False)
                cancelled += [int(j) for j in to_cancel if j.isdigit() and int(j) not in cancelled]
            time.sleep(POLL_S * 3)

    def _wrapper_running(self) -> bool:
        me = _ancestors()
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) not in me:
                if str(self.wrapper_path) in _argv(int(entry)):
                    return True
        return False

    def wait_jobcomp_idle(self, quiet_s: float = 0.5, timeout: float = 60) -> None:
        """Wait until no jobcomp wrapper has run for quiet_s (e.g. the charge of a job that a
        test cancelled itself, which would otherwise land after the next reset_ledger)."""
        deadline = time.monotonic() + timeout
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            if self._wrapper_running():
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_s:
                return
            time.sleep(POLL_S)
        raise LabError(f"a jobcomp wrapper was still running after {timeout} s")

    def wait_jobcomp(self, job_id: int, timeout: float = 60) -> str:
        """Wait until the jobcomp wrapper has processed job_id; return its log lines for it.

        The wrapper logs `job <JOBID> (<user>/<account> <state>): charging` before charging and
        runs one job at a time, so the job is done once a later job was started, a
        failure line was written for it, or no wrapper process is left.
        """
        start = re.compile(r"^\S+ job (\d+) \(")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.logs("charge").splitlines()
            mine = [
                i
                for i, line in enumerate(lines)
                if (m := start.match(line)) and m.group(1) == str(job_id)
            ]
            if mine:
                last = mine[-1]
                ours = [ln for ln in lines if re.match(rf"^\S+ job {job_id}[ :]", ln)]
                later = any(start.match(line) for line in lines[last + 1 :])
                failed = any(
                    "charge failed" in ln
                    for ln in lines[last + 1 :]
                    if re.match(rf"^\S+ job {job_id}:", ln)
                )
                if later or failed or not self._wrapper_running():
                    return "\n".join(ours)
            time.sleep(POLL_S)
        raise LabError(
            f"the jobcomp wrapper did not process job {job_id} within {timeout} s; "
            f"charge log tail:\n{_tail(self.charge_log)}"
        )

    def logs(self, name: str) -> str:
        """Text of a lab log: slurmctld, slurmd, slurmdbd, charge, munged or mysqld."""
        path = self.charge_log if name == "charge" else self._log_file(name)
        try:
            return path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # ------------------------------------------------------------------ plugin, jobcomp, ledger

    def install_plugin(
        self, path: str | os.PathLike[str], module: str | os.PathLike[str] | None = None
    ) -> int:
        """Install a job_submit.lua and the module it loads; the file's mtime is made newer
        (whole seconds) than the last one.

        module: the slurm_quota.lua to put beside it (default: the one next to path, else the
        project's). slurmctld reloads the script (and with it the module) only when st_mtime >
        the loaded script's mtime, so two installs within one second would silently keep the
        first. Returns the new mtime.
        """
        if module is None:
            beside = Path(path).with_name("slurm_quota.lua")
            module = beside if beside.is_file() else REPO / "lua" / "slurm_quota.lua"
        tmp_module = self.etc / "slurm_quota.lua.tmp"
        shutil.copyfile(module, tmp_module)
        os.chmod(tmp_module, 0o644)
        os.replace(tmp_module, self.etc / "slurm_quota.lua")
        previous = 0
        with contextlib.suppress(OSError):
            previous = int(self.plugin_path.stat().st_mtime)
        mtime = max(int(time.time()), previous + 1)
        tmp = self.plugin_path.with_name(self.plugin_path.name + ".tmp")
        shutil.copyfile(path, tmp)
        os.chmod(tmp, 0o644)
        os.utime(tmp, (mtime, mtime))
        os.replace(tmp, self.plugin_path)
        return mtime

    def _write_slurm_conf(self) -> None:
        _write(self.slurm_conf, _render("slurm.conf.in", **self._template_values()))

    def set_jobcomp(self, enabled: bool) -> None:
        """Switch the jobcomp wrapper on (a fresh copy of the project's) or off (a no-op).

        slurmctld execs JobCompLoc anew for every finished job, so swapping the file (atomic
        rename, never an edit in place) takes effect for the next job whose jobcomp run starts.
        `scontrol reconfigure` is no way to do this: with JobCompType changed to jobcomp/none
        it reports the new type but keeps running the script (observed on 22.05.8).
        """
        tmp = self.wrapper_path.with_name(self.wrapper_path.name + ".tmp")
        if enabled:
            shutil.copyfile(REPO / "scripts" / "slurm-quota-charge-wrapper", tmp)
        else:
            tmp.write_text(NOOP_JOBCOMP.format(mark=NOOP_MARK, log=self.charge_log))
        os.chmod(tmp, 0o755)
        os.replace(tmp, self.wrapper_path)

    def jobcomp_enabled(self) -> bool:
        """True when JobCompLoc is the charge wrapper, False when it is the no-op."""
        try:
            return NOOP_MARK not in self.wrapper_path.read_text()
        except FileNotFoundError:
            return False

    def reset_ledger(self) -> None:
        """Delete every row of every ledger table in one transaction; keep the schema."""
        from slurm_quota import db

        if self.ledger_type == "mariadb":
            tables = [
                t
                for t in self._mysql_rows(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = "
                    f"'{LEDGER_DATABASE}' AND table_type = 'BASE TABLE' ORDER BY table_name"
                )
                if t != "schema_version"
            ]
            tables.sort(key=lambda t: t != "jobs_preallocations")
            self._mysql(
                "START TRANSACTION; "
                + "".join(f"DELETE FROM {LEDGER_DATABASE}.`{t}`; " for t in tables)
                + "COMMIT;"
            )
            return
        conn = db.connect(self.db_path)
        try:
            tables = [
                r[0]
                for r in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' "
                    "AND name NOT LIKE 'sqlite_%' ORDER BY name"
                )
            ]
            with db.write_transaction(conn):
                # Children before parents: jobs_preallocations references users/accounts.
                for table in sorted(tables, key=lambda t: t not in ("jobs_preallocations",)):
                    conn.execute('DELETE FROM "{}"'.format(table.replace('"', '""')))
        finally:
            conn.close()

    # ------------------------------------------------------------------ bring-up

    def _template_values(self) -> dict[str, str]:
        commparams = (
            "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny" if _hostname_is_loopback() else ""
        )
        return {
            "LAB": str(self.root),
            "CTLD_PORT": str(self.ctld_port),
            "SLURMD_PORT": str(self.slurmd_port),
            "DBD_PORT": str(self.dbd_port),
            "MYSQL_PORT": str(self.mysql_port),
            "MYSQL_PASSWORD": MYSQL_PASSWORD,
            "COMMPARAMS": commparams,
            "QUOTA_BIN": self.quota_bin,
            "MARKER": MARKER,
            "OWNER": self.marker,
            "CLUSTER": self.cluster,
            "LEDGER_LINE": "".join(f"{k}={v}" for k, v in self._ledger_env().items()),
        }

    def _looks_like_lab(self) -> bool:
        if not self.root.exists():
            return True
        entries = set(os.listdir(self.root))
        return not entries or bool(entries & {"etc", "run", "log"})

    def _reset_dir(self) -> None:
        if not self._looks_like_lab():
            raise LabError(
                f"{self.root} exists and does not look like a lab directory; refusing to wipe it. "
                f"Point {DIR_ENV} at an empty or lab directory."
            )
        if self.root.exists():
            self._remove_tree()
        dirs = {
            "": 0o755,
            "etc": 0o755,
            "munge": 0o700,
            "run": 0o755,
            "run/munge": 0o755,
            "state": 0o700,
            "spool": 0o755,
            "spool/slurmd": 0o755,
            "spool/charge": 0o755,
            "log": 0o755,
            "dev": 0o755,
            "jobs": 0o1777,
            "mysql": 0o700,
            "quota": 0o755,
            "bin": 0o755,
        }
        for rel, mode in dirs.items():
            d = self.root / rel
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, mode)

    def _ensure_users(self) -> None:
        for user in UNIX_USERS:
            try:
                pwd.getpwnam(user)
            except KeyError:
                proc = subprocess.run(
                    ["useradd", "-m", "-U", "-s", "/bin/sh", user], capture_output=True, text=True
                )
                if proc.returncode != 0:
                    raise LabError(f"useradd {user} failed: {proc.stderr.strip()}") from None
        if self.chrooted:
            self._copy_users_into_chroot()

    def _copy_users_into_chroot(self) -> None:
        """The lab's users and their groups, with the host's ids, in the chroot's files."""
        import grp

        etc = self.chroot_root / "etc"
        wanted_users = {pwd.getpwnam(u) for u in UNIX_USERS}
        gids = {pw.pw_gid for pw in wanted_users}
        for user in UNIX_USERS:
            gids.update(os.getgrouplist(user, pwd.getpwnam(user).pw_gid))
        for name, lines in (
            ("passwd", [":".join(map(str, pw)) for pw in wanted_users]),
            (
                "group",
                [
                    f"{g.gr_name}:x:{g.gr_gid}:{','.join(g.gr_mem)}"
                    for g in (grp.getgrgid(gid) for gid in sorted(gids))
                ],
            ),
        ):
            path = etc / name
            text = path.read_text()
            have = {line.split(":", 1)[0] for line in text.splitlines() if line}
            have_ids = {line.split(":")[2] for line in text.splitlines() if line.count(":") >= 2}
            add = [
                ln
                for ln in lines
                if ln.split(":", 1)[0] not in have and ln.split(":")[2] not in have_ids
            ]
            if add:
                path.write_text(text.rstrip("\n") + "\n" + "\n".join(add) + "\n")

    def _write_quota_shim(self) -> None:
        """$LAB/bin/slurm-quota: the project's CLI on the chroot's own python3 (the checkout is
        bind-mounted read-only at its own path)."""
        _write(
            Path(self.quota_bin),
            "#!/usr/bin/python3\n"
            "# slurm-quota lab: the checkout's CLI on this release's python3.\n"
            "import sys\n"
            f"sys.path.insert(0, {str(REPO)!r})\n"
            "from slurm_quota.entry import run\n"
            "sys.exit(run())\n",
            mode=0o755,
        )

    def _mount_chroot(self) -> None:
        """Mount the release's tree with /proc, /sys, /dev, the lab dir and the checkout."""
        try:
            rootfs.mount_lab_root(
                self.release,
                self.overlay_dir,
                self.chroot_root,
                binds=[(self.root, False), (REPO, True)],
                log=self.log_dir / "rootfs-build.log",
            )
        except rootfs.RootfsError as err:
            raise LabError(str(err)) from err

    def _remove_tree(self) -> None:
        """rm -r of the lab directory, only once nothing is mounted below it (a bind mount of
        the checkout or of /dev must never be walked into)."""
        try:
            rootfs.unmount_under(self.root)
        except rootfs.RootfsError as err:
            raise LabError(f"not removing {self.root}: {err}") from err
        shutil.rmtree(self.root)

    def _make_devices(self) -> None:
        for i in range(4):
            dev = self.root / "dev" / f"nvidia{i}"
            try:
                os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(195, i))
            except OSError:
                dev.touch()

    def _write_configs(self) -> None:
        values = self._template_values()
        self._write_slurm_conf()
        _write(self.etc / "gres.conf", _render("gres.conf.in", **values))
        _write(self.etc / "slurmdbd.conf", _render("slurmdbd.conf.in", **values), mode=0o600)
        _write(self.etc / "slurm-quota.conf", _render("slurm-quota.conf.in", **values))
        self.set_jobcomp(True)
        self.install_plugin(REPO / "lua" / "job_submit.lua")

    def _wait(self, what: str, ready, daemon: str | None, timeout: float = READY_TIMEOUT_S):
        """Poll ready() until true; fail early when daemon died, with its log tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if daemon is not None:
                pid = self._recorded_pids().get(daemon)
                if pid is not None and not alive(pid):
                    raise LabError(f"{daemon} (pid {pid}) died while waiting for {what}")
            time.sleep(POLL_S)
        raise LabError(f"timed out after {timeout} s waiting for {what}")

    def _launch(self, daemon: str, argv: list[str]) -> None:
        """Run a self-daemonizing daemon and wait for its PID file."""
        log = self.log_dir / f"{daemon}.start.log"
        with open(log, "ab") as out:
            proc = subprocess.run(
                self.in_chroot(argv, cwd=str(self.root)),
                env=self._daemon_env(),
                cwd=str(self.root),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                timeout=READY_TIMEOUT_S,
            )
        if proc.returncode != 0:
            raise LabError(f"`{' '.join(argv)}` exited {proc.returncode}:\n{_tail(log)}")
        pid_file = self.pid_file(daemon)

        def pid_written() -> bool:
            pid = _read_pid(pid_file)
            return pid is not None and alive(pid)

        self._wait(f"{daemon} to write {pid_file}", pid_written, None, timeout=30)
        pid = _read_pid(pid_file)
        if pid is None:
            raise LabError(f"{daemon} removed {pid_file} right after writing it")
        self._save_pid(daemon, pid)

    def _ok(self, *argv: str) -> bool:
        try:
            return self.run(*argv, check=False, timeout=20).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def _start_munged(self) -> None:
        key = self.root / "munge" / "munge.key"
        subprocess.run(
            self.in_chroot(["mungekey", "-c", "-k", str(key)]), check=True, capture_output=True
        )
        os.chmod(key, 0o600)
        self._launch(
            "munged",
            [
                "munged",
                f"--key-file={key}",
                f"--socket={self.munge_socket}",
                f"--pid-file={self.pid_file('munged')}",
                f"--log-file={self.log_dir / 'munged.log'}",
                f"--seed-file={self.root / 'munge' / 'munged.seed'}",
            ],
        )
        self._wait(
            "munged to answer",
            lambda: self._ok("munge", "-n", "-S", str(self.munge_socket)),
            "munged",
        )

    def _mysql(self, sql: str) -> None:
        proc = subprocess.run(
            self.in_chroot(
                ["mariadb", "--no-defaults", "-S", str(self.mysql_socket), "-u", "root", "-e", sql]
            ),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise LabError(f"mariadb: {proc.stderr.strip()}")

    def _start_mariadb(self) -> None:
        datadir = self.root / "mysql" / "data"
        with open(self.log_dir / "mariadb-install.log", "ab") as out:
            proc = subprocess.run(
                self.in_chroot(
                    [
                        "mariadb-install-db",
                        "--no-defaults",
                        f"--datadir={datadir}",
                        "--user=root",
                        "--auth-root-authentication-method=socket",
                        "--skip-test-db",
                    ]
                ),
                stdout=out,
                stderr=out,
                env=self._daemon_env(),
                timeout=120,
            )
        if proc.returncode != 0:
            raise LabError(
                f"mariadb-install-db failed:\n{_tail(self.log_dir / 'mariadb-install.log')}"
            )
        self._run_mariadbd()
        self._mysql(
            "CREATE DATABASE IF NOT EXISTS slurm_acct_db; "
            f"CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '{MYSQL_PASSWORD}'; "
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
        )
        if self.ledger_type == "mariadb":
            self._create_mariadb_ledger()

    def _run_mariadbd(self, timeout: float = READY_TIMEOUT_S) -> int:
        """Start mariadbd on the lab's existing data directory; wait until it answers a ping
        on its socket (after a crash, InnoDB's recovery runs before that); return its PID."""
        datadir = self.root / "mysql" / "data"
        with open(self.log_dir / "mysqld.start.log", "ab") as out:
            child = subprocess.Popen(
                self.in_chroot(
                    [
                        "mariadbd",
                        "--no-defaults",
                        "--user=root",
                        f"--datadir={datadir}",
                        f"--socket={self.mysql_socket}",
                        f"--pid-file={self.pid_file('mariadbd')}",
                        f"--bind-address={self.mysql_bind}",
                        f"--port={self.mysql_port}",
                        f"--log-error={self._log_file('mariadbd')}",
                        "--skip-name-resolve",
                        # the values slurmdbd checks (it logs an error below them)
                        "--innodb-buffer-pool-size=1G",
                        "--innodb-log-file-size=64M",
                        "--innodb-lock-wait-timeout=900",
                        # MariaDB >= 11.8 defaults to ON, and 26.05's slurmdbd warns it will be
                        # fatal on a write conflict ("loose": older servers ignore the option).
                        "--loose-innodb-snapshot-isolation=OFF",
                    ],
                    cwd=str(self.root),
                ),
                env=self._daemon_env(),
                cwd=str(self.root),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        self._save_pid("mariadbd", child.pid)

        def answering() -> bool:
            if child.poll() is not None:
                raise LabError(f"mariadbd exited {child.returncode}")
            return (
                subprocess.run(
                    self.in_chroot(
                        [
                            "mariadb-admin",
                            "--no-defaults",
                            "-S",
                            str(self.mysql_socket),
                            "-u",
                            "root",
                            "ping",
                        ]
                    ),
                    capture_output=True,
                ).returncode
                == 0
            )

        self._wait("mariadbd to answer", answering, None, timeout=timeout)
        return child.pid

    def restart_mariadb(self, timeout: float = 120) -> float:
        """Start the lab's mariadbd again after it died (e.g. `kill -9` in a test): same data
        directory, options and ports; returns the seconds until it answered again.

        Waits for mariadbd's ping (InnoDB crash recovery done), then, with a MariaDB
        ledger, for a query on the ledger through its configuration, and for slurmdbd to answer
        `sacctmgr list cluster` (slurmdbd reconnects to MariaDB by itself on its next request).
        Refuses while a mariadbd of this lab still runs.
        """
        if "mariadbd" in self.daemon_pids():
            raise LabError(f"mariadbd of this lab still runs: {self.daemon_pids()['mariadbd']}")
        began = time.monotonic()
        # The killed server leaves its PID file behind: the new one writes its own.
        with contextlib.suppress(FileNotFoundError):
            self.pid_file("mariadbd").unlink()
        self._run_mariadbd(timeout=timeout)
        if self.ledger_type == "mariadb":
            self._wait("the ledger to answer", self._ledger_answers, "mariadbd", timeout=timeout)
        if "slurmdbd" in self.daemon_pids():
            self._wait(
                "slurmdbd to answer `sacctmgr list cluster`",
                lambda: self._ok("sacctmgr", "-n", "list", "cluster"),
                "slurmdbd",
                timeout=timeout,
            )
        return time.monotonic() - began

    def _ledger_answers(self) -> bool:
        from slurm_quota import db

        try:
            conn = db.connect(self.ledger, readonly=True)
        except Exception:  # noqa: BLE001 - any failure means "not yet"
            return False
        try:
            conn.execute("SELECT COUNT(*) FROM jobs_preallocations").fetchall()
            return True
        except Exception:  # noqa: BLE001
            return False
        finally:
            with contextlib.suppress(Exception):
                conn.close()

    def _mysql_rows(self, sql: str) -> list[str]:
        proc = subprocess.run(
            [
                "mariadb",
                "--no-defaults",
                "-S",
                str(self.mysql_socket),
                "-u",
                "root",
                "-N",
                "-B",
                "-e",
                sql,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise LabError(f"mariadb: {proc.stderr.strip()}")
        return proc.stdout.splitlines()

    def _create_mariadb_ledger(self) -> None:
        """LedgerType=mariadb: the ledger's database and user in the lab's MariaDB, the 0600
        configuration file naming them, and `migrate` through it."""
        from slurm_quota import db

        self._mysql(
            f"CREATE DATABASE IF NOT EXISTS {LEDGER_DATABASE}; "
            + "".join(
                f"CREATE USER IF NOT EXISTS '{LEDGER_USER}'@'{host}' "
                f"IDENTIFIED BY '{LEDGER_PASSWORD}'; "
                f"GRANT ALL ON {LEDGER_DATABASE}.* TO '{LEDGER_USER}'@'{host}'; "
                for host in self.ledger_grant_hosts
            )
        )
        _write(
            self.ledger_conf,
            "# The lab's ledger in its MariaDB (SLURM_QUOTA_LAB_LEDGER=mariadb)\n"
            f"LedgerType=mariadb\nStorageHost={self.ledger_host}\n"
            f"StoragePort={self.mysql_port}\nStorageLoc={LEDGER_DATABASE}\n"
            f"StorageUser={LEDGER_USER}\nStoragePass={LEDGER_PASSWORD}\n",
            mode=0o600,
        )
        db.migrate(self.ledger)

    def _start_slurmdbd(self) -> None:
        self._launch("slurmdbd", ["slurmdbd"])
        self._wait(
            "slurmdbd to answer `sacctmgr list cluster`",
            lambda: self._ok("sacctmgr", "-n", "list", "cluster"),
            "slurmdbd",
        )

    def _register_accounts(self) -> None:
        """Cluster, accounts and associations in one `sacctmgr load` (one call, not seven)."""
        lines = [f"Cluster - '{self.cluster}'", "Parent - 'root'"]
        lines.append(
            f"User - 'root':DefaultAccount='{USERS['root'][0]}':AdminLevel='Administrator'"
        )
        lines += [f"Account - '{a}':Description='{a}':Organization='{CLUSTER}'" for a in ACCOUNTS]
        for account in ACCOUNTS:
            lines.append(f"Parent - '{account}'")
            for user, (default, accounts) in USERS.items():
                if account in accounts:
                    lines.append(f"User - '{user}':DefaultAccount='{default}'")
        spec = self.etc / "associations.cfg"
        _write(spec, "\n".join(lines) + "\n")
        self.run("sacctmgr", "-i", "load", f"file={spec}")

    def _start_slurmctld(self) -> None:
        self._launch("slurmctld", ["slurmctld"])
        self._wait(
            "slurmctld to answer `scontrol ping`",
            lambda: "is UP" in self.run("scontrol", "ping", check=False, timeout=20).stdout,
            "slurmctld",
        )

    def _start_slurmd(self) -> None:
        self._launch("slurmd", ["slurmd", "-N", "localhost"])

        def idle() -> bool:
            out = self.run("sinfo", "-h", "-n", "localhost", "-o", "%T", check=False).stdout
            return out.strip() == "idle"

        self._wait("node localhost to be idle", idle, "slurmd")

    def up(self) -> float:
        """Bring the lab up from nothing (no-op when it is already up); return seconds taken.

        Any failure stops what was started and raises LabError with the failing daemon's log.
        """
        t0 = time.monotonic()
        if os.geteuid() != 0:
            raise LabError("the Slurm lab needs root (daemons, useradd, sbatch --uid)")
        if self.is_up():
            return 0.0
        reason = _ensure_packages(self.chrooted)
        if reason:
            raise LabError(reason)
        if self.daemon_pids():
            self.down()
        stages = [
            ("setup", self._setup),
            ("munged", self._start_munged),
            ("mysqld", self._start_mariadb),
            ("slurmdbd", self._start_slurmdbd),
            ("slurmdbd", self._register_accounts),
            ("slurmctld", self._start_slurmctld),
            ("slurmd", self._start_slurmd),
        ]
        self.timings = []
        for log_name, stage in stages:
            try:
                stage()
                self.timings.append((stage.__name__.lstrip("_"), time.monotonic() - t0))
            except BaseException as err:
                message = f"lab up failed at {stage.__name__}: {type(err).__name__}: {err}"
                for path, lines in (
                    (self.log_dir / f"{log_name}.log", 40),
                    (self.log_dir / f"{log_name}.start.log", 10),
                ):
                    if path.exists() and path.stat().st_size:
                        message += f"\n--- tail of {path} ---\n{_tail(path, lines)}"
                with contextlib.suppress(Exception):
                    self.down()
                if not isinstance(err, Exception):
                    raise
                raise LabError(message) from err
        return time.monotonic() - t0

    def _ports(self) -> list[tuple[str, int]]:
        """(daemon, port) of every daemon this lab starts."""
        return [
            ("slurmctld", self.ctld_port),
            ("slurmd", self.slurmd_port),
            ("slurmdbd", self.dbd_port),
            ("mariadbd", self.mysql_port),
        ]

    def _check_ports(self) -> None:
        """Refuse to start when a port of this lab is taken (another lab, another service)."""
        for name, port in self._ports():
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                # As the daemons do: TIME_WAIT leftovers of the previous lab are no conflict.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError as err:
                    raise LabError(
                        f"port {port} ({name}) on 127.0.0.1 is in use ({err.strerror}); "
                        f"choose another {PORT_ENV} (ports base..base+3)"
                    ) from err

    def _setup(self) -> None:
        from slurm_quota import db

        self._check_ports()
        self._reset_dir()
        if self.chrooted:
            self._mount_chroot()
            self._write_quota_shim()
        self._ensure_users()
        self._make_devices()
        self._write_configs()
        if self.ledger_type == "sqlite":
            db.migrate(self.db_path)

    # ------------------------------------------------------------------ shutdown

    def _stop_jobs(self) -> None:
        """Cancel running jobs so their slurmstepd and processes end with the lab."""
        if not self._controller_running():
            return
        with contextlib.suppress(Exception):
            self.run("scancel", "--state=RUNNING", check=False, timeout=20)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                out = self.run(
                    "squeue", "-h", "-t", "RUNNING,COMPLETING", "-o", "%A", check=False, timeout=20
                )
                if out.returncode != 0 or not out.stdout.strip():
                    return
                time.sleep(POLL_S * 2)

    def _controller_running(self) -> bool:
        """A slurmctld of this lab is running (jobs can be cancelled)."""
        return "slurmctld" in self.daemon_pids()

    def _leftover(self, pid: int, env: dict[str, str]) -> bool:
        """Is pid a leftover of this lab? Matched by argv (the wrapper path), the lab marker,
        or a job environment pointing at this lab's slurm.conf."""
        return (
            str(self.wrapper_path) in _argv(pid)
            or env.get(MARKER) == self.marker
            or (env.get("SLURM_CONF") == str(self.slurm_conf) and "SLURM_JOB_ID" in env)
        )

    def _sweep(self) -> list[int]:
        """SIGKILL leftovers of this lab (_leftover): wrapper processes, its children,
        slurmstepds, job processes."""
        me = _ancestors()
        killed = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in me:
                continue
            pid = int(entry)
            if self._leftover(pid, _environ(pid)) and alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
        return killed

    def down(self, purge: bool = False) -> dict[str, int]:
        """Stop exactly this lab's processes (SIGTERM, then SIGKILL after a bound).

        Returns daemon -> PID of what was stopped. purge=True also removes the lab directory.
        """
        self._stop_jobs()
        running = self.daemon_pids()
        if "slurmctld" in running and self.wrapper_path.exists():
            # slurmctld runs its whole jobcomp backlog before it exits (one script at a time;
            # `slurm-quota charge` of a cancelled job took ~5 s here): make the rest no-ops.
            with contextlib.suppress(OSError):
                self.set_jobcomp(False)
        for wave in STOP_WAVES:
            targets = {d: running[d] for d in wave if d in running}
            for pid in targets.values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            for daemon, pid in targets.items():
                bound = STOP_TIMEOUT_S.get(daemon, DEFAULT_STOP_TIMEOUT_S)
                deadline = time.monotonic() + bound
                while alive(pid) and time.monotonic() < deadline:
                    time.sleep(POLL_S)
                if alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        for _ in range(3):
            if not self._sweep():
                break
            time.sleep(POLL_S)
        left = [p for p in running.values() if alive(p)]
        deadline = time.monotonic() + 10
        while left and time.monotonic() < deadline:
            time.sleep(POLL_S)
            left = [p for p in left if alive(p)]
        if left:
            raise LabError(f"lab processes still alive after down: {left}")
        self._unmount()
        if purge and self.root.exists():
            if not self._looks_like_lab():
                raise LabError(f"{self.root} does not look like a lab directory; not removed")
            self._remove_tree()
        return running

    def _unmount(self) -> None:
        """After down: unmount the root filesystem of a chrooted lab."""
        if self.chrooted:
            try:
                rootfs.unmount_under(self.chroot_root)
            except rootfs.RootfsError as err:
                raise LabError(str(err)) from err

    def status(self) -> dict[str, dict]:
        """daemon -> {pid, running} from this lab's records."""
        recorded = self._recorded_pids()
        return {d: {"pid": recorded.get(d), "running": d in self.daemon_pids()} for d in DAEMONS}


def _ensure_packages(chrooted: bool = False) -> str | None:
    """Install the host's lab packages (a chrooted lab needs only mmdebstrap on the host: its
    tree has the rest)."""
    try:
        from tests import syspkgs
    except ImportError:  # run from outside the repo root
        sys.path.insert(0, str(REPO))
        from tests import syspkgs
    return syspkgs.ensure(["mmdebstrap"] if chrooted else PACKAGES)


def main(argv: list[str] | None = None) -> int:
    """The `python -m tests.integration.lab` command."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.integration.lab", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--dir", help=f"lab directory (env {DIR_ENV}, default {DEFAULT_ROOT})")
    parser.add_argument(
        "--port-base", type=int, help=f"first port (env {PORT_ENV}, default {DEFAULT_PORT_BASE})"
    )
    parser.add_argument(
        "--ledger",
        choices=LEDGERS,
        help=f"where the ledger is (env {LEDGER_ENV}, default sqlite)",
    )
    parser.add_argument(
        "--release",
        choices=rootfs.RELEASES,
        help=f"Debian release whose Slurm runs (env {RELEASE_ENV}, default: this machine's)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="bring the lab up from nothing (no-op when already up)")
    down = sub.add_parser("down", help="stop every process of the lab")
    down.add_argument("--purge", action="store_true", help="also remove the lab directory")
    sub.add_parser("status", help="show the lab's daemons and PIDs")
    sub.add_parser("env", help="print exports for the shell: eval $(... env)")
    ex = sub.add_parser("exec", help="run a command in the lab's environment (and chroot)")
    ex.add_argument("--user", help="run as this user (default root)")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND [ARG...]")
    args = parser.parse_args(argv)
    try:
        lab = Lab(args.dir, args.port_base, args.release, args.ledger)
    except LabError as err:
        print(f"lab: {err}", file=sys.stderr)
        return 2
    try:
        if args.command == "up":
            was_up = lab.is_up()
            took = lab.up()
            stages = ", ".join(f"{name} {at:.1f}" for name, at in lab.timings)
            state = "already up" if was_up else f"up in {took:.1f} s (cumulative s: {stages})"
            print(
                f"lab {lab.root} (Slurm {lab.slurm_version()}, {lab.release}"
                f"{', chroot ' + str(lab.chroot_root) if lab.chrooted else ''}) {state}; "
                f"ports ctld={lab.ctld_port} slurmd={lab.slurmd_port} "
                f"dbd={lab.dbd_port} mysql={lab.mysql_port}",
                file=sys.stderr,
            )
            print(
                f"use it with: eval $({sys.executable} -m tests.integration.lab env)",
                file=sys.stderr,
            )
        elif args.command == "down":
            t0 = time.monotonic()
            stopped = lab.down(purge=args.purge)
            print(
                f"stopped {stopped or 'nothing'} in {time.monotonic() - t0:.1f} s"
                + (f"; removed {lab.root}" if args.purge else ""),
                file=sys.stderr,
            )
        elif args.command == "status":
            for daemon, info in lab.status().items():
                print(
                    f"{daemon:10} pid={info['pid']} {'running' if info['running'] else 'stopped'}"
                )
            return 0 if lab.is_up() else 3
        elif args.command == "exec":
            cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            if not cmd:
                parser.error("exec needs a command: exec -- sinfo")
            proc = lab.run(*cmd, user=args.user, check=False, timeout=3600)
            sys.stdout.write(proc.stdout)
            sys.stderr.write(proc.stderr)
            return proc.returncode
        elif args.command == "env":
            if lab.chrooted:
                print(
                    f"# the {lab.release} lab's clients run inside its chroot: use "
                    f"`{sys.executable} -m tests.integration.lab --release {lab.release} "
                    "exec -- sinfo`",
                    file=sys.stderr,
                )
            print(f"export SLURM_CONF={lab.env['SLURM_CONF']}")
            for key, value in lab._ledger_env().items():
                print(f"export {key}={value}")
            print(f"export SLURM_QUOTA_MUNGE_SOCKET={lab.env['SLURM_QUOTA_MUNGE_SOCKET']}")
            print(f'export PATH="{Path(lab.quota_bin).parent}:$PATH"')
    except LabError as err:
        print(f"lab: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
