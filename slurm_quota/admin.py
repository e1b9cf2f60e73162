"""Admin operations: quotas, adjustments, default quotas, GPU factors and the history view.

Owns what the admin commands do to the ledger: validate names and values (numbers through
ledger.py), apply the seed system's semantics (a quota set on a new row gives the other
resource the configured default; adjustments clamp at 0), and journal every change in the
same transaction as the change. All SQL is in db.py; nothing here prints or exits.

Names: user and account names are kept exactly as typed (Slurm compares them
case-sensitively with what the plugin and charge see: `job_desc.user_name`, the job's
account). Allowed: 1 to 128 characters among letters, digits and `_ . @ $ -`, not starting
with `.`, `-`, `@` or `$` (POSIX portable user names plus `user@domain` from sssd/LDAP and
`$` of machine accounts). Whitespace, control characters and anything else are refused.
"""

from __future__ import annotations

import os
import pwd
import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Union

from slurm_quota import db, ledger
from slurm_quota.errors import InvalidInput, NotFound, SchemaError

KINDS = ("user", "account")
NAME_MAX_LEN = 128
GPU_TYPE_MAX_LEN = 64
REASON_MAX_LEN = 500
HISTORY_DEFAULT_LIMIT = 50
HISTORY_MAX_LIMIT = 100_000

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@$-]*")
_GPU_TYPE_RE = re.compile(r"[A-Za-z0-9_.-]+")
_KIND_LABEL = {"user": "User", "account": "Account"}

# Journal actions.
ACTION_CREATE = "create"
ACTION_SET_QUOTA = "set-quota"
ACTION_ADJUST = "adjust"
ACTION_SET_DEFAULT = "set-default-quota"
ACTION_SET_GPU_FACTOR = "set-gpu-factor"
ACTION_SET_SETTING = "set-setting"


# ---------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Owner:
    """A users or accounts row."""

    kind: str
    name: str
    quota_cpu_minutes: int
    quota_gpu_minutes: int
    consumed_cpu_minutes: int
    consumed_gpu_minutes: int
    last_updated: str | None

    def quota(self, resource: str) -> int:
        """The quota of one resource."""
        return self.quota_cpu_minutes if resource == ledger.CPU else self.quota_gpu_minutes

    def consumed(self, resource: str) -> int:
        """The consumed total of one resource."""
        return self.consumed_cpu_minutes if resource == ledger.CPU else self.consumed_gpu_minutes


@dataclass(frozen=True)
class QuotaChange:
    """Result of setting a quota; `created` when the row did not exist before."""

    kind: str
    name: str
    resource: str
    old_minutes: int | None
    new_minutes: int
    created: bool
    # When created: the default the other resource received.
    other_quota_minutes: int | None


@dataclass(frozen=True)
class Adjustment:
    """Result of adjusting a consumed total."""

    kind: str
    name: str
    resource: str
    delta_minutes: int
    old_minutes: int
    new_minutes: int
    clamped: bool


@dataclass(frozen=True)
class DefaultQuotas:
    """The quotas a newly created user/account row receives (-1 = unlimited)."""

    user_cpu_minutes: int
    user_gpu_minutes: int
    account_cpu_minutes: int
    account_gpu_minutes: int

    def as_settings(self) -> dict[str, int]:
        """The four settings keys and their values, in a fixed order."""
        return {
            default_key("user", ledger.CPU): self.user_cpu_minutes,
            default_key("user", ledger.GPU): self.user_gpu_minutes,
            default_key("account", ledger.CPU): self.account_cpu_minutes,
            default_key("account", ledger.GPU): self.account_gpu_minutes,
        }


@dataclass(frozen=True)
class DefaultChange:
    """One default quota changed by set_default_quotas."""

    key: str
    old_minutes: int
    new_minutes: int


@dataclass(frozen=True)
class GpuFactor:
    """A GPU factor; `configured` is False for the built-in default (no `default` row)."""

    gpu_type: str
    factor: float
    configured: bool


