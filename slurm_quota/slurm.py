"""Talking to Slurm: the only module that runs sacct, squeue and scontrol.

Owns: running the Slurm client commands under a hard timeout and parsing what they print
into immutable records. Must not touch the database nor decide about money: callers (charge,
reconcile, prune) do that.

Every call goes through a *runner* (a callable), so tests feed captured real outputs instead
of running Slurm. The default runner kills the command with SIGKILL when it does not answer in
time: in a jobcomp script the signal mask of slurmctld is inherited (TERM, INT, ... blocked),
so only SIGKILL is sure to end a hung sacct. Times are asked as epoch seconds
(SLURM_TIME_FORMAT=%s) so no local-time parsing is needed.

A command that cannot be run, times out, or fails raises SlurmUnavailable: callers must never
take "no answer" for "no jobs".

Records are not dataclasses here (STYLE.md says frozen dataclasses): this module is imported
by every `slurm-quota charge`, which slurmctld runs once per finished job, one after another,
and importing dataclasses (it imports inspect) plus building each class cost that path about
a quarter of its time. The parsed records are collections.namedtuple subclasses; RunResult,
which runners and test fakes must tell apart from a sequence of results, is a small slotted
class. Both keep what callers use of a frozen dataclass: named fields, keyword or positional
construction with the same defaults, immutability, equality, hashing and the
`Name(field=value, ...)` repr.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections import namedtuple
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cache

from slurm_quota import numbers
from slurm_quota.errors import SlurmUnavailable

# Per-command bounds (seconds). sacct was seen hanging > 20 s when slurmdbd is gone.
SCONTROL_TIMEOUT_S = 5.0
SACCT_TIMEOUT_S = 10.0
SQUEUE_TIMEOUT_S = 10.0
BATCH_SACCT_TIMEOUT_S = 120.0

# Terminal job states as sacct/scontrol print them (a state may carry a suffix like
# "CANCELLED by 0"). REQUEUED is the end of one run of a job that will run again.
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
        "TIMEOUT",
        "REQUEUED",
    }
)
# The -s list of the batched reconcile query: every state that ends a run.
RECONCILE_STATES = "BF,CA,CD,DL,F,NF,OOM,PR,TO,RQ"

NO_VAL = 4294967294
_UUID = r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}"
TOKEN_PREFIX = "slurm-quota:"
# Patterns are compiled on first use (_regex): a charge needs two of them, not all.
_TOKEN_RE = re.escape(TOKEN_PREFIX) + "(" + _UUID + ")"
_BARE_UUID_RE = "^" + _UUID + "$"
_ANY_UUID_RE = _UUID


@cache
def _regex(pattern: str) -> re.Pattern[str]:
    """The compiled form of one of this module's patterns (compiled once, when first needed)."""
    return re.compile(pattern)


class RunResult:
    """What one Slurm command returned: returncode (int), stdout and stderr (str).

    Immutable like a frozen dataclass, and deliberately not a tuple (see the module docstring).
    """

    __slots__ = ("returncode", "stdout", "stderr")

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        object.__setattr__(self, "returncode", returncode)
        object.__setattr__(self, "stdout", stdout)
        object.__setattr__(self, "stderr", stderr)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}")

    def _values(self) -> tuple[int, str, str]:
        return (self.returncode, self.stdout, self.stderr)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        return (
            f"RunResult(returncode={self.returncode!r}, stdout={self.stdout!r}, "
            f"stderr={self.stderr!r})"
        )


# runner(argv, timeout_s) -> RunResult; raises SlurmUnavailable when it cannot run or times out.
Runner = Callable[[Sequence[str], float], RunResult]


def run_command(argv: Sequence[str], timeout_s: float) -> RunResult:
    """Run a Slurm client with a hard timeout (SIGKILL on expiry) and epoch timestamps."""
    env = dict(os.environ)
    env["SLURM_TIME_FORMAT"] = "%s"
    try:
        # subprocess.run kills the child with SIGKILL when the timeout expires.
        proc = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=env,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise SlurmUnavailable(
            f"`{' '.join(argv)}` did not answer within {timeout_s:g} s (killed)."
        ) from err
    except OSError as err:
        raise SlurmUnavailable(f"Cannot run `{argv[0]}`: {err}.") from err
    return RunResult(
        proc.returncode,
        proc.stdout.decode("utf-8", "replace"),
        proc.stderr.decode("utf-8", "replace"),
    )


