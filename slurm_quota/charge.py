"""Charging one ended run of a job, exactly once.

Owns: reading the jobcomp environment, asking Slurm (through slurm_quota.slurm) for what the
environment lacks (the token in admin_comment and the allocated GPUs), computing the minutes
with slurm_quota.ledger, and writing the `charges` row, the consumption and the release of
one preallocated element in ONE transaction. Must not run subprocesses itself; its only
output for people is the one-line summary the jobcomp wrapper logs.

Exactly once: a run is identified by "<JOBID>:<START>" (a requeued job runs again with a new
START and is charged again). The charges row is inserted first inside a BEGIN IMMEDIATE
transaction; a conflicting insert means "already charged" and nothing else is touched. A
crash anywhere before COMMIT leaves no trace, so re-running is always safe.

When Slurm cannot tell the allocation in time, nothing is charged: SlurmUnavailable makes
the wrapper spool the environment and `reconcile` charges it later from accounting (the
correct GPU count matters more than charging within the second). A never-started job
(START == END or PROCS == 0) costs 0 whatever Slurm says; Slurm is asked only for its token.

Start-up time is part of the contract: slurmctld runs `slurm-quota charge` once per finished
job, one after another (budget 100 ms per job, bench/charge_startup.py). So this module and
what it imports avoid dataclasses, typing, pathlib, decimal and fractions at import time; its
records are collections.namedtuple subclasses (immutable, named fields, same construction
and defaults, equality and repr as the frozen dataclasses STYLE.md asks for; see
slurm_quota.slurm).
"""

from __future__ import annotations

import time
from collections import namedtuple
from collections.abc import Mapping

from slurm_quota import ledger, numbers
from slurm_quota import slurm as slurm_mod
from slurm_quota.errors import ImplausibleSlurmData, InvalidInput, SlurmUnavailable

NO_VAL = 4294967294
# Bounds of what Slurm can hand over for one run: ids, task ids, offsets and CPU counts are
# uint32 in Slurm; times are epoch seconds (2**34 is in the year 2514). Anything beyond is
# refused before any write, so a run is never half-charged and SQLite never overflows.
MAX_SLURM_ID = 2**32 - 1
MAX_SLURM_EPOCH = 2**34
# Bounded retry while sacct may still be stale right after a job ended (seen ≤ 0.57 s).
SACCT_RETRY_DELAYS_S = (0.1, 0.2, 0.3, 0.4)

RELEASE_NONE = "none"
SETTING_CLUSTER_KEYS = "cluster_keys"  # validate.SETTING_CLUSTER_KEYS
RELEASE_ONE = "one"
RELEASE_ALL = "all"


# ---------------------------------------------------------------------------------------
# What one run is
# ---------------------------------------------------------------------------------------


def _env_int(env: Mapping[str, str], key: str, *, required: bool) -> int | None:
    raw = (env.get(key) or "").strip()
    if not raw:
        if required:
            raise InvalidInput(f"The jobcomp environment has no {key} (is this run by Slurm?).")
        return None
    value = numbers.int_or_none(raw)
    if value is None:
        raise InvalidInput(f"The jobcomp variable {key}={numbers.shown(raw)} is not a number.")
    return value


def _id_or_none(value: int | None) -> int | None:
    # Slurm passes 0 / NO_VAL for "not an array" and leaves HETJOB* unset for plain jobs.
    if value is None or value in (0, NO_VAL):
        return None
    return value


_RunFields = namedtuple(
    "Run",
    (
        "job_id",  # int
        "start_time",  # int (epoch s)
        "end_time",  # int (epoch s)
        "cpus",  # int
        "username",  # str
        "account",  # str
        "partition",  # str = ""
        "job_state",  # str = ""
        "array_job_id",  # int | None = None
        "array_task_id",  # int | None = None
        "het_job_id",  # int | None = None
        "het_job_offset",  # int | None = None
        "array_meta",  # bool = False: a pending, never-split array record (all elements end)
        "cluster",  # str = "": in the key only when clusters share the ledger (cluster_keys)
    ),
    defaults=("", "", None, None, None, None, False, ""),
)