@dataclass(frozen=True)
class FactorChange:
    """Result of set_gpu_factor; old_factor None when the type had no row."""

    gpu_type: str
    old_factor: float | None
    new_factor: float


@dataclass(frozen=True)
class JournalEntry:
    """One journal row."""

    id: int
    time: datetime | None
    actor: str
    action: str
    target_kind: str
    target: str
    field: str | None
    old_value: str | None
    new_value: str | None
    reason: str | None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (time in UTC, ISO 8601)."""
        return {
            "kind": "journal",
            "id": self.id,
            "time": _iso(self.time),
            "actor": self.actor,
            "action": self.action,
            "target_kind": self.target_kind,
            "target": self.target,
            "field": self.field,
            "old": self.old_value,
            "new": self.new_value,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class ChargeEntry:
    """One charges row: a charged run of a job and the inputs of its charge."""

    id: int
    time: datetime | None
    job_id: int
    array_job_id: int | None
    array_task_id: int | None
    het_job_id: int | None
    het_job_offset: int | None
    username: str
    account: str
    partition: str | None
    job_state: str | None
    start_time: int
    end_time: int
    elapsed_s: int
    cpus: int
    gpus: str
    gpu_factors: str
    cpu_minutes: int
    gpu_minutes: int
    source: str
    cpu_s: int = 0  # the run's exact amounts (migration 0005); the minutes follow the one rule
    gpu_ms: int = 0

    @property
    def display_job_id(self) -> str:
        """The job id as Slurm shows it: 123_4 for an array task, 123+1 for a het component."""
        if self.array_job_id is not None and self.array_task_id is not None:
            return f"{self.array_job_id}_{self.array_task_id}"
        if self.het_job_id is not None and self.het_job_offset is not None:
            return f"{self.het_job_id}+{self.het_job_offset}"
        return str(self.job_id)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (time in UTC, ISO 8601; start/end as epoch seconds as stored)."""
        return {
            "kind": "charge",
            "id": self.id,
            "time": _iso(self.time),
            "job_id": self.job_id,
            "display_job_id": self.display_job_id,
            "array_job_id": self.array_job_id,
            "array_task_id": self.array_task_id,
            "het_job_id": self.het_job_id,
            "het_job_offset": self.het_job_offset,
            "username": self.username,
            "account": self.account,
            "partition": self.partition,
            "state": self.job_state,
            "start_time": self.start_time,
            "end_time": self.end_time,
            "elapsed_s": self.elapsed_s,
            "cpus": self.cpus,
            "gpus": self.gpus,
            "gpu_factors": self.gpu_factors,
            "cpu_minutes": self.cpu_minutes,
            "gpu_minutes": self.gpu_minutes,
            "cpu_s": self.cpu_s,
            "gpu_ms": self.gpu_ms,
            "source": self.source,
        }


HistoryEntry = Union[JournalEntry, ChargeEntry]


# ---------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------


def _shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "…")


def parse_name(kind: str, text: str | None) -> str:
    """A user or account name, kept exactly as given; refuses what Slurm would never send."""
    label = f"{_KIND_LABEL[kind]} name"
    if text is None or text == "":
        raise InvalidInput(f"{label} is empty.")
    if any(unicodedata.category(ch).startswith("C") for ch in text):
        raise InvalidInput(f"{label} {_shown(text)} contains a control character.")
    if any(ch.isspace() for ch in text):
        raise InvalidInput(f"{label} {_shown(text)} contains whitespace.")
    if len(text) > NAME_MAX_LEN:
        raise InvalidInput(f"{label} {_shown(text)} is longer than {NAME_MAX_LEN} characters.")
    if not _NAME_RE.fullmatch(text):
        raise InvalidInput(
            f"{label} {_shown(text)} is not valid: use letters, digits and _ . @ $ - "
            f"(not starting with . - @ $)."
        )
    return text