def _fail(argv: Sequence[str], res: RunResult) -> SlurmUnavailable:
    detail = res.stderr.strip().splitlines()
    last = detail[-1] if detail else "no message"
    return SlurmUnavailable(f"`{' '.join(argv)}` failed (exit {res.returncode}): {last}")


# ---------------------------------------------------------------------------------------
# Small parsers shared by the record types
# ---------------------------------------------------------------------------------------


def find_token(admin_comment: str | None) -> str | None:
    """The preallocation UUID in an admin comment: the last `slurm-quota:<uuid>` tag, or the
    whole comment when it is exactly a bare UUID (the seed system's format)."""
    if not admin_comment:
        return None
    tagged = _regex(_TOKEN_RE).findall(admin_comment)
    if tagged:
        return tagged[-1]
    text = admin_comment.strip()
    if _regex(_BARE_UUID_RE).match(text):
        return text
    return None


def tokens_in(text: str) -> set[str]:
    """Every UUID-looking string in a text (tagged or bare): used to decide what is alive."""
    return set(_regex(_ANY_UUID_RE).findall(text))


def parse_tres(tres: str | None) -> dict[str, str]:
    """`billing=1,cpu=1,gres/gpu:h100=2,gres/gpu=2,node=1` -> {name: value}."""
    out: dict[str, str] = {}
    if not tres:
        return out
    for part in tres.split(","):
        name, sep, value = part.partition("=")
        if sep and name:
            out[name.strip()] = value.strip()
    return out


def _count(value: str) -> int:
    # TRES counts are plain integers; memory-like values never reach here (only gres/gpu).
    n = numbers.int_or_none(value)
    return 0 if n is None else n


def gpus_by_type(tres: str | None) -> dict[str, int]:
    """Allocated GPUs by type from an AllocTRES string.

    Typed entries (`gres/gpu:TYPE=N`) win; the untyped total `gres/gpu=N` is used (under the
    type name `default`) only when no typed entry exists, never added to them.
    """
    typed: dict[str, int] = {}
    untyped = 0
    for name, value in parse_tres(tres).items():
        if name == "gres/gpu":
            untyped = _count(value)
        elif name.startswith("gres/gpu:"):
            gpu_type = name[len("gres/gpu:") :]
            n = _count(value)
            if gpu_type and n > 0:
                typed[gpu_type] = typed.get(gpu_type, 0) + n
    if typed:
        return typed
    if untyped > 0:
        return {"default": untyped}
    return {}


def cpus_in(tres: str | None) -> int | None:
    """The `cpu=N` count of a TRES string, None when absent."""
    return numbers.int_or_none(parse_tres(tres).get("cpu"))


def _int_or_none(text: str | None) -> int | None:
    # None for "Unknown", "None", "N/A", "(null)"
    return numbers.int_or_none(text, signed=True)


def base_state(state: str) -> str:
    """`CANCELLED by 0` -> `CANCELLED`; `COMPLETED+` -> `COMPLETED`."""
    word = state.strip().split(" ", 1)[0]
    return word.rstrip("+")


def is_final(state: str) -> bool:
    """True for a state that ends a run (sacct or scontrol spelling)."""
    return base_state(state) in FINAL_STATES


# ---------------------------------------------------------------------------------------
# scontrol show job -o
# ---------------------------------------------------------------------------------------

# A key starts a field only after a space; values may contain spaces (JobName, Comment...).
_SCONTROL_KEY = r"(?:^| )([A-Za-z][A-Za-z0-9_:/]*)="


def parse_scontrol_line(line: str) -> dict[str, str]:
    """Split one `scontrol show job -o` line into {Key: value} (values may hold spaces)."""
    fields: dict[str, str] = {}
    matches = list(_regex(_SCONTROL_KEY).finditer(line))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(line)
        key = m.group(1)
        if key not in fields:  # first occurrence wins: a comment cannot shadow a real field
            fields[key] = line[m.end() : end]
    return fields


_ControllerJobFields = namedtuple(
    "ControllerJob",
    (
        "job_id",  # int
        "array_job_id",  # int | None
        "array_task_id",  # int | None
        "het_job_id",  # int | None
        "het_job_offset",  # int | None
        "username",  # str
        "account",  # str
        "partition",  # str
        "job_state",  # str
        "start_time",  # int | None (epoch s)
        "end_time",  # int | None (epoch s)
        "num_cpus",  # int | None
        "tres",  # str
        "admin_comment",  # str
    ),
)