class Run(_RunFields):
    """One ended run of a job, as slurmctld's jobcomp environment or sacct describes it."""

    __slots__ = ()

    @property
    def charge_key(self) -> str:
        """The idempotency key of this run: "<JOBID>:<START>", and "@<cluster>" after it when
        several clusters share the ledger (each has its own job ids)."""
        key = f"{self.job_id}:{self.start_time}"
        return f"{key}@{self.cluster}" if self.cluster else key

    @property
    def keys(self) -> tuple[str, ...]:
        """Every key under which this run may already be charged: its own, and for a
        cluster-qualified run the unqualified one it had before the ledger was shared."""
        plain = f"{self.job_id}:{self.start_time}"
        return (self.charge_key, plain) if self.cluster else (plain,)

    @property
    def elapsed_s(self) -> int:
        """Seconds the run held its allocation."""
        return self.end_time - self.start_time

    @property
    def never_started(self) -> bool:
        """True for a job cancelled (or failed) before it got resources: it costs 0."""
        return self.start_time == self.end_time or self.cpus == 0

    @property
    def ends_job(self) -> bool:
        """False for a requeued run (the job goes back to the queue and keeps its reservation).

        slurmctld reports a requeue to jobcomp with JOBSTATE=PENDING (observed on 22.05), sacct
        as REQUEUED.
        """
        state = slurm_mod.base_state(self.job_state)
        return state in slurm_mod.FINAL_STATES and state != "REQUEUED"

    @property
    def release(self) -> str:
        """How much of the job's preallocation this run gives back."""
        if not self.ends_job:
            return RELEASE_NONE
        return RELEASE_ALL if self.array_meta else RELEASE_ONE


def run_from_env(env: Mapping[str, str]) -> Run:
    """The run described by slurmctld's jobcomp environment (raises InvalidInput)."""
    job_id = _env_int(env, "JOBID", required=True)
    start = _env_int(env, "START", required=True)
    end = _env_int(env, "END", required=True)
    procs = _env_int(env, "PROCS", required=False) or 0
    assert job_id is not None and start is not None and end is not None
    if end < start:
        raise InvalidInput(f"Job {job_id}: END ({end}) is before START ({start}).")
    if procs < 0:
        raise InvalidInput(f"Job {job_id}: PROCS is negative ({procs}).")
    username = (env.get("USERNAME") or "").strip()
    if not username:
        raise InvalidInput(f"Job {job_id}: the jobcomp environment has no USERNAME.")
    array_job_id = _id_or_none(_env_int(env, "ARRAYJOBID", required=False))
    raw_task = _env_int(env, "ARRAYTASKID", required=False)
    array_task_id = None if raw_task in (None, NO_VAL) else raw_task
    run = Run(
        job_id=job_id,
        start_time=start,
        end_time=end,
        cpus=procs,
        username=username,
        account=(env.get("ACCOUNT") or "").strip(),
        partition=(env.get("PARTITION") or "").strip(),
        job_state=(env.get("JOBSTATE") or "").strip(),
        array_job_id=array_job_id,
        array_task_id=array_task_id if array_job_id is not None else None,
        het_job_id=_env_int(env, "HETJOBID", required=False),
        het_job_offset=_env_int(env, "HETJOBOFFSET", required=False),
        # The unsplit pending record of an array: ARRAYJOBID == JOBID, no task id.
        array_meta=array_job_id is not None and array_job_id == job_id and array_task_id is None,
    )
    check_plausible(run)
    return run


def check_plausible(run: Run) -> None:
    """Refuse (ImplausibleSlurmData) a run whose numbers no real Slurm job can have."""
    fields = (
        ("JOBID", run.job_id, MAX_SLURM_ID),
        ("START", run.start_time, MAX_SLURM_EPOCH),
        ("END", run.end_time, MAX_SLURM_EPOCH),
        ("PROCS", run.cpus, MAX_SLURM_ID),
        ("ARRAYJOBID", run.array_job_id, MAX_SLURM_ID),
        ("ARRAYTASKID", run.array_task_id, MAX_SLURM_ID),
        ("HETJOBID", run.het_job_id, MAX_SLURM_ID),
        ("HETJOBOFFSET", run.het_job_offset, MAX_SLURM_ID),
    )
    for name, value, maximum in fields:
        if value is not None and not 0 <= value <= maximum:
            raise ImplausibleSlurmData(
                f"Job {run.job_id}: {name}={value} is not a value Slurm can give (0 to "
                f"{maximum}); nothing was charged. Check the job with `sacct -j "
                f"{run.job_id}`: `slurm-quota reconcile` charges the run from accounting "
                f"when it reads sanely there."
            )