def parse_gpu_type(text: str | None) -> str:
    """A GPU type as in Slurm's gres (`h100`, `a100_80g`), or `default` (the fallback)."""
    if text is None or text == "":
        raise InvalidInput("GPU type is empty.")
    if len(text) > GPU_TYPE_MAX_LEN or not _GPU_TYPE_RE.fullmatch(text):
        raise InvalidInput(
            f"GPU type {_shown(text)} is not valid: use 1 to {GPU_TYPE_MAX_LEN} letters, "
            f"digits and _ . - (as in the node's Gres=gpu:TYPE:N)."
        )
    return text


def parse_reason(text: str | None) -> str | None:
    """The optional --reason: one line of printable text, or None."""
    if text is None:
        return None
    value = text.strip()
    if not value:
        raise InvalidInput("--reason is empty; give a short explanation or leave it out.")
    if any(unicodedata.category(ch).startswith("C") for ch in value):
        raise InvalidInput("--reason contains a control character (e.g. a newline).")
    if len(value) > REASON_MAX_LEN:
        raise InvalidInput(f"--reason is longer than {REASON_MAX_LEN} characters.")
    return value


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")


def _check_resource(resource: str) -> None:
    if resource not in ledger.RESOURCES:
        raise ValueError(f"unknown resource {resource!r}")


def _check_quota(minutes: int) -> int:
    if isinstance(minutes, bool) or not isinstance(minutes, int):
        raise InvalidInput(f"Quota {minutes!r} is not a whole number of minutes.")
    return ledger.parse_quota(str(minutes))


def current_actor() -> str:
    """Who is acting: the real uid's user name, plus the sudo user when SUDO_USER is set."""
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = f"uid {uid}"
    sudo_user = "".join(
        ch for ch in os.environ.get("SUDO_USER", "") if not unicodedata.category(ch)[0] == "C"
    )[:NAME_MAX_LEN]
    if sudo_user and sudo_user != name:
        return f"{name} (sudo {sudo_user})"
    return name


# ---------------------------------------------------------------------------------------
# Defaults
# ---------------------------------------------------------------------------------------


def default_key(kind: str, resource: str) -> str:
    """Settings key of a default quota: default_{user,account}_quota_{cpu,gpu}_minutes."""
    _check_kind(kind)
    _check_resource(resource)
    return f"default_{kind}_quota_{resource}_minutes"


def _read_default(conn: Any, kind: str, resource: str) -> int:
    key = default_key(kind, resource)
    value = db.get_setting(conn, key)
    if value is None:
        return ledger.UNLIMITED
    try:
        return ledger.parse_quota(value)
    except InvalidInput as err:
        raise SchemaError(
            f"The setting {key} holds {value!r}, not a quota in minutes; "
            f"fix it with `slurm-quota set-default-quotas`."
        ) from err


def get_default_quotas(conn: Any) -> DefaultQuotas:
    """The four default quotas (-1 for a key that is absent)."""
    return DefaultQuotas(
        user_cpu_minutes=_read_default(conn, "user", ledger.CPU),
        user_gpu_minutes=_read_default(conn, "user", ledger.GPU),
        account_cpu_minutes=_read_default(conn, "account", ledger.CPU),
        account_gpu_minutes=_read_default(conn, "account", ledger.GPU),
    )