class ControllerJob(_ControllerJobFields):
    """One job record as slurmctld reports it (`scontrol show job -o`)."""

    __slots__ = ()

    @property
    def token(self) -> str | None:
        """Our preallocation UUID from the admin comment, if any."""
        return find_token(self.admin_comment)

    @property
    def gpus_by_type(self) -> dict[str, int]:
        """Allocated GPUs by type (see gpus_by_type())."""
        return gpus_by_type(self.tres)


def _controller_job(fields: Mapping[str, str]) -> ControllerJob | None:
    job_id = _int_or_none(fields.get("JobId"))
    if job_id is None:
        return None
    user = fields.get("UserId", "")
    username = user.split("(", 1)[0]
    return ControllerJob(
        job_id=job_id,
        array_job_id=_int_or_none(fields.get("ArrayJobId")),
        array_task_id=_int_or_none(fields.get("ArrayTaskId")),
        het_job_id=_int_or_none(fields.get("HetJobId")),
        het_job_offset=_int_or_none(fields.get("HetJobOffset")),
        username=username,
        account=fields.get("Account", "").strip(),
        partition=fields.get("Partition", "").strip(),
        job_state=fields.get("JobState", "").strip(),
        start_time=_int_or_none(fields.get("StartTime")),
        end_time=_int_or_none(fields.get("EndTime")),
        num_cpus=_int_or_none(fields.get("NumCPUs")),
        # 22.05 prints the allocation as TRES=; 23.02+ as AllocTRES= (beside ReqTRES=), and
        # 25.11+ keeps TRES= for steps only.
        tres=fields.get("AllocTRES", "").strip() or fields.get("TRES", "").strip(),
        admin_comment=fields.get("AdminComment", "").strip(),
    )


def parse_scontrol_jobs(text: str) -> list[ControllerJob]:
    """Every job record in `scontrol show job -o` output (one line each)."""
    jobs = []
    for line in text.splitlines():
        if not line.strip().startswith("JobId="):
            continue
        job = _controller_job(parse_scontrol_line(line.strip()))
        if job is not None:
            jobs.append(job)
    return jobs


def cluster_name(*, runner: Runner | None = None) -> str:
    """ClusterName of slurm.conf, as `scontrol show config` reports it (SlurmUnavailable when
    it cannot be read: nothing may be charged under a guessed name)."""
    argv = ["scontrol", "show", "config"]
    res = (runner or run_command)(argv, SCONTROL_TIMEOUT_S)
    if res.returncode != 0:
        raise _fail(argv, res)
    for line in res.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "ClusterName" and value.strip():
            return value.strip()
    raise SlurmUnavailable(f"`{' '.join(argv)}` printed no ClusterName.")


def controller_job(job_id: int, *, runner: Runner | None = None) -> ControllerJob | None:
    """The controller's record of one job (raw id), None when slurmctld no longer has it.

    An array master id or a het leader lists several records: only JobId == job_id is kept.
    """
    argv = ["scontrol", "show", "job", "-o", str(int(job_id))]
    res = (runner or run_command)(argv, SCONTROL_TIMEOUT_S)
    if res.returncode != 0:
        if "invalid job id" in res.stderr.lower():
            return None  # purged after MinJobAge (or never existed)
        raise _fail(argv, res)
    for job in parse_scontrol_jobs(res.stdout):
        if job.job_id == job_id:
            return job
    return None


# ---------------------------------------------------------------------------------------
# sacct
# ---------------------------------------------------------------------------------------

# AdminComment last: it is free text and may contain the delimiter.
SACCT_FIELDS = (
    "JobIDRaw",
    "JobID",
    "User",
    "Account",
    "Partition",
    "State",
    "AllocCPUS",
    "ElapsedRaw",
    "Start",
    "End",
    "AllocTRES",
    "AdminComment",
)


_AccountingJobFields = namedtuple(
    "AccountingJob",
    (
        "job_id",  # int
        "job_id_text",  # str: "7_0", "9+1", "12"
        "username",  # str
        "account",  # str
        "partition",  # str
        "state",  # str
        "alloc_cpus",  # int
        "elapsed_s",  # int | None
        "start_time",  # int | None (epoch s)
        "end_time",  # int | None (epoch s)
        "alloc_tres",  # str
        "admin_comment",  # str
        "array_job_id",  # int | None = None
        "array_task_id",  # int | None = None
        "het_job_id",  # int | None = None
        "het_job_offset",  # int | None = None
    ),
    defaults=(None, None, None, None),
)