def run_from_sacct(row: slurm_mod.AccountingJob) -> Run | None:
    """The run of one final sacct row (None for a row that does not describe an ended run)."""
    if not row.final or row.end_time is None or not row.username:
        return None
    # sacct shows Start=None for a job cancelled before it started; jobcomp then passes
    # START == END == the cancel time, so the key is built from End to match.
    start = row.start_time if row.start_time is not None else row.end_time
    if start > row.end_time:
        start = row.end_time
    cpus = row.alloc_cpus if start < row.end_time else 0
    # "7_[0-3]": the pending record of an array's never-split elements, all ending here.
    meta = "_[" in row.job_id_text
    array_job_id = row.array_job_id
    if meta:
        head = row.job_id_text.split("_", 1)[0]
        array_job_id = numbers.int_or_none(head) or row.job_id
    return Run(
        job_id=row.job_id,
        start_time=start,
        end_time=row.end_time,
        cpus=cpus,
        username=row.username,
        account=row.account,
        partition=row.partition,
        job_state=slurm_mod.base_state(row.state),
        array_job_id=array_job_id,
        array_task_id=row.array_task_id,
        het_job_id=row.het_job_id,
        het_job_offset=row.het_job_offset,
        array_meta=meta,
    )


# ---------------------------------------------------------------------------------------
# What Slurm adds: the token and the allocated GPUs
# ---------------------------------------------------------------------------------------


class Allocation(namedtuple("Allocation", ("token", "gpus_by_type", "source"))):
    """What Slurm knows about one run that the jobcomp environment does not carry.

    token: str | None; gpus_by_type: Mapping[str, int] (a new empty dict when not given);
    source: "scontrol" | "sacct" | "none" (the default).
    """

    __slots__ = ()

    def __new__(
        cls, token: str | None, gpus_by_type: Mapping[str, int] | None = None, source: str = "none"
    ) -> Allocation:
        return super().__new__(cls, token, {} if gpus_by_type is None else gpus_by_type, source)


def _from_sacct_rows(run: Run, rows: list[slurm_mod.AccountingJob]) -> Allocation | None:
    for row in rows:
        if not row.final:
            continue  # stale (RUNNING, End unknown): slurmdbd has not applied the end yet
        if run.never_started:
            hit = row.end_time == run.end_time and row.start_time in (None, run.start_time)
        else:
            hit = row.start_time == run.start_time and row.end_time == run.end_time
        if hit:
            return Allocation(row.token, dict(row.gpus_by_type), "sacct")
    return None


def lookup_allocation(
    run: Run,
    *,
    runner: slurm_mod.Runner | None = None,
    sleep=time.sleep,
    retry_delays_s: tuple[float, ...] = SACCT_RETRY_DELAYS_S,
) -> Allocation:
    """Token and GPUs of a run: slurmctld's record first, then sacct with a bounded retry.

    Raises SlurmUnavailable when neither answers in time or neither knows this run (the
    caller then spools it). A never-started run that Slurm does not know gets no token.
    """
    controller_error: SlurmUnavailable | None = None
    try:
        job = slurm_mod.controller_job(run.job_id, runner=runner)
    except SlurmUnavailable as err:
        controller_error = err
        job = None
    if job is not None:
        if run.never_started:
            # Costs 0 whatever the record says; only the token matters.
            return Allocation(job.token, {}, "scontrol")
        if (
            slurm_mod.is_final(job.job_state)
            and job.start_time == run.start_time
            and job.end_time == run.end_time
        ):
            return Allocation(job.token, dict(job.gpus_by_type), "scontrol")
        # The controller already moved on (requeued and pending/running again): sacct -D
        # still has this run's own row.
    delays = (0.0, *retry_delays_s)
    last_error: SlurmUnavailable | None = None
    for delay in delays:
        if delay:
            sleep(delay)
        try:
            rows = slurm_mod.sacct_job(run.job_id, runner=runner)
        except SlurmUnavailable as err:
            last_error = err
            break  # a hung or failing sacct is not staleness: do not wait again
        found = _from_sacct_rows(run, rows)
        if found is not None:
            return found
    if last_error is None and controller_error is None and run.never_started:
        return Allocation(None, {}, "none")
    reason = last_error or controller_error
    raise SlurmUnavailable(
        f"Job {run.job_id} (run {run.charge_key}): Slurm did not report this run's "
        f"allocation in time"
        + (f": {reason}" if reason else " (not yet in accounting).")
    )


