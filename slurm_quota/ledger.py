"""Ledger rules: minutes, rounding, GPU factors, availability and admin value parsing.

Owns the arithmetic every part must agree on (DESIGN.md §1, §3, §4). Pure functions only:
no I/O, no SQL, no Slurm. The Lua plugin implements the submit-side counterparts of these
rules; tests check both against the same cases.
"""

from __future__ import annotations

import math
import re
from collections import namedtuple
from collections.abc import Mapping
from functools import cache

from slurm_quota.errors import InvalidInput
from slurm_quota.numbers import MAX_DIGITS, int_or_none, shown

# Imported by every `slurm-quota charge` (slurmctld runs one after another): decimal and
# fractions are imported where they are needed (a CPU-only charge needs neither), and the one
# record is a namedtuple, not a dataclass (see slurm_quota.charge).
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from fractions import Fraction

UNLIMITED = -1
DEFAULT_GPU_TYPE = "default"
DEFAULT_GPU_FACTOR = 1.0
# Sanity bound for quotas and adjustments: far above any real budget (about 19 million
# CPU-years), far below SQLite's 64-bit integer limit, and exactly representable in a double
# so the Lua plugin (doubles on 5.1/5.2/LuaJIT) computes with it exactly.
MAX_MINUTES = 10**13

CPU = "cpu"
GPU = "gpu"
RESOURCES = (CPU, GPU)


def _exact_factor(factor: float) -> Fraction:
    # The factor as the decimal an admin typed (0.1 means 1/10), kept exact: Decimal sums
    # round to 28 digits, which lost e.g. 1 + 5e-324 and under-reserved by a minute.
    from fractions import Fraction

    return Fraction(repr(float(factor)))


def factor_for(gpu_type: str | None, factors: Mapping[str, float]) -> float:
    """The factor of a GPU type; untyped/unknown types use `default` (1.0 when absent)."""
    if gpu_type and gpu_type in factors:
        return float(factors[gpu_type])
    return float(factors.get(DEFAULT_GPU_TYPE, DEFAULT_GPU_FACTOR))


# ---------------------------------------------------------------------------------------
# Exact consumption (migration 0005) and the ONE rule that turns it into minutes.
# ---------------------------------------------------------------------------------------

# Units of the exact totals: CPU-seconds and GPU-milliseconds (of factor-weighted GPU time).
CPU_S_PER_MINUTE = 60
GPU_MS_PER_MINUTE = 60_000
EXACT_PER_MINUTE = {CPU: CPU_S_PER_MINUTE, GPU: GPU_MS_PER_MINUTE}