class AccountingJob(_AccountingJobFields):
    """One job allocation row of sacct (-X), one run of one job."""

    __slots__ = ()

    @property
    def token(self) -> str | None:
        """Our preallocation UUID from the admin comment, if any."""
        return find_token(self.admin_comment)

    @property
    def gpus_by_type(self) -> dict[str, int]:
        """Allocated GPUs by type (see gpus_by_type())."""
        return gpus_by_type(self.alloc_tres)

    @property
    def final(self) -> bool:
        """True when this row describes an ended run (not a stale RUNNING/PENDING row)."""
        return is_final(self.state) and self.end_time is not None


_ARRAY_ID = r"^([0-9]{1,20})_([0-9]{1,20})$"
_HET_ID = r"^([0-9]{1,20})\+([0-9]{1,20})$"


def _sacct_row(parts: Sequence[str]) -> AccountingJob | None:
    job_id = _int_or_none(parts[0])
    if job_id is None:
        return None  # a step row (12.batch) or garbage
    text = parts[1].strip()
    array_job_id = array_task_id = het_job_id = het_job_offset = None
    m = _regex(_ARRAY_ID).match(text)
    if m:
        array_job_id, array_task_id = int(m.group(1)), int(m.group(2))
    m = _regex(_HET_ID).match(text)
    if m:
        het_job_id, het_job_offset = int(m.group(1)), int(m.group(2))
    return AccountingJob(
        job_id=job_id,
        job_id_text=text,
        username=parts[2].strip(),
        account=parts[3].strip(),
        partition=parts[4].strip(),
        state=parts[5].strip(),
        alloc_cpus=_int_or_none(parts[6]) or 0,
        elapsed_s=_int_or_none(parts[7]),
        start_time=_int_or_none(parts[8]),
        end_time=_int_or_none(parts[9]),
        alloc_tres=parts[10].strip(),
        admin_comment=parts[11].strip(),
        array_job_id=array_job_id,
        array_task_id=array_task_id,
        het_job_id=het_job_id,
        het_job_offset=het_job_offset,
    )


def parse_sacct(text: str) -> list[AccountingJob]:
    """Rows of `sacct -P -n -o <SACCT_FIELDS>` (AdminComment last, may contain '|')."""
    n = len(SACCT_FIELDS)
    rows = []
    for line in text.splitlines():
        if not line:
            continue
        parts = line.split("|", n - 1)
        if len(parts) != n:
            continue
        row = _sacct_row(parts)
        if row is not None:
            rows.append(row)
    return rows


def _sacct_format() -> str:
    return ",".join(SACCT_FIELDS)


def sacct_job(job_id: int, *, runner: Runner | None = None) -> list[AccountingJob]:
    """sacct rows (every run, -D) of one raw job id; other rows of an array/het are dropped."""
    argv = [
        "sacct", "-j", str(int(job_id)), "-X", "-D", "-P", "-n", "-o", _sacct_format(),
    ]  # fmt: skip
    res = (runner or run_command)(argv, SACCT_TIMEOUT_S)
    if res.returncode != 0:
        raise _fail(argv, res)
    return [row for row in parse_sacct(res.stdout) if row.job_id == job_id]


def sacct_window(
    start_epoch: int, end_epoch: int | None = None, *, runner: Runner | None = None
) -> list[AccountingJob]:
    """One batched query: every run of every user that ended in [start, end] (all -D runs)."""
    argv = [
        "sacct", "-a", "-X", "-D", "-P", "-n",
        "-S", _sacct_time(start_epoch),
        "-E", _sacct_time(end_epoch) if end_epoch is not None else "now",
        "-s", RECONCILE_STATES,
        "-o", _sacct_format(),
    ]  # fmt: skip
    res = (runner or run_command)(argv, BATCH_SACCT_TIMEOUT_S)
    if res.returncode != 0:
        raise _fail(argv, res)
    return parse_sacct(res.stdout)


def _sacct_time(epoch: int) -> str:
    # sacct takes local time; the subprocess runs with our own TZ, so this round-trips.
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(int(epoch)))


# ---------------------------------------------------------------------------------------
# What the controller still knows: tokens of queued and running jobs
# ---------------------------------------------------------------------------------------