# ---------------------------------------------------------------------------------------
# The charge itself
# ---------------------------------------------------------------------------------------


_ChargeFields = namedtuple(
    "Charge",
    (
        "run",  # Run
        "token",  # str | None
        "gpus_by_type",  # Mapping[str, int]
        "gpu_factors",  # Mapping[str, float]
        "cpu_minutes",  # int
        "gpu_minutes",  # int: minutes of this run by the one rule (ledger.minutes_from_*)
        "source",  # str
        "cpu_s",  # int = 0: exact CPU-seconds (cpus × elapsed) — what the totals add
        "gpu_ms",  # int = 0: exact GPU-milliseconds (Σ count × factor × elapsed × 1000)
    ),
    defaults=(0, 0),
)


class Charge(_ChargeFields):
    """The computed charge of one run (what goes into the `charges` row)."""

    __slots__ = ()

    def row(self, released: int) -> dict[str, object]:
        """The `charges` row (column -> value)."""
        r = self.run
        return {
            "charge_key": r.charge_key,
            "job_id": r.job_id,
            "array_job_id": r.array_job_id,
            "array_task_id": r.array_task_id,
            "het_job_id": r.het_job_id,
            "het_job_offset": r.het_job_offset,
            "username": r.username,
            "account": r.account,
            "job_uuid": self.token,
            "partition": r.partition or None,
            "job_state": r.job_state or None,
            "start_time": r.start_time,
            "end_time": r.end_time,
            "elapsed_s": r.elapsed_s,
            "cpus": r.cpus,
            "gpus": ",".join(f"{t}={n}" for t, n in sorted(self.gpus_by_type.items())),
            "gpu_factors": ",".join(f"{t}={f!r}" for t, f in sorted(self.gpu_factors.items())),
            "cpu_minutes": self.cpu_minutes,
            "gpu_minutes": self.gpu_minutes,
            "released_prealloc": released,
            "source": self.source,
            "cpu_s": self.cpu_s,
            "gpu_ms": self.gpu_ms,
        }


_ChargeResultFields = namedtuple(
    "ChargeResult",
    (
        "charge",  # Charge
        "charged",  # bool; False: this run was already charged, nothing changed
        "released",  # int: preallocated elements released by this call
        "dry_run",  # bool = False
    ),
    defaults=(False,),
)