def set_default_quotas(
    conn: Any,
    *,
    user_cpu: int | None = None,
    user_gpu: int | None = None,
    account_cpu: int | None = None,
    account_gpu: int | None = None,
    reason: str | None = None,
) -> list[DefaultChange]:
    """Set the given default quotas (at least one); existing rows are not touched."""
    wanted = {
        default_key("user", ledger.CPU): user_cpu,
        default_key("user", ledger.GPU): user_gpu,
        default_key("account", ledger.CPU): account_cpu,
        default_key("account", ledger.GPU): account_gpu,
    }
    given = {k: _check_quota(v) for k, v in wanted.items() if v is not None}
    if not given:
        raise InvalidInput(
            "Give at least one of --user-cpu, --user-gpu, --account-cpu, --account-gpu."
        )
    reason = parse_reason(reason)
    actor = current_actor()
    changes: list[DefaultChange] = []
    with db.write_transaction(conn):
        current = get_default_quotas(conn).as_settings()
        for key, new in given.items():
            old = current[key]
            db.set_setting(conn, key, str(new))
            db.insert_journal(
                conn,
                actor=actor,
                action=ACTION_SET_DEFAULT,
                target_kind="setting",
                target=key,
                field="value",
                old_value=str(old),
                new_value=str(new),
                reason=reason,
            )
            changes.append(DefaultChange(key=key, old_minutes=old, new_minutes=new))
    return changes


# ---------------------------------------------------------------------------------------
# Plugin settings: the keys job_submit.lua reads besides the default quotas
# ---------------------------------------------------------------------------------------

SETTING_DEFAULT_TIME = "default_time_minutes"
SETTING_NODE_GPUS = "node_gpus"
_NODE_GPUS_KEY_RE = re.compile(r"node_gpus(?:\.([A-Za-z0-9_.-]{1,64}))?")
_NODE_GPU_ENTRY_RE = re.compile(r"gpu(?::([A-Za-z0-9_.-]{1,64}))?:(\d{1,4})")


@dataclass(frozen=True)
class SettingChange:
    """One plugin setting changed (None = not set)."""

    key: str
    old: str | None
    new: str | None


def parse_setting(key: str, value: str | None) -> tuple[str, str | None]:
    """Validate a plugin setting; return (key, normalised value), value None to unset.

    default_time_minutes: the time limit of a job that has none and whose partition has
    neither DefaultTime nor MaxTime (whole minutes, 1 or more). node_gpus and
    node_gpus.<partition>: the GPUs of one node (`gpu:h100:2,gpu:a100:2`), which an
    --exclusive job takes; slurmctld does not tell the plugin.
    """
    if key.startswith("default_") and key.endswith("_minutes") and key != SETTING_DEFAULT_TIME:
        raise InvalidInput(
            f"{_shown(key)} is a default quota: use `slurm-quota set-default-quotas`."
        )
    if key == SETTING_DEFAULT_TIME:
        if value is None:
            return key, None
        text = value.strip()
        if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 10**7:
            raise InvalidInput(
                f"{key} must be a whole number of minutes from 1 to 10000000, not {_shown(value)}."
            )
        return key, str(int(text))
    if _NODE_GPUS_KEY_RE.fullmatch(key):
        if value is None:
            return key, None
        entries = [e.strip() for e in value.split(",")]
        for entry in entries:
            m = _NODE_GPU_ENTRY_RE.fullmatch(entry)
            if not m or int(m.group(2)) < 1:
                raise InvalidInput(
                    f"{key}: {_shown(entry)} is not a GPU entry like gpu:h100:2 or gpu:4 "
                    f"(comma-separated, as in the node's Gres=)."
                )
        return key, ",".join(entries)
    raise InvalidInput(
        f"Unknown setting {_shown(key)}: the settings are {SETTING_DEFAULT_TIME}, "
        f"{SETTING_NODE_GPUS} and {SETTING_NODE_GPUS}.<partition>."
    )


def list_settings(conn: Any) -> dict[str, str]:
    """Every stored setting (default quotas and plugin settings), by key."""
    return {str(row[0]): str(row[1]) for row in db.list_settings(conn)}


def set_setting(
    conn: Any, key: str, value: str | None, *, reason: str | None = None
) -> SettingChange:
    """Set (or, with value None, unset) one plugin setting, journaled."""
    key, new = parse_setting(key, value)
    reason = parse_reason(reason)
    with db.write_transaction(conn):
        old = db.get_setting(conn, key)
        if new is None:
            db.delete_setting(conn, key)
        else:
            db.set_setting(conn, key, new)
        db.insert_journal(
            conn,
            actor=current_actor(),
            action=ACTION_SET_SETTING,
            target_kind="setting",
            target=key,
            field="value",
            old_value=old,
            new_value=new,
            reason=reason,
        )
    return SettingChange(key=key, old=old, new=new)


