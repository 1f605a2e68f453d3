"""The engine's decisions as pure code: what to do with a retrieve answer, with a journaled
token on resume, and when too many rows fail.

Where it sits: ``engine.py`` asks these functions and only carries out the answer (journal
writes, scheduling, output lines). Each is a table of cases tested without a network, an event
loop or a journal (``tests/test_policy.py``). The error policy they implement is the README's
"How API answers are handled" table and ``docs/architecture.md``.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from bulk_engine.errors import MassFailureError
from bulk_engine.vocab import MASS_FAILURE_KINDS

__all__ = [
    "MassFailureWindow",
    "ResumeAction",
    "RetrieveAction",
    "RetrieveDecision",
    "resume_action",
    "retrieve_decision",
]


class RetrieveAction(enum.Enum):
    """What one documented retrieve answer means for its row."""

    AGAIN = "again"  # 202: still processing, poll later
    COMPLETE = "complete"  # 200 (already checked to be this request's result)
    FAIL = "fail"  # a final failure: write the row failed with ``kind``
    RESUBMIT = "resubmit"  # the token is dead (404/401) and the attempt budget allows another


@dataclass(frozen=True, slots=True)
class RetrieveDecision:
    action: RetrieveAction
    kind: str | None = None  # error kind for FAIL, the reason for RESUBMIT


def retrieve_decision(status: int, attempts: int, max_attempts: int) -> RetrieveDecision:
    """The retrieve policy for a documented answer (200, 202, 401, 404, 500).

    ``attempts`` is the submission generation that produced the token (1 = first). A 404
    (expired or unknown) or 401 (invalid token) is resubmitted while ``attempts <
    max_attempts``, else the row fails ``token_expired`` / ``token_invalid``. A 500 means the
    folder failed server-side: ``analysis_failed``, never resubmitted automatically.
    """
    if status == 202:
        return RetrieveDecision(RetrieveAction.AGAIN)
    if status == 200:
        return RetrieveDecision(RetrieveAction.COMPLETE)
    if status == 500:
        return RetrieveDecision(RetrieveAction.FAIL, "analysis_failed")
    if status in (401, 404):
        kind = "token_expired" if status == 404 else "token_invalid"
        if attempts < max_attempts:
            return RetrieveDecision(RetrieveAction.RESUBMIT, kind)
        return RetrieveDecision(RetrieveAction.FAIL, kind)
    raise ValueError(f"retrieve answer {status} is not a documented final or pending answer")


class ResumeAction(enum.Enum):
    """What to do with a token journaled by an earlier run, given the manifest as it is now."""

    POLL = "poll"  # same row, same request: poll the token, never resubmit
    RESUBMIT = "resubmit"  # the row's folder or options changed: a new submission, new key
    FAIL = "fail"  # the row is in the manifest but cannot be submitted any more (bad row)
    DROP = "drop"  # the row left the manifest: no line, forget it (with a warning)


def resume_action(*, in_manifest: bool, bad_row: bool, journaled_identity: str | None,
                  current_identity: str | None) -> ResumeAction:
    """Decide a journaled token's fate on resume.

    ``current_identity`` is the request identity the row would have now (manifest row, folder
    listing, key), ``journaled_identity`` the one its token was issued for. A token is only
    polled when the two agree: a changed row is never paired with its old request's result.
    """
    if not in_manifest:
        return ResumeAction.DROP
    if bad_row:
        return ResumeAction.FAIL
    if journaled_identity is not None and journaled_identity == current_identity:
        return ResumeAction.POLL
    return ResumeAction.RESUBMIT


class MassFailureWindow:
    """The last ``size`` API rows: stop the run when more than ``max_rate`` of them failed on
    the API's side (kinds with ``mass_failure`` in the registry)."""

    def __init__(self, size: int, max_rate: float) -> None:
        self.max_rate = max_rate
        self._recent: deque[bool] = deque(maxlen=size)

    @property
    def size(self) -> int:
        return self._recent.maxlen or 0

    def retune(self, size: int, max_rate: float) -> None:
        """New window size and rate, live (``Engine.apply_settings``); the most recent rows
        are kept. Checked at the next row."""
        self._recent = deque(self._recent, maxlen=size)
        self.max_rate = max_rate

    def add(self, error_kind: str | None) -> None:
        """Account one finished API row (``error_kind`` None when it completed); raises
        MassFailureError when the window is full and over the rate."""
        self._recent.append(error_kind in MASS_FAILURE_KINDS)
        failed = sum(self._recent)
        if len(self._recent) == self._recent.maxlen and failed > self.max_rate * len(self._recent):
            raise MassFailureError(
                f"{failed} of the last {len(self._recent)} rows failed server-side (over "
                f"{self.max_rate:.0%}): stopping instead of burning through the archive. "
                "Check the API's answers in the output, then rerun the same command to resume "
                "(raise --max-failure-rate to go on regardless)."
            )
