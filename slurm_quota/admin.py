"""Admin operations: quotas, adjustments, default quotas, GPU factors, plugin settings.

Owns what the admin commands do to the ledger: apply the seed system's semantics (a quota
set on a new row gives the other resource the configured default; adjustments clamp at 0),
and journal every change in the same transaction as the change. Names and values are
checked by slurm_quota.validate. All SQL is in db.py; nothing here prints or exits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slurm_quota import db, ledger
from slurm_quota.access import current_actor
from slurm_quota.errors import InvalidInput, NotFound, SchemaError
from slurm_quota.journal import Journal
from slurm_quota.validate import (
    KIND_LABEL,
    check_kind,
    check_quota,
    check_resource,
    parse_gpu_type,
    parse_name,
    parse_reason,
    parse_setting,
)

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




# ---------------------------------------------------------------------------------------
# Defaults
# ---------------------------------------------------------------------------------------


def default_key(kind: str, resource: str) -> str:
    """Settings key of a default quota: default_{user,account}_quota_{cpu,gpu}_minutes."""
    check_kind(kind)
    check_resource(resource)
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
    user_cpu: int | str | None = None,
    user_gpu: int | str | None = None,
    account_cpu: int | str | None = None,
    account_gpu: int | str | None = None,
    reason: str | None = None,
    actor: str | None = None,
) -> list[DefaultChange]:
    """Set the given default quotas (at least one; minutes as typed or int); existing rows
    are not touched."""
    wanted = {
        default_key("user", ledger.CPU): user_cpu,
        default_key("user", ledger.GPU): user_gpu,
        default_key("account", ledger.CPU): account_cpu,
        default_key("account", ledger.GPU): account_gpu,
    }
    given = {k: check_quota(v) for k, v in wanted.items() if v is not None}
    if not given:
        raise InvalidInput(
            "Give at least one of --user-cpu, --user-gpu, --account-cpu, --account-gpu."
        )
    reason = parse_reason(reason)
    journal = Journal(conn, actor or current_actor(), reason)
    changes: list[DefaultChange] = []
    with db.write_transaction(conn):
        current = get_default_quotas(conn).as_settings()
        for key, new in given.items():
            old = current[key]
            db.set_setting(conn, key, str(new))
            journal.record(
                ACTION_SET_DEFAULT, "setting", key, field="value", old=str(old), new=str(new),
            )
            changes.append(DefaultChange(key=key, old_minutes=old, new_minutes=new))
    return changes


# ---------------------------------------------------------------------------------------
# Plugin settings: the keys job_submit.lua reads besides the default quotas
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SettingChange:
    """One plugin setting changed (None = not set)."""

    key: str
    old: str | None
    new: str | None


def list_settings(conn: Any) -> dict[str, str]:
    """Every stored setting (default quotas and plugin settings), by key."""
    return {str(row[0]): str(row[1]) for row in db.list_settings(conn)}


def set_setting(
    conn: Any, key: str, value: str | None, *, reason: str | None = None,
    actor: str | None = None,
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
        Journal(conn, actor or current_actor(), reason).record(
            ACTION_SET_SETTING, "setting", key, field="value", old=old, new=new,
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
    check_kind(kind)
    row = db.get_owner(conn, kind, parse_name(kind, name))
    return None if row is None else _owner_from_row(kind, row)


def set_quota(
    conn: Any,
    kind: str,
    name: str,
    resource: str,
    minutes: int | str,
    *,
    reason: str | None = None,
    actor: str | None = None,
) -> QuotaChange:
    """Set the CPU or GPU quota of a user/account (minutes as typed or int), creating the row
    (with defaults) if needed."""
    check_kind(kind)
    check_resource(resource)
    name = parse_name(kind, name)
    minutes = check_quota(minutes)
    reason = parse_reason(reason)
    journal = Journal(conn, actor or current_actor(), reason)
    other = ledger.GPU if resource == ledger.CPU else ledger.CPU
    with db.write_transaction(conn):
        row = db.get_owner(conn, kind, name)
        if row is None:
            other_minutes = _read_default(conn, kind, other)
            quotas = {resource: minutes, other: other_minutes}
            db.insert_owner(conn, kind, name, quotas[ledger.CPU], quotas[ledger.GPU])
            journal.record(
                ACTION_CREATE, kind, name, field=db.quota_column(other), new=str(other_minutes),
            )
            old: int | None = None
            created = True
        else:
            old = int(row[db.quota_column(resource)])
            other_minutes = None
            created = False
            db.set_owner_quota(conn, kind, name, resource, minutes)
        journal.record(
            ACTION_SET_QUOTA, kind, name, field=db.quota_column(resource),
            old=None if old is None else str(old), new=str(minutes),
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
    actor: str | None = None,
) -> Adjustment:
    """Add a signed delta to a consumed total, clamped at 0; the row must exist."""
    check_kind(kind)
    check_resource(resource)
    name = parse_name(kind, name)
    if isinstance(delta_minutes, bool) or not isinstance(delta_minutes, int):
        raise InvalidInput(f"Adjustment {delta_minutes!r} is not a whole number of minutes.")
    if abs(delta_minutes) > ledger.MAX_MINUTES:
        raise InvalidInput(f"Adjustment {delta_minutes} exceeds {ledger.MAX_MINUTES} minutes.")
    reason = parse_reason(reason)
    journal = Journal(conn, actor or current_actor(), reason)
    with db.write_transaction(conn):
        row = db.get_owner(conn, kind, name)
        if row is None:
            raise NotFound(
                f"{KIND_LABEL[kind]} {name} is not in the ledger; nothing was adjusted "
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
        journal.record(
            ACTION_ADJUST, kind, name, field=db.consumed_column(resource), old=str(old),
            new=str(result.new),
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
    conn: Any, gpu_type: str, factor: float | str, *, reason: str | None = None,
    actor: str | None = None,
) -> FactorChange:
    """Set the factor of a GPU type (`default` = the fallback for untyped/unknown GPUs); the
    factor as typed or a float."""
    gpu_type = parse_gpu_type(gpu_type)
    factor = ledger.parse_factor(repr(factor) if isinstance(factor, float) else str(factor))
    reason = parse_reason(reason)
    journal = Journal(conn, actor or current_actor(), reason)
    with db.write_transaction(conn):
        old = db.get_gpu_factor(conn, gpu_type)
        db.set_gpu_factor(conn, gpu_type, factor)
        journal.record(
            ACTION_SET_GPU_FACTOR, "gpu_factor", gpu_type, field="factor",
            old=None if old is None else repr(old), new=repr(factor),
        )
    return FactorChange(gpu_type=gpu_type, old_factor=old, new_factor=factor)