# ---------------------------------------------------------------------------------------
# Quotas and adjustments
# ---------------------------------------------------------------------------------------


def _owner_from_row(kind: str, row: Any) -> Owner:
    return Owner(
        kind=kind,
        name=str(row["name"]),
        quota_cpu_minutes=int(row["quota_cpu_minutes"]),
        quota_gpu_minutes=int(row["quota_gpu_minutes"]),
        consumed_cpu_minutes=int(row["total_consumed_cpu_minutes"] or 0),
        consumed_gpu_minutes=int(row["total_consumed_gpu_minutes"] or 0),
        last_updated=None if row["last_updated"] is None else str(row["last_updated"]),
    )


def get_owner(conn: Any, kind: str, name: str) -> Owner | None:
    """The user or account row, or None."""
    _check_kind(kind)
    row = db.get_owner(conn, kind, parse_name(kind, name))
    return None if row is None else _owner_from_row(kind, row)


def set_quota(
    conn: Any,
    kind: str,
    name: str,
    resource: str,
    minutes: int,
    *,
    reason: str | None = None,
) -> QuotaChange:
    """Set the CPU or GPU quota of a user/account, creating the row (with defaults) if needed."""
    _check_kind(kind)
    _check_resource(resource)
    name = parse_name(kind, name)
    minutes = _check_quota(minutes)
    reason = parse_reason(reason)
    actor = current_actor()
    other = ledger.GPU if resource == ledger.CPU else ledger.CPU
    with db.write_transaction(conn):
        row = db.get_owner(conn, kind, name)
        if row is None:
            other_minutes = _read_default(conn, kind, other)
            quotas = {resource: minutes, other: other_minutes}
            db.insert_owner(conn, kind, name, quotas[ledger.CPU], quotas[ledger.GPU])
            db.insert_journal(
                conn,
                actor=actor,
                action=ACTION_CREATE,
                target_kind=kind,
                target=name,
                field=db.quota_column(other),
                old_value=None,
                new_value=str(other_minutes),
                reason=reason,
            )
            old: int | None = None
            created = True
        else:
            old = int(row[db.quota_column(resource)])
            other_minutes = None
            created = False
            db.set_owner_quota(conn, kind, name, resource, minutes)
        db.insert_journal(
            conn,
            actor=actor,
            action=ACTION_SET_QUOTA,
            target_kind=kind,
            target=name,
            field=db.quota_column(resource),
            old_value=None if old is None else str(old),
            new_value=str(minutes),
            reason=reason,
        )
    return QuotaChange(
        kind=kind,
        name=name,
        resource=resource,
        old_minutes=old,
        new_minutes=minutes,
        created=created,
        other_quota_minutes=other_minutes,
    )


