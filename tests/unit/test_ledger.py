"""Properties of the ledger rules (hypothesis) against exact rational arithmetic."""

from __future__ import annotations

import math
import re
from fractions import Fraction

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from slurm_quota import ledger
from slurm_quota.errors import InvalidInput

MAX = ledger.MAX_MINUTES
cpus = st.integers(min_value=0, max_value=100_000)
seconds = st.integers(min_value=0, max_value=400 * 24 * 3600)
counts = st.integers(min_value=0, max_value=64)
factors = st.floats(min_value=0, max_value=1000, allow_nan=False, allow_infinity=False)
gpu_types = st.sampled_from(["default", "h100", "a100", "l40s", "unknown"])
factor_maps = st.dictionaries(st.sampled_from(["default", "h100", "a100", "l40s"]), factors)
quotas = st.one_of(st.just(-1), st.integers(min_value=0, max_value=MAX))
minutes = st.integers(min_value=0, max_value=MAX)


def _half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


def _exact_factor(gpu_type: str, fmap: dict[str, float]) -> Fraction:
    if gpu_type in fmap:
        return Fraction(repr(fmap[gpu_type]))
    return Fraction(repr(fmap.get("default", 1.0)))


# ---------------------------------------------------------------------------------------
# Charges and requests
# ---------------------------------------------------------------------------------------


@given(cpus, seconds)
def test_cpu_charge_is_the_exact_product_in_cpu_seconds(n_cpus, elapsed_s):
    assert ledger.cpu_s_charged(n_cpus, elapsed_s) == n_cpus * elapsed_s


def test_cpu_charge_examples_from_the_design():
    # DESIGN §3: 128 CPUs for 59 s are 126 CPU minutes shown (ceil of the exact 7552 s), not 0
    assert ledger.cpu_s_charged(128, 59) == 7552
    assert ledger.minutes_from_cpu_s(7552) == 126
    assert ledger.minutes_from_cpu_s(ledger.cpu_s_charged(1, 30)) == 1
    assert ledger.minutes_from_cpu_s(ledger.cpu_s_charged(1, 29)) == 1  # no run is free
    assert ledger.cpu_s_charged(0, 10_000) == 0


@given(st.dictionaries(gpu_types, counts), factor_maps, seconds)
def test_gpu_charge_is_the_weighted_sum_in_ms_rounded_half_up_once(gpus, fmap, elapsed_s):
    exact = sum(
        (count * _exact_factor(t, fmap) * elapsed_s for t, count in gpus.items()), Fraction(0)
    )
    assert ledger.gpu_ms_charged(gpus, fmap, elapsed_s) == _half_up(exact * 1000)


@given(st.dictionaries(gpu_types, counts), factor_maps, st.integers(0, 525_600))
def test_gpu_request_rounds_up_never_under_reserves(gpus, fmap, time_limit_min):
    exact = sum(
        (count * _exact_factor(t, fmap) * time_limit_min for t, count in gpus.items()),
        Fraction(0),
    )
    requested = ledger.gpu_minutes_requested(gpus, fmap, time_limit_min)
    assert requested == math.ceil(exact)
    assert requested >= exact


def test_factor_of_unknown_and_untyped_gpus_is_the_default():
    assert ledger.factor_for(None, {}) == 1.0
    assert ledger.factor_for("h100", {"default": 0.25}) == 0.25
    assert ledger.factor_for("h100", {"default": 0.25, "h100": 2.0}) == 2.0
    # The seed's example: factor 0.5 counts 10 minutes as 5.
    assert ledger.minutes_from_gpu_ms(ledger.gpu_ms_charged({"h100": 1}, {"h100": 0.5}, 600)) == 5


@pytest.mark.parametrize("bad", [(-1, 10), (1, -10)])
def test_negative_charge_inputs_are_refused(bad):
    with pytest.raises(InvalidInput):
        ledger.cpu_s_charged(*bad)


# ---------------------------------------------------------------------------------------
# Adjustments
# ---------------------------------------------------------------------------------------


@given(minutes, st.integers(min_value=-MAX, max_value=MAX))
@example(40, -60)
@example(0, 0)
def test_adjustment_is_clamped_at_zero(consumed, delta):
    result = ledger.apply_adjustment(consumed, delta)
    assert result.new == max(0, consumed + delta)
    assert result.new >= 0
    assert result.old == consumed
    assert result.clamped == (consumed + delta < 0)