def minutes_from_exact(exact: int, per_minute: int) -> int:
    """The one rule: consumed minutes = ceil(exact / one minute), for every display and check.

    Rounding consumption up keeps the promise "N minutes left means a job of N minutes
    fits": requests are whole minutes, so requested ≤ quota − ceil(consumed) − reserved is
    exactly requested × 60 ≤ quota × 60 − consumed_s − reserved × 60. db.py's SQL form is
    `_minutes_sql`; the plugin's is M.minutes_from_exact.
    """
    return -(-int(exact) // per_minute)


def minutes_from_cpu_s(cpu_s: int) -> int:
    """Consumed CPU minutes shown for an exact CPU-seconds total (ceil, the one rule)."""
    return minutes_from_exact(cpu_s, CPU_S_PER_MINUTE)


def minutes_from_gpu_ms(gpu_ms: int) -> int:
    """Consumed GPU minutes shown for an exact GPU-milliseconds total (ceil, the one rule)."""
    return minutes_from_exact(gpu_ms, GPU_MS_PER_MINUTE)


def cpu_s_charged(cpus: int, elapsed_s: int) -> int:
    """Exact CPU-seconds of one run: cpus × elapsed, no rounding."""
    if cpus < 0 or elapsed_s < 0:
        raise InvalidInput(f"Negative CPUs ({cpus}) or elapsed seconds ({elapsed_s}).")
    return int(cpus) * int(elapsed_s)


def gpu_ms_charged(
    gpus_by_type: Mapping[str, int], factors: Mapping[str, float], elapsed_s: int
) -> int:
    """GPU-milliseconds of one run: Σ count × factor × elapsed × 1000, rounded half up once.

    Factors are exact decimals (0.75 is 3/4), so the only rounding is below one millisecond
    of GPU time per run.
    """
    if elapsed_s < 0:
        raise InvalidInput(f"Negative elapsed seconds ({elapsed_s}).")
    if not gpus_by_type:
        return 0
    from fractions import Fraction

    total = Fraction(0)
    for gpu_type, count in gpus_by_type.items():
        if count < 0:
            raise InvalidInput(f"Negative GPU count {count} for type {gpu_type!r}.")
        total += count * _exact_factor(factor_for(gpu_type, factors)) * elapsed_s
    return math.floor(total * 1000 + Fraction(1, 2))  # half up


def cpu_minutes_requested(cpus: int, time_limit_min: int) -> int:
    """CPU minutes a submission reserves per element (exact: integral inputs)."""
    return cpus * time_limit_min


def gpu_minutes_requested(
    gpus_by_type: Mapping[str, int], factors: Mapping[str, float], time_limit_min: int
) -> int:
    """GPU minutes a submission reserves per element: ceil(Σ count × factor × time)."""
    from fractions import Fraction

    total = Fraction(0)
    for gpu_type, count in gpus_by_type.items():
        total += count * _exact_factor(factor_for(gpu_type, factors)) * time_limit_min
    return math.ceil(total)


def available(quota: int, consumed: int, preallocated: int) -> int | None:
    """Minutes left: quota − consumed − preallocated; None when the quota is unlimited."""
    if quota == UNLIMITED:
        return None
    return quota - consumed - preallocated


def fits(requested: int, quota: int, consumed: int, preallocated: int) -> bool:
    """True when a request of `requested` minutes fits in what is left."""
    left = available(quota, consumed, preallocated)
    return left is None or requested <= left


def usage_fraction(quota: int, consumed: int, preallocated: int) -> float | None:
    """(consumed + preallocated) / quota, None when unlimited; a 0 quota counts as full."""
    if quota == UNLIMITED:
        return None
    if quota == 0:
        return 1.0
    return (consumed + preallocated) / quota


# ---------------------------------------------------------------------------------------
# Admin input parsing: every number typed by an admin goes through one of these.
# ---------------------------------------------------------------------------------------

# ASCII digits only: \d would also match e.g. Arabic-Indic or full-width digits, which
# int() accepts; `\Z` because `$` also matches before a trailing newline.
# Compiled on first use (_regex): only admin commands parse typed values.
_SIGNED_RE = r"^[+-][0-9]+(\.[0-9]+)?\Z"
_DECIMAL_RE = r"^[+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\Z"


@cache
def _regex(pattern: str) -> re.Pattern[str]:
    """The compiled form of one of the patterns above (compiled once, when first needed)."""
    return re.compile(pattern)


def parse_quota(text: str) -> int:
    """A quota in minutes: an integer ≥ −1 (−1 = unlimited), at most MAX_MINUTES."""
    quota = int_or_none(str(text), signed=True)
    if quota is None:
        raise InvalidInput(
            f"Quota {shown(text)} is not a whole number of minutes (use -1 for unlimited)."
        )
    if quota < UNLIMITED:
        raise InvalidInput(f"Quota {quota} is below -1 (use -1 for unlimited).")
    if quota > MAX_MINUTES:
        raise InvalidInput(f"Quota {quota} is larger than the maximum {MAX_MINUTES} minutes.")
    return quota


def parse_factor(text: str) -> float:
    """A GPU factor: a finite number ≥ 0."""
    value = str(text).strip()
    try:
        factor = float(value)
    except ValueError as err:
        raise InvalidInput(f"GPU factor {shown(text)} is not a number.") from err
    if not math.isfinite(factor):
        raise InvalidInput(f"GPU factor {shown(text)} is not finite.")
    if factor < 0:
        raise InvalidInput(f"GPU factor {factor} is negative; it must be 0 or more.")
    if factor > 1e6:
        raise InvalidInput(f"GPU factor {factor} is implausibly large (maximum 1e6).")
    if not _regex(_DECIMAL_RE).match(value):
        # float() also takes "1_0" and non-ASCII digits; the Lua side and people read ASCII.
        raise InvalidInput(f"GPU factor {shown(text)} is not a plain decimal number (e.g. 0.5).")
    return factor


def parse_signed_minutes(text: str, *, hours: bool = False) -> int:
    """An explicitly signed delta (`+30`, `-2`; hours may be `+1.5`) converted to minutes."""
    value = str(text).strip()
    if (
        len(value) > MAX_DIGITS
        or not _regex(_SIGNED_RE).match(value)
        or (not hours and "." in value)
    ):
        unit = "hours" if hours else "minutes"
        raise InvalidInput(
            f"Adjustment {shown(text)} must be an explicitly signed whole number of {unit}, "
            f"e.g. +30 or -30" + (" (or +1.5 hours)" if hours else "") + "."
        )
    if hours:
        from decimal import Decimal

        minutes_dec = Decimal(value) * 60
        if minutes_dec != minutes_dec.to_integral_value():
            raise InvalidInput(f"Adjustment {shown(text)} hours is not a whole number of minutes.")
        minutes = int(minutes_dec)
    else:
        minutes = int(value)
    if abs(minutes) > MAX_MINUTES:
        raise InvalidInput(f"Adjustment {shown(text)} exceeds the maximum {MAX_MINUTES} minutes.")
    return minutes


class Adjusted(namedtuple("Adjusted", ("old", "new", "clamped"))):
    """Result of applying a signed delta to a consumed total: old, new (int), clamped (bool)."""

    __slots__ = ()


def apply_adjustment(consumed: int, delta_minutes: int) -> Adjusted:
    """Add delta to a consumed total, clamped at 0 (an adjustment never makes it negative).

    A total already below 0 is a carried-over credit (allocation periods): adding to it keeps
    the rest of the credit, and taking off never goes below where it was.
    """
    target = consumed + delta_minutes
    floor = min(0, consumed)
    if target < floor:
        return Adjusted(old=consumed, new=floor, clamped=True)
    return Adjusted(old=consumed, new=target, clamped=False)


def format_quota(quota: int) -> str:
    """Display form of a quota: `∞` for unlimited."""
    return "∞" if quota == UNLIMITED else str(quota)