class QueueSnapshot(namedtuple("QueueSnapshot", ("tokens", "job_count"))):
    """Tokens referenced by every job slurmctld currently holds (queued, running, recent).

    tokens: frozenset[str]; job_count: int.
    """

    __slots__ = ()


# One line per job slurmctld holds: id, state, then the free-text admin comment (last, so a
# '|' inside it cannot shift the other fields). ":0" = no padding, "|" = field suffix.
SQUEUE_FORMAT = "JobID:0|,State:0|,admin_comment:0"


def queue_tokens(*, runner: Runner | None = None) -> QueueSnapshot:
    """One squeue over all jobs the controller holds (every state): the tokens they carry.

    Any UUID anywhere in a job's line keeps its preallocation (erring on the side of
    keeping). Empty output with exit 0 means "no jobs"; any failure raises SlurmUnavailable.
    """
    argv = ["squeue", "-h", "-a", "-t", "all", "-O", SQUEUE_FORMAT]
    res = (runner or run_command)(argv, SQUEUE_TIMEOUT_S)
    if res.returncode != 0:
        raise _fail(argv, res)
    count = 0
    found: set[str] = set()
    for line in res.stdout.splitlines():
        if not line.strip():
            continue
        head = line.split("|", 1)[0].strip()
        if not head[:1].isdigit():
            raise SlurmUnavailable(f"`{' '.join(argv)}` printed an unexpected line: {line[:200]!r}")
        count += 1
        found |= tokens_in(line)
    return QueueSnapshot(frozenset(found), count)


def tokens_of(rows: Iterable[AccountingJob]) -> set[str]:
    """Tokens of sacct rows."""
    out = set()
    for row in rows:
        out |= tokens_in(row.admin_comment)
    return out



# ---------------------------------------------------------------------------------------
# Who is who: slurm.conf and the accounting database (roles, privacy; the service)
# ---------------------------------------------------------------------------------------

SACCTMGR_TIMEOUT_S = 10.0


def slurm_config(*, runner: Runner | None = None) -> dict[str, str]:
    """`scontrol show config` as {key: value} (e.g. PrivateData, SlurmUser)."""
    argv = ["scontrol", "show", "config"]
    res = (runner or run_command)(argv, SCONTROL_TIMEOUT_S)
    if res.returncode != 0:
        raise _fail(argv, res)
    config: dict[str, str] = {}
    for line in res.stdout.splitlines():
        key, sep, value = line.partition("=")
        key = key.strip()
        if sep and key and " " not in key:
            config.setdefault(key, value.strip())
    if "SlurmUser" not in config:
        raise SlurmUnavailable(f"`{' '.join(argv)}` printed no SlurmUser line.")
    return config


def _sacctmgr_rows(args: Sequence[str], width: int, runner: Runner | None) -> list[list[str]]:
    argv = ["sacctmgr", "-n", "-P", *args]
    res = (runner or run_command)(argv, SACCTMGR_TIMEOUT_S)
    if res.returncode != 0:
        raise _fail(argv, res)
    rows = []
    for line in res.stdout.splitlines():
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) != width:
            raise SlurmUnavailable(
                f"`{' '.join(argv)}` printed an unexpected line: {line[:200]!r}"
            )
        rows.append([p.strip() for p in parts])
    return rows


def admin_levels(*, runner: Runner | None = None) -> dict[str, str]:
    """user -> AdminLevel (Administrator, Operator or None) from the accounting database."""
    rows = _sacctmgr_rows(["show", "user", "format=User,AdminLevel"], 2, runner)
    return {user: level for user, level in rows if user}


def account_coordinators(*, runner: Runner | None = None) -> dict[str, frozenset[str]]:
    """account -> the users sacctmgr lists as its coordinators."""
    rows = _sacctmgr_rows(["show", "account", "withcoord", "format=Account,Coordinators"], 2,
                          runner)
    out: dict[str, frozenset[str]] = {}
    for account, coords in rows:
        names = frozenset(c.strip() for c in coords.split(",") if c.strip())
        if account and names:
            out[account] = out.get(account, frozenset()) | names
    return out


def user_accounts(*, runner: Runner | None = None) -> dict[str, frozenset[str]]:
    """user -> the accounts the user has an association with."""
    rows = _sacctmgr_rows(["show", "association", "format=User,Account"], 2, runner)
    out: dict[str, set[str]] = {}
    for user, account in rows:
        if user and account:
            out.setdefault(user, set()).add(account)
    return {user: frozenset(accounts) for user, accounts in out.items()}