@given(st.integers(min_value=-MAX, max_value=MAX))
def test_signed_minutes_round_trip(delta):
    assert ledger.parse_signed_minutes(f"{delta:+d}") == delta


@given(st.integers(min_value=-(MAX // 60), max_value=MAX // 60))
def test_signed_hours_are_sixty_minutes(hours):
    assert ledger.parse_signed_minutes(f"{hours:+d}", hours=True) == hours * 60


@pytest.mark.parametrize("text", ["+١٢", "-１２", "+1_0", "+ 5", "++5", "+5\n5", "+1e3"])
def test_signed_minutes_refuse_what_is_not_plain_ascii(text):
    with pytest.raises(InvalidInput):
        ledger.parse_signed_minutes(text)


@given(st.integers(min_value=0, max_value=MAX))
def test_unsigned_adjustments_are_refused(n):
    with pytest.raises(InvalidInput, match="explicitly signed"):
        ledger.parse_signed_minutes(str(n))


# ---------------------------------------------------------------------------------------
# Quotas and factors typed by an admin
# ---------------------------------------------------------------------------------------

_ACCEPTED_QUOTA = re.compile(r"[+-]?[0-9]+")


@given(quotas)
def test_parse_quota_round_trips_every_valid_quota(quota):
    assert ledger.parse_quota(str(quota)) == quota
    assert ledger.parse_quota(f" {quota} ") == quota


@given(st.one_of(st.integers(max_value=-2), st.integers(min_value=MAX + 1)))
def test_parse_quota_refuses_integers_out_of_range(value):
    with pytest.raises(InvalidInput):
        ledger.parse_quota(str(value))


@given(st.text(max_size=20))
@example("1e9999")
@example("1.5")
@example("NaN")
@example("inf")
@example("١٢")  # Arabic-Indic digits: int() would accept them
@example("１２")  # full-width digits
@example("1_000")
@example("")
@example("0x10")
def test_parse_quota_refuses_everything_that_is_not_a_plain_integer(text):
    stripped = text.strip()
    if _ACCEPTED_QUOTA.fullmatch(stripped) and -1 <= int(stripped) <= MAX:
        assert ledger.parse_quota(text) == int(stripped)
    else:
        with pytest.raises(InvalidInput):
            ledger.parse_quota(text)


@given(st.floats(min_value=0, max_value=1e6, allow_nan=False))
def test_parse_factor_round_trips_finite_non_negative_numbers(factor):
    assert ledger.parse_factor(repr(factor)) == factor


@pytest.mark.parametrize(
    "text",
    ["nan", "NaN", "inf", "-inf", "1e9999", "-1", "-0.5", "abc", "", "1_0", "١", "0x1p-1"],
)
def test_parse_factor_refuses(text):
    with pytest.raises(InvalidInput):
        ledger.parse_factor(text)


# ---------------------------------------------------------------------------------------
# Availability
# ---------------------------------------------------------------------------------------


@given(quotas, minutes, minutes, minutes)
def test_available_and_fits_agree(quota, consumed, preallocated, requested):
    left = ledger.available(quota, consumed, preallocated)
    if quota == ledger.UNLIMITED:
        assert left is None
        assert ledger.fits(requested, quota, consumed, preallocated)
        assert ledger.usage_fraction(quota, consumed, preallocated) is None
    else:
        assert left == quota - consumed - preallocated
        assert ledger.fits(requested, quota, consumed, preallocated) == (requested <= left)
        # Fitting is monotone: a smaller request fits whenever a larger one does.
        if ledger.fits(requested, quota, consumed, preallocated):
            assert ledger.fits(requested // 2, quota, consumed, preallocated)
        fraction = ledger.usage_fraction(quota, consumed, preallocated)
        if quota == 0:
            assert fraction == 1.0
        else:
            assert fraction == pytest.approx((consumed + preallocated) / quota)


@given(minutes, minutes)
def test_a_request_of_zero_fits_exactly_when_nothing_is_overdrawn(consumed, preallocated):
    quota = consumed + preallocated
    assert ledger.fits(0, quota, consumed, preallocated)
    assert not ledger.fits(1, quota, consumed, preallocated)


def test_format_quota_shows_infinity_for_unlimited():
    assert ledger.format_quota(-1) == "∞"
    assert ledger.format_quota(0) == "0"
    assert ledger.format_quota(50000) == "50000"