def adjust(
    conn: Any,
    kind: str,
    name: str,
    resource: str,
    delta_minutes: int,
    *,
    reason: str | None = None,
) -> Adjustment:
    """Add a signed delta to a consumed total, clamped at 0; the row must exist."""
    _check_kind(kind)
    _check_resource(resource)
    name = parse_name(kind, name)
    if isinstance(delta_minutes, bool) or not isinstance(delta_minutes, int):
        raise InvalidInput(f"Adjustment {delta_minutes!r} is not a whole number of minutes.")
    if abs(delta_minutes) > ledger.MAX_MINUTES:
        raise InvalidInput(f"Adjustment {delta_minutes} exceeds {ledger.MAX_MINUTES} minutes.")
    reason = parse_reason(reason)
    actor = current_actor()
    with db.write_transaction(conn):
        row = db.get_owner(conn, kind, name)
        if row is None:
            raise NotFound(
                f"{_KIND_LABEL[kind]} {name} is not in the ledger; nothing was adjusted "
                f"(check the name, or set a quota first with `slurm-quota {kind}-quota`)."
            )
        # The delta applies to the exact total; minutes before and after follow the one rule.
        per_minute = ledger.EXACT_PER_MINUTE[resource]
        exact = db.owner_consumed_exact(conn, kind, name)
        assert exact is not None  # the row was just read in this transaction
        cpu_s, gpu_ms = exact
        exact_old = cpu_s if resource == ledger.CPU else gpu_ms
        moved = ledger.apply_adjustment(exact_old, delta_minutes * per_minute)
        old = ledger.minutes_from_exact(moved.old, per_minute)
        result = ledger.Adjusted(
            old=old, new=ledger.minutes_from_exact(moved.new, per_minute), clamped=moved.clamped
        )
        change = moved.new - moved.old
        if resource == ledger.CPU:
            db.set_consumed(conn, kind, name, moved.new, gpu_ms)
            db.insert_consumption_adjustment(conn, kind, name, change, 0, ACTION_ADJUST)
        else:
            db.set_consumed(conn, kind, name, cpu_s, moved.new)
            db.insert_consumption_adjustment(conn, kind, name, 0, change, ACTION_ADJUST)
        db.insert_journal(
            conn,
            actor=actor,
            action=ACTION_ADJUST,
            target_kind=kind,
            target=name,
            field=db.consumed_column(resource),
            old_value=str(old),
            new_value=str(result.new),
            reason=reason,
        )
    return Adjustment(
        kind=kind,
        name=name,
        resource=resource,
        delta_minutes=delta_minutes,
        old_minutes=old,
        new_minutes=result.new,
        clamped=result.clamped,
    )


# ---------------------------------------------------------------------------------------
# GPU factors
# ---------------------------------------------------------------------------------------


def gpu_factors(conn: Any) -> list[GpuFactor]:
    """Every GPU factor: `default` first (built-in 1.0 when not configured), then by type."""
    stored = {str(r["gpu_type"]): float(r["factor"]) for r in db.list_gpu_factors(conn)}
    result: list[GpuFactor] = []
    if ledger.DEFAULT_GPU_TYPE in stored:
        result.append(GpuFactor(ledger.DEFAULT_GPU_TYPE, stored[ledger.DEFAULT_GPU_TYPE], True))
    else:
        result.append(GpuFactor(ledger.DEFAULT_GPU_TYPE, ledger.DEFAULT_GPU_FACTOR, False))
    for gpu_type in sorted(t for t in stored if t != ledger.DEFAULT_GPU_TYPE):
        result.append(GpuFactor(gpu_type, stored[gpu_type], True))
    return result


def set_gpu_factor(
    conn: Any, gpu_type: str, factor: float, *, reason: str | None = None
) -> FactorChange:
    """Set the factor of a GPU type (`default` = the fallback for untyped/unknown GPUs)."""
    gpu_type = parse_gpu_type(gpu_type)
    factor = ledger.parse_factor(repr(factor) if isinstance(factor, float) else str(factor))
    reason = parse_reason(reason)
    actor = current_actor()
    with db.write_transaction(conn):
        old = db.get_gpu_factor(conn, gpu_type)
        db.set_gpu_factor(conn, gpu_type, factor)
        db.insert_journal(
            conn,
            actor=actor,
            action=ACTION_SET_GPU_FACTOR,
            target_kind="gpu_factor",
            target=gpu_type,
            field="factor",
            old_value=None if old is None else repr(old),
            new_value=repr(factor),
            reason=reason,
        )
    return FactorChange(gpu_type=gpu_type, old_factor=old, new_factor=factor)


# ---------------------------------------------------------------------------------------
# History: journal + charges
# ---------------------------------------------------------------------------------------


