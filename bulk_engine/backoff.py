"""Retry delays: pure functions that the submitters and the poll callback use between attempts.

Where it sits: a failed API call (connect error, timeout, 429, 5xx) comes back to the submitter or
the poll callback, which asks this module how long to wait before trying again. A ``Retry-After``
header is parsed here too; the caller also hands it to the shared ``RateLimiter.pause_for`` so that
every task slows down, not only the one that saw the 429.

Nothing here sleeps or reads a clock on its own: randomness comes from an injected
``random.Random`` and "now" (for HTTP dates) from the caller, so delays are reproducible in tests.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass, field
from datetime import UTC
from email.utils import parsedate_to_datetime

__all__ = [
    "MAX_RETRY_AFTER",
    "RetryBudget",
    "full_jitter",
    "parse_retry_after",
]

#: ``Retry-After`` values are clamped to this many seconds. A 429 pauses every caller, polls
#: included, and results expire 60 minutes after completion: one long pause must not let them
#: expire. A server that still wants quiet says so again after five minutes.
MAX_RETRY_AFTER = 300.0

# Delay-seconds per RFC 9110 are digits only; decimals and a sign are accepted because real
# gateways send them. Exponents, "inf", "nan" and underscores are not numbers here.
_SECONDS = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
# 2**64 * base already exceeds any sane cap; bounding the exponent avoids float overflow.
_MAX_EXPONENT = 64


def full_jitter(attempt: int, *, base: float, cap: float, rng: random.Random) -> float:
    """AWS "full jitter": a delay drawn uniformly from ``[0, min(cap, base * 2**attempt)]``.

    ``attempt`` counts retries already made, starting at 0 for the first retry.
    """
    if attempt < 0:
        raise ValueError(f"attempt must be 0 or more, got {attempt}")
    if base < 0 or cap < 0:
        raise ValueError(f"base and cap must not be negative, got {base} and {cap}")
    ceiling = min(cap, base * 2.0 ** min(attempt, _MAX_EXPONENT))
    return rng.uniform(0.0, ceiling)


def parse_retry_after(value: str | None, *, now_wall: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header, or None if absent or unreadable.

    Accepts delay-seconds (``"120"``, also ``"1.5"``) or an HTTP-date, which is measured against
    ``now_wall`` (``time.time()`` when not given). A negative delay or a date in the past gives
    0; anything above ``MAX_RETRY_AFTER`` is clamped to it.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if _SECONDS.fullmatch(text):
        seconds = float(text)
    else:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when is None:  # older Pythons returned None instead of raising
            return None
        if when.tzinfo is None:  # "-0000" means UTC with no claim about the local zone
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now_wall is None else now_wall)
    if not math.isfinite(seconds):
        return None
    return min(MAX_RETRY_AFTER, max(0.0, seconds))


@dataclass(slots=True)
class RetryBudget:
    """The retry state of one API call: how many retries are left and how long to wait next.

    ``next_delay`` returns None once ``max_retries`` retries were handed out; otherwise a
    full-jitter delay, never shorter than the server's ``Retry-After`` when one is given. Create
    one per call.
    """

    max_retries: int
    base: float
    cap: float
    rng: random.Random = field(repr=False)
    retries: int = 0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, got {self.max_retries}")
        if not 0 < self.base <= self.cap:
            raise ValueError(f"need 0 < base <= cap, got {self.base} and {self.cap}")

    @property
    def exhausted(self) -> bool:
        """True when no retry is left."""
        return self.retries >= self.max_retries

    def next_delay(self, retry_after: float | None = None) -> float | None:
        """Use up one retry and return how long to wait before it, or None when none is left."""
        if self.exhausted:
            return None
        delay = full_jitter(self.retries, base=self.base, cap=self.cap, rng=self.rng)
        self.retries += 1
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
        return delay