class ChargeResult(_ChargeResultFields):
    """What charging one run did."""

    __slots__ = ()

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly summary."""
        c = self.charge
        return {
            "charge_key": c.run.charge_key,
            "job_id": c.run.job_id,
            "username": c.run.username,
            "account": c.run.account,
            "job_state": c.run.job_state,
            "elapsed_s": c.run.elapsed_s,
            "cpus": c.run.cpus,
            "gpus": dict(c.gpus_by_type),
            "cpu_minutes": c.cpu_minutes,
            "gpu_minutes": c.gpu_minutes,
            "cpu_s": c.cpu_s,
            "gpu_ms": c.gpu_ms,
            "token": c.token,
            "source": c.source,
            "charged": self.charged,
            "released_elements": self.released,
            "dry_run": self.dry_run,
        }

    def describe(self) -> str:
        """One log line: what was charged to whom, from which inputs."""
        d = self.as_dict()
        gpus = ",".join(f"{t}={n}" for t, n in sorted(self.charge.gpus_by_type.items()))
        verb = "would charge" if self.dry_run else "charged"
        if not self.charged:
            verb = "already charged, nothing changed for"
        text = (
            f"job {d['job_id']} run {d['charge_key']} ({d['job_state'] or '?'}): {verb} "
            f"{d['username']}/{d['account'] or '-'}: {d['cpu_s']} CPU-s "
            f"({d['cpus']} CPUs x {d['elapsed_s']} s), {d['gpu_ms']} GPU-ms "
            f"(GPUs {gpus or 'none'})"
        )
        if self.charged:
            text += f"; token {d['token'] or 'none'}, released {self.released} element(s)"
            text += f" [{d['source']}]"
        return text


def compute_charge(
    run: Run, allocation: Allocation, factors: Mapping[str, float], source: str
) -> Charge:
    """Exact amounts of one run (DESIGN §4), and its minutes by the one rule.

    Raises ImplausibleSlurmData, before anything is written, for numbers no real run has.
    """
    check_plausible(run)
    gpus = {} if run.never_started else dict(allocation.gpus_by_type)
    used = {t: ledger.factor_for(t, factors) for t in gpus}
    elapsed = 0 if run.never_started else run.elapsed_s
    cpus = 0 if run.never_started else run.cpus
    cpu_s = ledger.cpu_s_charged(cpus, elapsed)
    gpu_ms = ledger.gpu_ms_charged(gpus, factors, elapsed)
    charge = Charge(
        run=run,
        token=allocation.token,
        gpus_by_type=gpus,
        gpu_factors=used,
        cpu_minutes=ledger.minutes_from_cpu_s(cpu_s),
        gpu_minutes=ledger.minutes_from_gpu_ms(gpu_ms),
        source=source,
        cpu_s=cpu_s,
        gpu_ms=gpu_ms,
    )
    for label, minutes in (("CPU", charge.cpu_minutes), ("GPU", charge.gpu_minutes)):
        if minutes > ledger.MAX_MINUTES:
            raise ImplausibleSlurmData(
                f"Job {run.job_id} (run {run.charge_key}): {minutes} {label} minutes "
                f"({cpus} CPUs, GPUs {gpus or 'none'}, {elapsed} s) is more than any run can "
                f"use (at most {ledger.MAX_MINUTES}); nothing was charged. Check the job with "
                f"sacct; `slurm-quota reconcile` charges it once Slurm reports it sanely."
            )
    return charge


def clusters_share(conn) -> bool:
    """True when the ledger's setting cluster_keys is yes (several clusters share it)."""
    from slurm_quota import db

    return db.get_setting(conn, SETTING_CLUSTER_KEYS) == "yes"


def with_cluster(conn, run: Run, cluster: str | None) -> Run:
    """The run with its cluster in the key when the ledger's setting cluster_keys is yes.

    cluster: CLUSTER of the jobcomp environment (slurmctld sets it) or the ClusterName of
    reconcile's Slurm. Missing while the setting is on: InvalidInput, nothing charged.
    """
    if not clusters_share(conn):
        return run
    name = (cluster or "").strip()
    if not name:
        raise InvalidInput(
            f"Job {run.job_id}: the ledger is shared by several clusters (setting "
            f"{SETTING_CLUSTER_KEYS}) but the run's cluster is not known (no CLUSTER in the "
            f"jobcomp environment); nothing was charged."
        )
    return run._replace(cluster=name)


def charge_exists(conn, run: Run) -> bool:
    """True when the run is charged, under its key or the key it had before clusters shared
    the ledger."""
    from slurm_quota import db

    return any(db.charge_exists(conn, key) for key in run.keys)


def factors_of(conn) -> dict[str, float]:
    """The GPU factors table as {gpu_type: factor}."""
    from slurm_quota import db

    return {str(r[0]): float(r[1]) for r in db.list_gpu_factors(conn)}


