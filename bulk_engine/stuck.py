"""Stuck analyses: folders whose analysis runs far beyond what this run has learned.

Where it sits: the poll scheduler calls :meth:`StuckWatch.check` after each poll that answered
202, with the seconds since the folder's submission. Once the poll policy has learned the
processing-time distribution (``PollPolicy.quantile``), a folder still running past
``factor`` × its 99th percentile is reported once: a ``stuck_analysis`` warning naming the row,
a count on the panel and in the metrics. Nothing else changes for it: it keeps being polled
within ``--poll-min``/``--poll-max``, and is given up only by the usual rules (the token's
expiry, the attempt budget). Before the policy has learned (its first 20 folders), nothing is
reported: there is no distribution to be far beyond.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from bulk_engine.logs import get_logger
from bulk_engine.models import Submitted
from bulk_engine.scheduler import PollPolicy

__all__ = ["STUCK_QUANTILE", "StuckStatistics", "StuckWatch", "outstanding_figures"]

log = get_logger()

STUCK_QUANTILE = 0.99


@dataclass(frozen=True, slots=True)
class StuckStatistics:
    """Stuck analyses, and the age of the oldest token still outstanding."""

    reported: int = 0  # folders reported stuck by this run
    outstanding: int = 0  # of those, the ones still awaiting their result
    threshold_s: float | None = None  # factor × learned p99 (None until learned)
    oldest_age_s: float | None = None  # seconds since the oldest outstanding token's 202


class StuckWatch:
    """Reports each folder once when it runs past ``factor`` × the learned p99."""

    def __init__(self, policy: PollPolicy, *, factor: float) -> None:
        self.policy = policy
        self.factor = factor
        self.reported = 0

    def threshold(self) -> float | None:
        """Seconds after submission beyond which a folder is stuck; None until learned."""
        p99 = self.policy.quantile(STUCK_QUANTILE)
        return None if p99 is None else self.factor * p99

    def check(self, sub: Submitted, elapsed: float) -> bool:
        """A poll of ``sub`` answered 202 ``elapsed`` s after its submission: True (and a
        warning) the first time it is past the threshold."""
        if sub.stuck:
            return False
        limit = self.threshold()
        if limit is None or elapsed <= limit:
            return False
        sub.stuck = True
        self.reported += 1
        log.warning("stuck_analysis", id=sub.job.id, elapsed_s=round(elapsed, 1),
                    threshold_s=round(limit, 1), factor=self.factor, polls=sub.polls,
                    hint="still polled; given up only by the usual rules (expiry, attempts)")
        return True

    def statistics(self, outstanding: Iterable[Submitted], now: float) -> StuckStatistics:
        """The figures now, over the tokens the scheduler holds (``outstanding``)."""
        stuck, oldest = outstanding_figures(outstanding, now)
        return StuckStatistics(self.reported, stuck, self.threshold(), oldest)


def outstanding_figures(subs: Iterable[Submitted], now: float) -> tuple[int, float | None]:
    """(how many of ``subs`` are flagged stuck, age of the oldest one in seconds or None)."""
    stuck = 0
    first: float | None = None
    for sub in subs:
        stuck += sub.stuck
        if first is None or sub.submitted_mono < first:
            first = sub.submitted_mono
    return stuck, (None if first is None else max(0.0, now - first))