def _parse_db_time(value: Any) -> datetime | None:
    """A stored timestamp (CURRENT_TIMESTAMP text, ISO 8601 or epoch seconds) in UTC."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, timezone.utc)
    text = str(value).strip()
    if text.isdigit():
        return datetime.fromtimestamp(int(text), timezone.utc)
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)  # CURRENT_TIMESTAMP is UTC
    return parsed.astimezone(timezone.utc)


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _journal_entry(row: Any) -> JournalEntry:
    return JournalEntry(
        id=int(row["id"]),
        time=_parse_db_time(row["at"]),
        actor=str(row["actor"]),
        action=str(row["action"]),
        target_kind=str(row["target_kind"]),
        target=str(row["target"]),
        field=row["field"],
        old_value=row["old_value"],
        new_value=row["new_value"],
        reason=row["reason"],
    )


def _charge_entry(row: Any) -> ChargeEntry:
    moment = _parse_db_time(row["charged_at"])
    if moment is None:
        moment = _parse_db_time(row["end_time"])
    return ChargeEntry(
        id=int(row["id"]),
        time=moment,
        job_id=int(row["job_id"]),
        array_job_id=_opt_int(row["array_job_id"]),
        array_task_id=_opt_int(row["array_task_id"]),
        het_job_id=_opt_int(row["het_job_id"]),
        het_job_offset=_opt_int(row["het_job_offset"]),
        username=str(row["username"]),
        account=str(row["account"]),
        partition=row["partition"],
        job_state=row["job_state"],
        start_time=int(row["start_time"]),
        end_time=int(row["end_time"]),
        elapsed_s=int(row["elapsed_s"]),
        cpus=int(row["cpus"]),
        gpus=str(row["gpus"] or ""),
        gpu_factors=str(row["gpu_factors"] or ""),
        cpu_minutes=int(row["cpu_minutes"]),
        gpu_minutes=int(row["gpu_minutes"]),
        source=str(row["source"]),
        cpu_s=int(row["cpu_s"]),
        gpu_ms=int(row["gpu_ms"]),
    )


def parse_job_id(text: str | int | None) -> int | None:
    """A Slurm job id (a positive integer; an array or het job id matches its elements)."""
    if text is None:
        return None
    value = str(text).strip()
    if not value.isdigit() or not 0 < int(value) < 2**32:
        raise InvalidInput(
            f"Job id {text!r} is not a Slurm job id (a positive whole number, e.g. 12345)."
        )
    return int(value)


_EPOCH = datetime.fromtimestamp(0, timezone.utc)


def history(
    conn: Any,
    *,
    user: str | None = None,
    account: str | None = None,
    job_id: int | None = None,
    limit: int = HISTORY_DEFAULT_LIMIT,
) -> list[HistoryEntry]:
    """Journal and charge rows, newest first, at most `limit` in total.

    --user/--account select that owner's journal rows and charges; --job selects the charges
    of that job (and of its array/het elements) only, since journal rows name no job.
    """
    if user is not None and account is not None:
        raise InvalidInput("Give --user or --account, not both.")
    if user is not None:
        user = parse_name("user", user)
    if account is not None:
        account = parse_name("account", account)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= HISTORY_MAX_LIMIT:
        raise InvalidInput(f"--limit must be between 1 and {HISTORY_MAX_LIMIT}.")
    entries: list[HistoryEntry] = []
    if job_id is None:
        if user is not None:
            rows = db.read_journal(conn, target_kind="user", target=user, limit=limit)
        elif account is not None:
            rows = db.read_journal(conn, target_kind="account", target=account, limit=limit)
        else:
            rows = db.read_journal(conn, limit=limit)
        entries.extend(_journal_entry(r) for r in rows)
    charge_rows = db.read_charges(conn, username=user, account=account, job_id=job_id, limit=limit)
    entries.extend(_charge_entry(r) for r in charge_rows)
    # Newest first; at equal times charges after journal rows is arbitrary but stable.
    entries.sort(key=lambda e: (e.time or _EPOCH, e.id), reverse=True)
    return entries[:limit]
