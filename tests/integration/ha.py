"""A lab with an HA pair of controllers: SlurmctldHost ctl1 (primary) and ctl2 (backup).

`HALab` is a `Lab` (tests/integration/lab.py) whose two slurmctld run each in its own network
namespace (its own address, so both listen on the same SlurmctldPort), UTS namespace (hostname
ctl1 / ctl2: slurmctld finds itself in SlurmctldHost by hostname) and mount namespace (a
private bind of $LAB/ctl1 or $LAB/ctl2 on $LAB/ctl, where slurm.conf puts SlurmctldPidFile and
SlurmctldLogFile: with one shared PID file the second slurmctld would kill the first as an
"old slurmctld"). StateSaveLocation is the one shared directory.

Network, per lab (names and subnet derived from the port base, so two HA labs can coexist):
a bridge sq<base>br in the host namespace with 10.213.A.1/24 (A = 100 + (base//100) % 100),
and per controller a veth pair: sq<base>h1 (host side, in the bridge) and sq<base>n1 in
namespace sq<base>c1 with 10.213.A.2 (ctl1); sq<base>h2/sq<base>n2 in sq<base>c2 with
10.213.A.3 (ctl2). The controllers reach each other through the bridge (layer 2: the host's
ip_forward, a machine-wide setting, stays as it is). Everything else (munged, MariaDB,
slurmdbd, slurmd, clients) stays in the host namespace and is reached by the controllers at
the bridge's address 10.213.A.1, the "hub" (NodeAddr, AccountingStorageHost, the ledger's
StorageHost). Deleting a namespace removes its veth pair; `down` does it and deletes the
bridge (also after a failed `up`), and `up` first removes leftovers of the same names.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.integration.lab import (
    DEFAULT_STOP_TIMEOUT_S,
    POLL_S,
    STOP_TIMEOUT_S,
    Lab,
    LabError,
    _comm,
    _read_pid,
    _tail,
    _write,
    alive,
)

CONTROLLERS = ("ctl1", "ctl2")
# lab daemon name of each controller (lab.json), the first as Lab knows it
DAEMON_OF = {"ctl1": "slurmctld", "ctl2": "slurmctld2"}
SLURMCTLD_TIMEOUT_S = 10
SCHED_INTERVAL_S = 5


def _ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise LabError(f"`ip {' '.join(argv)}` failed: {proc.stderr.strip()}")
    return proc


class HALab(Lab):
    """A Lab whose slurmctld is an HA pair in network namespaces (see the module doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        octet = 100 + (self.port_base // 100) % 100
        self.bridge = f"sq{self.port_base}br"
        # the host as the controllers reach it
        self.hub = f"10.213.{octet}.1"
        self.ctl = {}
        for i, name in enumerate(CONTROLLERS, start=1):
            self.ctl[name] = {
                "netns": f"sq{self.port_base}c{i}",
                "host_if": f"sq{self.port_base}h{i}",
                "ns_if": f"sq{self.port_base}n{i}",
                "addr": f"10.213.{octet}.{i + 1}",
                "dir": self.root / name,
            }
        self.mysql_bind = "0.0.0.0"
        self.ledger_host = self.hub
        self.ledger_grant_hosts = ("127.0.0.1", "10.213.%")

    # ------------------------------------------------------------------ records

    def pid_file(self, daemon: str) -> Path:
        for name, dname in DAEMON_OF.items():
            if daemon == dname:
                return self.ctl[name]["dir"] / "slurmctld.pid"
        return super().pid_file(daemon)

    def _log_file(self, daemon: str) -> Path:
        for name, dname in DAEMON_OF.items():
            if daemon == dname:
                return self.ctl[name]["dir"] / "slurmctld.log"
        return super()._log_file(daemon)

    def _recorded_pids(self) -> dict[str, int]:
        pids = super()._recorded_pids()
        pid = _read_pid(self.pid_file("slurmctld2"))
        if pid is not None:
            pids["slurmctld2"] = pid
        return pids

    def _is_ours(self, daemon: str, pid: int) -> bool:
        if daemon == "slurmctld2":
            return _comm(pid) == "slurmctld" and super()._is_ours("slurmctld", pid)
        return super()._is_ours(daemon, pid)

    def is_up(self) -> bool:
        return super().is_up() and "slurmctld2" in self.daemon_pids()

    def controller_pid(self, name: str) -> int | None:
        """PID of controller ctl1/ctl2 when it is running."""
        return self.daemon_pids().get(DAEMON_OF[name])

    def _controller_running(self) -> bool:
        return any(d in self.daemon_pids() for d in DAEMON_OF.values())

    # ------------------------------------------------------------------ configuration

    def _template_values(self) -> dict[str, str]:
        values = super()._template_values()
        # Each controller has its own address in its own namespace: bind any address
        # (NoCtldInAddrAny/NoInAddrAny would bind to what the hostname resolves to).
        values["COMMPARAMS"] = ""
        return values

    def _write_slurm_conf(self) -> None:
        super()._write_slurm_conf()
        text = self.slurm_conf.read_text()
        lab = str(self.root)
        hosts = "".join(f"SlurmctldHost={n}({self.ctl[n]['addr']})\n" for n in CONTROLLERS)
        replacements = [
            ("SlurmctldHost=localhost(127.0.0.1)\n", hosts),
            (
                f"SlurmctldPidFile={lab}/run/slurmctld.pid",
                f"SlurmctldPidFile={lab}/ctl/slurmctld.pid\n"
                f"SlurmctldTimeout={SLURMCTLD_TIMEOUT_S}",
            ),
            (
                f"SlurmctldLogFile={lab}/log/slurmctld.log",
                f"SlurmctldLogFile={lab}/ctl/slurmctld.log",
            ),
            ("AccountingStorageHost=localhost", f"AccountingStorageHost={self.hub}"),
            ("NodeAddr=127.0.0.1", f"NodeAddr={self.hub}"),
        ]
        for old, new in replacements:
            if old not in text:
                raise LabError(f"slurm.conf template changed: no {old!r}")
            text = text.replace(old, new)
        # After `scontrol takeover`, 22.05's new primary was seen leaving jobs it had
        # recovered pending until its main scheduling loop ran (default every 60 s).
        text += f"SchedulerParameters=sched_interval={SCHED_INTERVAL_S}\n"
        _write(self.slurm_conf, text)

    # ------------------------------------------------------------------ network

    def _net_down(self) -> None:
        """Remove this lab's namespaces (their veth pairs go with them), host-side links and
        bridge."""
        for c in self.ctl.values():
            _ip("netns", "del", c["netns"], check=False)
            if Path(f"/sys/class/net/{c['host_if']}").exists():
                _ip("link", "del", c["host_if"], check=False)
        if Path(f"/sys/class/net/{self.bridge}").exists():
            _ip("link", "del", self.bridge, check=False)

    def _net_up(self) -> None:
        self._net_down()
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.hub}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for c in self.ctl.values():
            ns = c["netns"]
            _ip("netns", "add", ns)
            _ip("link", "add", c["host_if"], "type", "veth", "peer", "name", c["ns_if"])
            _ip("link", "set", c["ns_if"], "netns", ns)
            _ip("link", "set", c["host_if"], "master", self.bridge)
            _ip("link", "set", c["host_if"], "up")
            for argv in (
                ("link", "set", "lo", "up"),
                ("addr", "add", f"{c['addr']}/24", "dev", c["ns_if"]),
                ("link", "set", c["ns_if"], "up"),
                ("route", "add", "default", "via", self.hub),
            ):
                _ip("-n", ns, *argv)

    def _setup(self) -> None:
        super()._setup()
        hosts = ["127.0.0.1 localhost", f"{self.hub} labhub"]
        hosts += [f"{c['addr']} {n}" for n, c in self.ctl.items()]
        _write(self.etc / "ha-hosts", "\n".join(hosts) + "\n")
        _write(self.etc / "ha-resolv.conf", "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        (self.root / "ctl").mkdir(exist_ok=True)
        for c in self.ctl.values():
            c["dir"].mkdir(exist_ok=True)
        self._net_up()

    # ------------------------------------------------------------------ controllers

    def _controller_argv(self, name: str) -> list[str]:
        c = self.ctl[name]
        binds = [(c["dir"], self.root / "ctl")]
        system_root = Path("/")
        if self.chrooted:
            inner = Path(str(self.chroot_root) + str(self.root))
            binds.append((inner / name, inner / "ctl"))
            system_root = self.chroot_root
        # The namespace's own name service files: the lab's addresses by name, and a resolver
        # that fails at once (the machine's DNS server is out of the namespace's reach, and
        # 26.05's slurmctld looked a client address up for 10 s: sbatch timed out).
        for fname in ("hosts", "resolv.conf"):
            target = system_root / "etc" / fname
            if target.is_file() and not target.is_symlink():
                binds.append((self.etc / f"ha-{fname}", target))
        mounts = " && ".join(f"mount --bind '{src}' '{dst}'" for src, dst in binds)
        script = f'hostname {name} && {mounts} && exec "$@"'
        slurmctld = self.in_chroot(["slurmctld", "-D"], cwd=str(self.root))
        return [
            "ip", "netns", "exec", c["netns"],
            "unshare", "--uts", "--mount", "--propagation", "private",
            "sh", "-c", script, "sh", *slurmctld,
        ]  # fmt: skip

    def start_controller(self, name: str) -> int:
        """Start controller ctl1/ctl2 (foreground slurmctld, execed: the PID is slurmctld's)."""
        log = self.log_dir / f"slurmctld-{name}.start.log"
        with open(log, "ab") as out:
            child = subprocess.Popen(
                self._controller_argv(name),
                env=self._daemon_env(),
                cwd=str(self.root),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        self._save_pid(DAEMON_OF[name], child.pid)
        return child.pid

    def ping(self) -> dict[str, str]:
        """`scontrol ping`: controller name -> the rest of its line (e.g. 'is UP')."""
        out = self.run("scontrol", "ping", check=False, timeout=30).stdout
        found = {}
        for line in out.splitlines():
            for name in CONTROLLERS:
                if f" at {name} " in line:
                    found[name] = line.strip()
        return found

    def _start_slurmctld(self) -> None:
        for name in CONTROLLERS:
            pid = self.start_controller(name)

            def answering(name=name, pid=pid) -> bool:
                if not alive(pid):
                    raise LabError(
                        f"slurmctld {name} (pid {pid}) died:\n"
                        f"{_tail(self.ctl[name]['dir'] / 'slurmctld.log')}\n"
                        f"{_tail(self.log_dir / f'slurmctld-{name}.start.log', 10)}"
                    )
                return "is UP" in self.ping().get(name, "")

            self._wait(f"slurmctld {name} to answer `scontrol ping`", answering, None)

    # ------------------------------------------------------------------ shutdown

    def down(self, purge: bool = False) -> dict[str, int]:
        """Cancel jobs, stop both controllers, then the rest as Lab.down; always remove the
        namespaces."""
        try:
            self._stop_jobs()
            running = self.daemon_pids()
            ctls = {d: running[d] for d in DAEMON_OF.values() if d in running}
            if ctls and self.wrapper_path.exists():
                with contextlib.suppress(OSError):
                    self.set_jobcomp(False)
            for pid in ctls.values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            for pid in ctls.values():
                deadline = time.monotonic() + STOP_TIMEOUT_S.get(
                    "slurmctld", DEFAULT_STOP_TIMEOUT_S
                )
                while alive(pid) and time.monotonic() < deadline:
                    time.sleep(POLL_S)
                if alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            stopped = super().down(purge=purge)
            return {**ctls, **stopped}
        finally:
            self._net_down()
