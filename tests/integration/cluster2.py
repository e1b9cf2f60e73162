"""A second Slurm cluster beside a running lab: its own slurmctld and slurmd (own ClusterName,
ports, state, spool, logs, jobcomp wrapper), sharing the lab's munged, slurmdbd, MariaDB and
quota ledger, as two clusters of one site share one accounting database and one ledger.

    second = ClusterBeside(lab, "lab2", port_offset=4)   # ports lab base+4 (ctld), +5 (slurmd)
    second.up()          # registers cluster lab2 + associations in slurmdbd, starts its daemons
    second.sbatch(...)   # every Lab helper works on it (run, sbatch, sacct, wait_jobcomp, ...)
    second.down()        # stops its two daemons and its jobs, never the lab's

It lives in $LAB/<name>/ (so the lab's `up` wipes it and a chrooted lab's bind mount covers it).
Its processes carry the lab's own MARKER value: the lab's `down` (its sweep) kills anything of it
left behind; its own `down` matches by its slurm.conf, never the lab's processes.
"""

from __future__ import annotations

import contextlib
import re
import time

from tests.integration.lab import (
    MARKER,
    REPO,
    Lab,
    LabError,
    _argv,
    _render,
    _tail,
    _write,
)

DAEMONS2 = ("slurmctld", "slurmd")


def next_job_id(lab: Lab) -> int:
    """NEXT_JOB_ID of a running lab's slurmctld."""
    out = lab.run("scontrol", "show", "config").stdout
    m = re.search(r"^NEXT_JOB_ID\s*=\s*(\d+)", out, re.M)
    if not m:
        raise LabError(f"no NEXT_JOB_ID in `scontrol show config` of {lab.cluster}")
    return int(m.group(1))


class ClusterBeside(Lab):
    """Another cluster on the lab's host, sharing its munged, slurmdbd and ledger."""

    def __init__(
        self, lab: Lab, name: str = "lab2", port_offset: int = 4, first_job_id: int | None = None
    ) -> None:
        super().__init__(
            root=lab.root / name,
            port_base=lab.port_base + port_offset,
            release=lab.release,
            ledger=lab.ledger_type,
        )
        self.main = lab
        self.cluster = name
        self.marker = lab.marker
        self.first_job_id = first_job_id
        # Shared with the lab: accounting, database, ledger, munged, the release's tree.
        self.dbd_port, self.mysql_port = lab.dbd_port, lab.mysql_port
        self.db_path, self.ledger_conf = lab.db_path, lab.ledger_conf
        self.mysql_socket, self.munge_socket = lab.mysql_socket, lab.munge_socket
        self.chroot_root, self.overlay_dir = lab.chroot_root, lab.overlay_dir
        self.quota_bin = lab.quota_bin
        self.env = {
            **lab.env,
            "SLURM_CONF": str(self.slurm_conf),
        }

    # ------------------------------------------------------------------ what differs from Lab

    def _ports(self) -> list[tuple[str, int]]:
        return [("slurmctld", self.ctld_port), ("slurmd", self.slurmd_port)]

    def is_up(self) -> bool:
        return set(self.daemon_pids()) == set(DAEMONS2)

    def _write_slurm_conf(self) -> None:
        text = _render("slurm.conf.in", **self._template_values())
        if self.first_job_id is not None:
            text += f"FirstJobId={self.first_job_id}\n"
        _write(self.slurm_conf, text)

    def _unmount(self) -> None:
        """The root filesystem is the lab's: it stays mounted."""

    def _leftover(self, pid: int, env: dict[str, str]) -> bool:
        """This cluster's leftovers only: its wrapper runs, and processes whose SLURM_CONF is
        this cluster's (slurmstepd and its children inherit slurmd's, jobs get the
        submitter's) when they carry the lab marker or are a job's."""
        return str(self.wrapper_path) in _argv(pid) or (
            env.get("SLURM_CONF") == str(self.slurm_conf)
            and (env.get(MARKER) == self.marker or "SLURM_JOB_ID" in env)
        )

    def _setup(self) -> None:
        self._check_ports()
        self._reset_dir()
        # The lab's munged socket and fake GPUs, at the paths the template gives.
        for rel, target in (("run/munge", self.main.run_dir / "munge"),
                            ("dev", self.main.root / "dev")):  # fmt: skip
            path = self.root / rel
            path.rmdir()
            path.symlink_to(target)
        values = self._template_values()
        self._write_slurm_conf()
        _write(self.etc / "gres.conf", _render("gres.conf.in", **values))
        _write(self.etc / "slurm-quota.conf", _render("slurm-quota.conf.in", **values))
        self.set_jobcomp(True)
        self.install_plugin(REPO / "lua" / "job_submit.lua")

    def _register_accounts(self) -> None:
        known = self.run("sacctmgr", "-n", "-P", "list", "cluster", "format=cluster").stdout
        if self.cluster not in known.split():
            super()._register_accounts()

    def up(self) -> float:
        """Bring this cluster up beside the running lab; return seconds taken."""
        t0 = time.monotonic()
        if not self.main.is_up():
            raise LabError(f"the lab in {self.main.root} is not up")
        if self.is_up():
            return 0.0
        if self.daemon_pids():
            self.down()
        self.timings = []
        for log_name, stage in (
            ("setup", self._setup),
            ("slurmdbd", self._register_accounts),
            ("slurmctld", self._start_slurmctld),
            ("slurmd", self._start_slurmd),
        ):
            try:
                stage()
                self.timings.append((stage.__name__.lstrip("_"), time.monotonic() - t0))
            except BaseException as err:
                message = f"{self.cluster} up failed at {stage.__name__}: {err}"
                for path in (
                    self.log_dir / f"{log_name}.log",
                    self.log_dir / f"{log_name}.start.log",
                ):
                    if path.exists() and path.stat().st_size:
                        message += f"\n--- tail of {path} ---\n{_tail(path, 40)}"
                with contextlib.suppress(Exception):
                    self.down()
                if not isinstance(err, Exception):
                    raise
                raise LabError(message) from err
        return time.monotonic() - t0
