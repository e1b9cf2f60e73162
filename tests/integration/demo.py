"""`make demo`: the whole story on a real single-node Slurm lab, narrated.

Brings up a private lab (slurmctld, slurmd, slurmdbd, MariaDB, munge) with our plugin and
charge wrapper, sets quotas and a GPU factor as root, submits jobs as the unix users alice
and bob (really as them, not as root), shows one refusal with its message, waits for the
real jobcomp path to charge the jobs, prints `slurm-quota stats --all` through the HTTP
service as a user would, and stops everything it started.

Runs as root on Debian (it installs the Slurm packages when missing). Exit status 0 when
every step behaved as narrated, 1 otherwise.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.integration.lab import Lab, LabError  # noqa: E402

# The lab's own variables choose the demo's directory, ports and Slurm release
# (SLURM_QUOTA_LAB_DIR, SLURM_QUOTA_LAB_PORT_BASE, SLURM_QUOTA_LAB_RELEASE); unset, the demo
# uses a directory and ports of its own, so it never meets a lab left up by `make lab-up`.
DEMO_DIR = "/tmp/slurm-quota-demo"
DEMO_PORT_BASE = 19817
# What a login node needs to run `slurm-quota stats` with the system python3.
LOGIN_NODE_PACKAGES = ["python3", "python3-click", "python3-tabulate", "python3-requests"]
BOLD = "" if os.environ.get("NO_COLOR") else "\033[1m"
RESET = "" if os.environ.get("NO_COLOR") else "\033[0m"


class DemoFailed(Exception):
    """A step did not behave as the narration says."""


def say(text: str) -> None:
    print(f"\n{BOLD}== {text}{RESET}", flush=True)


def show(argv: list[str], proc: subprocess.CompletedProcess, who: str = "root") -> None:
    prompt = "#" if who == "root" else "$"
    print(f"{who}{prompt} {shlex.join(argv)}", flush=True)
    for stream in (proc.stdout, proc.stderr):
        if stream.strip():
            print(stream.rstrip(), flush=True)
    if proc.returncode != 0:
        print(f"(exit status {proc.returncode})", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Demo:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.quota = lab.quota_bin

    def admin(self, *args: str) -> subprocess.CompletedProcess:
        argv = ["slurm-quota", *args]
        proc = self.lab.run(self.quota, *args, check=False)
        show(argv, proc)
        if proc.returncode != 0:
            raise DemoFailed(f"`{shlex.join(argv)}` failed")
        return proc

    def submit(self, user: str, *args: str, expect_ok: bool = True) -> int | None:
        argv = ["sbatch", *args]
        full = [
            "sbatch",
            "--parsable",
            "-D",
            str(self.lab.jobs_dir),
            "-o",
            str(self.lab.jobs_dir / "slurm-%j.out"),
            *args,
        ]
        proc = self.lab.run(*full, user=user, check=False)
        show(argv, proc, who=user)
        if expect_ok and proc.returncode != 0:
            raise DemoFailed(f"{user}'s job was refused, the demo expected it to be accepted")
        if not expect_ok and proc.returncode == 0:
            raise DemoFailed(f"{user}'s job was accepted, the demo expected a refusal")
        if proc.returncode == 0:
            return int(proc.stdout.strip().split(";")[0])
        return None

    def user_cmd(self, user: str, env: dict[str, str], *args: str) -> str:
        """Run slurm-quota as a plain user, the way a login node has it: the system python3
        with Debian's click/tabulate/requests (root's venv is not readable by users)."""
        argv = ["slurm-quota", *args]
        # A login node has no ledger: without emptying the lab's SLURM_QUOTA_DB, `stats`
        # would read the file directly (readable in the lab) instead of asking the service.
        env = dict(env, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1", SLURM_QUOTA_DB="")
        proc = self.lab.run("env", *[f"{k}={v}" for k, v in env.items()],
                            "/usr/bin/python3", "-m", "slurm_quota", *args,
                            user=user, check=False)
        show(argv, proc, who=user)
        if proc.returncode != 0:
            raise DemoFailed(f"`{shlex.join(argv)}` as {user} failed")
        return proc.stdout


def run_demo(lab: Lab) -> None:
    demo = Demo(lab)
    # Long and wide enough that the charges are visible in whole minutes.
    wrap = "--wrap=sleep 20"

    say("Root sets quotas (minutes) and a GPU factor: an h100 minute counts double")
    demo.admin("user-quota", "alice", "2000", "--reason", "demo")
    demo.admin("user-gpu-quota", "alice", "120")
    demo.admin("user-quota", "bob", "100")
    demo.admin("account-quota", "research", "10000")
    demo.admin("set-gpu-factor", "h100", "2.0")

    say("alice submits: accepted, and each job reserves its worst case (CPUs x time limit)")
    jobs = [
        demo.submit("alice", "--time=10", "-n", "8", wrap),
        demo.submit("alice", "--time=10", "--gres=gpu:h100:2", wrap),
        demo.submit("alice", "--time=5", "-c", "2", "--array=0-3", wrap),
    ]

    say("bob asks for more than his 100 CPU minutes: refused at submission, with the numbers")
    demo.submit("bob", "-A", "physics", "--time=60", "-c", "4", wrap, expect_ok=False)
    demo.submit("bob", "-A", "physics", "--time=20", "-c", "4", wrap)

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    # The service runs where the rest of the lab's product runs (the release's chroot, on its
    # python3, for a lab of another release); chroot execs, so the PID is the server's.
    serve = subprocess.Popen(
        lab.in_chroot(
            [demo.quota, "--db", str(lab.db_path), "serve", "--port", str(port),
             "--idle-timeout", "0"],
            cwd=str(lab.root),
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # The lab's slurm.conf (roles, PrivateData) and munged (who asks).
        env=lab._client_env(),
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if serve.poll() is not None or time.monotonic() > deadline:
                    raise DemoFailed(
                        f"slurm-quota serve did not start: {serve.stderr.read()}"
                    ) from None
                time.sleep(0.1)

        say("While the jobs are queued or running, alice sees her reservations")
        demo.user_cmd("alice", {"SLURM_QUOTA_URL": url, "NO_COLOR": "1"}, "stats")

        say("Jobs finish; Slurm's jobcomp runs the charge wrapper; real usage is charged once")
        ids = [j for j in jobs if j is not None]
        for job_id in ids:
            lab.wait_job_end(job_id, timeout=180)
        # Array elements finish under their own ids; wait until the wrapper is idle.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with lab_db(lab) as conn:
                open_rows = conn.execute("SELECT COUNT(*) FROM jobs_preallocations").fetchone()[0]
            if open_rows == 0:
                break
            time.sleep(0.5)
        else:
            raise DemoFailed("preallocations were not all released by the charges in 120 s")
        print("charge log (written by the jobcomp wrapper):")
        print("\n".join(ln for ln in lab.logs("charge").splitlines() if "charged" in ln))
        check_gpu_charge(lab, jobs[1])
        demo.admin("history", "--user", "alice", "--limit", "8")

        say("alice asks for everyone's usage through the HTTP service: the lab's slurm.conf "
            "has PrivateData=usage, so MUNGE says who she is and she sees her row and her "
            "accounts")
        demo.user_cmd("alice", {"SLURM_QUOTA_URL": url, "NO_COLOR": "1"}, "stats", "--all")
        say("root on the controller reads the ledger itself: everyone")
        demo.admin("stats", "--all")
    finally:
        serve.terminate()
        try:
            serve.wait(timeout=10)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()


def check_gpu_charge(lab: Lab, job_id: int | None) -> None:
    """The --gres=gpu:h100:2 job was charged its real GPU time at the h100 factor: its two
    typed GPUs from Slurm's allocation, factor 2.0, exactly 2 x 2.0 x elapsed GPU-seconds
    (kept in GPU-ms), shown as whole minutes by the one rule (ceil)."""
    with lab_db(lab) as conn:
        rows = conn.execute(
            "SELECT gpus, gpu_factors, elapsed_s, gpu_ms, gpu_minutes FROM charges "
            "WHERE job_id = ?",
            (job_id,),
        ).fetchall()
    if len(rows) != 1:
        raise DemoFailed(f"the GPU job {job_id} has {len(rows)} charges, expected 1")
    gpus, factors, elapsed_s, gpu_ms, gpu_minutes = rows[0]
    expected_ms = 2 * 2 * elapsed_s * 1000
    print(f"GPU job {job_id}: GPUs {gpus}, factors {factors}, {elapsed_s} s -> "
          f"{gpu_ms / 1000:g} GPU-seconds (2 x 2.0 x {elapsed_s} s), shown as {gpu_minutes} "
          f"GPU-minute(s)", flush=True)
    if (gpus != "h100=2" or "h100=2.0" not in factors or gpu_ms != expected_ms
            or gpu_minutes != -(-expected_ms // 60000) or not expected_ms):
        raise DemoFailed(f"the GPU job was not charged its h100 GPU time: {rows[0]}")


class lab_db:  # noqa: N801 - used as a context manager
    def __init__(self, lab: Lab) -> None:
        self.lab = lab

    def __enter__(self):
        from slurm_quota import db

        self.conn = db.connect(self.lab.db_path, readonly=True)
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.close()


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root: it starts a private Slurm lab (slurmctld, slurmd, "
              "slurmdbd, MariaDB, munge) and submits jobs as other users.", file=sys.stderr)
        return 1
    from tests import syspkgs
    from tests.integration.lab import DIR_ENV, PORT_ENV, RELEASE_PORT_OFFSET, _ensure_packages

    try:
        probe = Lab(os.environ.get(DIR_ENV) or DEMO_DIR)
        suffix = f"-{probe.release}" if probe.chrooted else ""
        lab = Lab(
            os.environ.get(DIR_ENV) or DEMO_DIR + suffix,
            int(
                os.environ.get(PORT_ENV)
                or DEMO_PORT_BASE + (RELEASE_PORT_OFFSET[probe.release] if probe.chrooted else 0)
            ),
        )
    except LabError as err:
        print(f"demo: {err}", file=sys.stderr)
        return 2
    reason = _ensure_packages(lab.chrooted) or (
        None if lab.chrooted else syspkgs.ensure(LOGIN_NODE_PACKAGES)
    )
    if reason:
        print(f"demo: cannot install the lab's packages: {reason}", file=sys.stderr)
        return 1
    say(f"Bringing up a single-node Slurm lab in {lab.root} (16 CPUs, 2x h100 + 2x a100)")
    try:
        took = lab.up()
        print(f"lab up in {took:.1f} s, Slurm {lab.slurm_version()} ({lab.release}): "
              "slurmctld, slurmd, slurmdbd, MariaDB and munge by PID; "
              f"job_submit.lua and the charge wrapper installed", flush=True)
        run_demo(lab)
    except (DemoFailed, LabError) as err:
        print(f"\ndemo FAILED: {err}", file=sys.stderr)
        return 1
    finally:
        say("Stopping the lab (only the PIDs it started)")
        t0 = time.monotonic()
        lab.down(purge=True)
        print(f"lab down in {time.monotonic() - t0:.1f} s", flush=True)
    say("Demo complete")
    return 0


if __name__ == "__main__":
    sys.exit(main())