def charge_in_transaction(
    conn, run: Run, allocation: Allocation, source: str, factors: Mapping[str, float]
) -> ChargeResult:
    """The writes of one charge; the caller holds the write transaction (db.write_transaction).

    The charges row goes first: if the run is already there, nothing else is touched.
    """
    from slurm_quota import db

    charge = compute_charge(run, allocation, factors, source)
    if run.cluster and db.charge_exists(conn, f"{run.job_id}:{run.start_time}"):
        return ChargeResult(charge, charged=False, released=0)  # charged before the sharing
    if not db.insert_charge(conn, charge.row(released=0)):
        return ChargeResult(charge, charged=False, released=0)
    # The reservation is released before the owners' totals are written: the plugin's
    # job_modify locks a preallocation, then (its triggers) the owners; the same order here
    # means a MariaDB ledger never deadlocks the two.
    released = 0
    if charge.token and run.release != RELEASE_NONE:
        released = db.release_preallocation(
            conn, charge.token, all_elements=run.release == RELEASE_ALL
        )
        if released:
            db.set_charge_released(conn, run.charge_key, released)
    owners = [("user", run.username)] + ([("account", run.account)] if run.account else [])
    if db.periods_in_use(conn):
        _charge_with_periods(conn, run, charge, owners)
    else:
        for kind, name in owners:
            db.add_owner_consumption(conn, kind, name, charge.cpu_s, charge.gpu_ms)
    return ChargeResult(charge, charged=True, released=released)


def _charge_with_periods(conn, run: Run, charge: Charge, owners: list) -> None:
    """Add a run to owners under allocation periods: first bring their periods up to now (a
    boundary passed since the last upkeep closes the period before this run is counted),
    then add it, and move it to the period it ended in when that one is already closed."""
    from slurm_quota import access, db, periods

    now, actor = periods.now_s(), access.current_actor()
    tz = periods.site_zone(conn)
    for kind, name in owners:
        known = db.period_state(conn, kind, name) is not None
        periods.maintain_owner(conn, kind, name, now, actor, tz)
        db.add_owner_consumption(conn, kind, name, charge.cpu_s, charge.gpu_ms)
        if not known:  # a new owner row: its period starts now, this run counts in it
            periods.maintain_owner(conn, kind, name, now, actor, tz)
        periods.after_charge(conn, kind, name, run.end_time, charge.cpu_s, charge.gpu_ms)


def apply_charge(conn, run: Run, allocation: Allocation, source: str) -> ChargeResult:
    """Write one run's charge, consumption and release in ONE transaction (exactly once)."""
    from slurm_quota import db

    with db.write_transaction(conn):
        result = charge_in_transaction(conn, run, allocation, source, factors_of(conn))
    if result.charged:
        owners = [("user", run.username)] + ([("account", run.account)] if run.account else [])
        notify_thresholds(conn, owners)
    return result


def notify_thresholds(conn, owners: list | None) -> None:
    """After a charge committed: the site's threshold command for what owners crossed
    (slurm_quota.thresholds; bounded time). A failure is logged, never raised: the charge
    is done, and the pending command is retried by the next charge or reconcile."""
    from slurm_quota import db

    if db.get_setting(conn, "threshold_command") is None:
        return  # thresholds off: one read, no import
    import logging

    from slurm_quota import thresholds

    try:
        thresholds.notify(conn, owners, int(time.time()))
    except Exception as err:  # noqa: BLE001 - the charge committed; nothing may undo that
        logging.getLogger(__name__).warning("threshold notification failed: %s", err)


def preview_charge(conn, run: Run, allocation: Allocation, source: str) -> ChargeResult:
    """What apply_charge would do, without writing (for --dry-run)."""

    charge = compute_charge(run, allocation, factors_of(conn), source)
    done = charge_exists(conn, run)
    return ChargeResult(charge, charged=not done, released=0, dry_run=True)


def charge_env(
    conn,
    env: Mapping[str, str],
    *,
    runner: slurm_mod.Runner | None = None,
    source: str = "jobcomp",
    dry_run: bool = False,
    sleep=time.sleep,
) -> ChargeResult:
    """Charge the run described by a jobcomp environment (the `slurm-quota charge` command)."""

    run = with_cluster(conn, run_from_env(env), env.get("CLUSTER"))
    if charge_exists(conn, run):
        # Already charged (a replay): no need to ask Slurm anything.
        charge = compute_charge(run, Allocation(None), {}, source)
        return ChargeResult(charge, charged=False, released=0, dry_run=dry_run)
    allocation = lookup_allocation(run, runner=runner, sleep=sleep)
    label = f"{source}:{allocation.source}"
    if dry_run:
        return preview_charge(conn, run, allocation, label)
    return apply_charge(conn, run, allocation, label)


if __name__ == "__main__":  # `python -m slurm_quota.charge`: the charge without click
    from slurm_quota.entry import charge_main

    raise SystemExit(charge_main())
