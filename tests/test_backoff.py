"""Retry delays: full jitter, Retry-After parsing and the per-call retry budget (pure code)."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bulk_engine.backoff import MAX_RETRY_AFTER, RetryBudget, full_jitter, parse_retry_after

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC).timestamp()


def http_date(ts: float) -> str:
    return format_datetime(datetime.fromtimestamp(ts, tz=UTC), usegmt=True)


# ---- full_jitter ----------------------------------------------------------------------------


def test_full_jitter_is_reproducible_with_a_seeded_rng() -> None:
    """The same seed gives the same delays."""
    a = [full_jitter(i, base=0.5, cap=30, rng=random.Random(7)) for i in range(10)]
    b = [full_jitter(i, base=0.5, cap=30, rng=random.Random(7)) for i in range(10)]
    assert a == b


def test_full_jitter_spreads_over_the_whole_range_up_to_the_cap() -> None:
    """Delays are uniform on [0, min(cap, base*2**attempt)]: mean about half the ceiling."""
    rng = random.Random(1)
    for attempt, ceiling in ((0, 0.5), (3, 4.0), (10, 30.0)):
        draws = [full_jitter(attempt, base=0.5, cap=30, rng=rng) for _ in range(4000)]
        assert 0 <= min(draws) < 0.05 * ceiling
        assert 0.95 * ceiling < max(draws) <= ceiling
        assert sum(draws) / len(draws) == pytest.approx(ceiling / 2, rel=0.05)


def test_full_jitter_survives_huge_attempts() -> None:
    """A runaway attempt counter does not overflow; the cap still holds."""
    assert 0 <= full_jitter(10_000, base=1.0, cap=5.0, rng=random.Random(0)) <= 5.0


def test_full_jitter_rejects_negative_inputs() -> None:
    """Negative attempt, base or cap are programming errors."""
    with pytest.raises(ValueError):
        full_jitter(-1, base=1, cap=2, rng=random.Random(0))
    with pytest.raises(ValueError):
        full_jitter(0, base=-1, cap=2, rng=random.Random(0))


@given(
    attempt=st.integers(min_value=0, max_value=200),
    base=st.floats(min_value=0.001, max_value=10),
    cap=st.floats(min_value=0.001, max_value=600),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_full_jitter_always_within_bounds(attempt: int, base: float, cap: float, seed: int) -> None:
    """Whatever the inputs, 0 <= delay <= min(cap, base * 2**attempt)."""
    delay = full_jitter(attempt, base=base, cap=cap, rng=random.Random(seed))
    assert 0.0 <= delay <= min(cap, base * 2.0 ** min(attempt, 64))


# ---- parse_retry_after ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        ("  7 ", 7.0),
        ("0", 0.0),
        ("1.5", 1.5),
        (".25", 0.25),
        ("+3", 3.0),
        ("-5", 0.0),
        ("86400", MAX_RETRY_AFTER),
    ],
)
def test_retry_after_seconds(value: str, expected: float) -> None:
    """Delay-seconds, with decimals and a sign tolerated; negative is 0; clamped to an hour."""
    assert parse_retry_after(value) == expected


@pytest.mark.parametrize(
    "value", [None, "", "   ", "soon", "1e3", "nan", "inf", "1_000", "12abc", "Mon, 99 Foo 2015"]
)
def test_retry_after_garbage_is_none(value: str | None) -> None:
    """Absent or unreadable values give None (the caller falls back to its own backoff)."""
    assert parse_retry_after(value) is None


def test_retry_after_http_date_is_measured_from_now() -> None:
    """An HTTP-date gives the seconds from ``now_wall`` to that date."""
    assert parse_retry_after(http_date(NOW + 30), now_wall=NOW) == pytest.approx(30.0)


def test_retry_after_http_date_in_the_past_is_zero_and_far_future_is_clamped() -> None:
    """A past date means "now"; a date days away is clamped to MAX_RETRY_AFTER."""
    assert parse_retry_after(http_date(NOW - 300), now_wall=NOW) == 0.0
    assert parse_retry_after(http_date(NOW + 3 * 86400), now_wall=NOW) == MAX_RETRY_AFTER


def test_retry_after_http_date_without_zone_is_utc() -> None:
    """A "-0000" zone (no zone information) is read as UTC."""
    value = http_date(NOW + 60).replace("GMT", "-0000")
    assert parse_retry_after(value, now_wall=NOW) == pytest.approx(60.0)


def test_retry_after_http_date_uses_wall_clock_by_default() -> None:
    """Without ``now_wall`` the date is measured against time.time()."""
    delay = parse_retry_after(http_date(datetime.now(UTC).timestamp() + 200))
    assert delay is not None and 190 <= delay <= 200


# ---- RetryBudget ----------------------------------------------------------------------------


def test_retry_budget_hands_out_max_retries_then_none() -> None:
    """Exactly ``max_retries`` delays, growing ceilings, then None."""
    budget = RetryBudget(max_retries=3, base=1.0, cap=100.0, rng=random.Random(3))
    delays = [budget.next_delay() for _ in range(3)]
    assert all(d is not None and 0 <= d <= 2**i for i, d in enumerate(delays))
    assert budget.exhausted
    assert budget.next_delay() is None
    assert budget.retries == 3


def test_retry_budget_never_retries_sooner_than_retry_after() -> None:
    """A server's Retry-After is a floor for the delay (clamped to MAX_RETRY_AFTER)."""
    budget = RetryBudget(max_retries=5, base=0.1, cap=0.2, rng=random.Random(0))
    assert budget.next_delay(retry_after=12.0) == 12.0
    assert budget.next_delay(retry_after=1e9) == MAX_RETRY_AFTER
    assert budget.next_delay(retry_after=None) is not None


def test_retry_budget_with_zero_retries_never_retries() -> None:
    """max_retries=0: the first failure is final."""
    assert RetryBudget(max_retries=0, base=1, cap=1, rng=random.Random(0)).next_delay() is None


def test_retry_budget_validates() -> None:
    """Bad settings are refused with ValueError."""
    with pytest.raises(ValueError):
        RetryBudget(max_retries=-1, base=1, cap=1, rng=random.Random(0))
    with pytest.raises(ValueError):
        RetryBudget(max_retries=1, base=2, cap=1, rng=random.Random(0))
