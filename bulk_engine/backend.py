"""The journal interface: the row state machine every backend keeps, as a ``typing.Protocol``.

Where it sits: the pipeline stages (``producer``, ``submitter``, ``poller``) record each row's
progress through a ``JournalBackend``; the result sink (the file writer, or a database) records
when a row is done. A backend proves itself by passing ``tests/test_journal_conformance.py``,
which is written against this protocol and parametrized by backend.

The state machine (``vocab.RowState``; see ``docs/architecture.md``)::

    (new) ─mark_submitting─▶ submitting ─mark_submitted(token)─▶ submitted ─▶ done
              ▲                  │                                  │
              └── mark_pending ──┴──────────── (404/401: resubmit) ─┘

- ``attempts`` is the submission generation: it keys the ``Idempotency-Key`` together with the
  request identity, so a retry of the same submission (after a crash mid-POST) replays, and a
  deliberate resubmit (a new generation) does not.
- ``mark_submitting`` is called *before* the POST goes out; a second one on a row still
  ``submitting`` flags it ``possible_duplicate`` (the first POST's fate is unknown).
- ``mark_submitted`` is committed *before* the token is polled: a live token survives a crash.
- done is recorded by the sink after the row's result is durable (``finish``), never earlier.
- ``check_settings`` binds the journal to the run's identity (API host, analyse types, use
  case, source): resuming with other settings is refused.
- A backend shared by several workers (PostgreSQL) may answer a transition with
  :class:`RowLost`: the row is another worker's now. The stage drops it (``Finisher.drop``):
  no API call for it, no line. The embedded backend never raises it.

Every method is a coroutine: a database across the network must not block the event loop. The
SQLite backend (``SqliteBackend``) answers in microseconds and does not yield.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from bulk_engine.journal import Journal, RowRecord
from bulk_engine.models import Job, Outcome

__all__ = ["JournalBackend", "RowLost", "SqliteBackend"]


class RowLost(Exception):
    """This process no longer owns the row (its lease ran out, another worker took it)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"the row {key!r} is no longer this worker's")
        self.key = key


@runtime_checkable
class JournalBackend(Protocol):
    """A run's journal: where each row stands, durably (see the module docstring)."""

    async def check_settings(self, fingerprint: str, *, summary: str | None = None) -> None:
        """Bind to a run's settings, or raise ConfigError if bound to others."""

    async def get(self, key: str) -> RowRecord | None:
        """The row of ``key``, or None if the journal never saw it."""

    async def is_done(self, key: str) -> bool:
        """True once the row's result is durable."""

    async def live_tokens(self) -> list[RowRecord]:
        """Rows in state submitted: poll these on resume, never resubmit them."""

    async def submitting_rows(self) -> list[RowRecord]:
        """Rows whose POST /case may or may not have reached the server."""

    async def counts(self) -> dict[str, int]:
        """Rows per state and done rows per outcome (every key present)."""

    async def mark_submitting(self, job: Job, attempts: int, request_fp: str | None = None,
                              key_fp: str | None = None) -> None:
        """The POST /case of ``job`` (generation ``attempts``) is about to go out."""

    async def mark_submitted(self, key: str, token: str, run_id: str | None,
                             submitted_at: float) -> None:
        """The API accepted the row: its token, before it is polled."""

    async def mark_pending(self, key: str, *, attempts: int | None = None) -> None:
        """Back to be submitted (a dead token, a changed row, a submission never sent)."""

    async def forget(self, key: str) -> None:
        """The row left the manifest: it gets no result."""

    async def finish(self, outcomes: Sequence[Outcome]) -> None:
        """These rows are done with these outcomes (their results are durable)."""

    async def close(self) -> None:
        """Release the journal (committed state stays)."""


class SqliteBackend:
    """The embedded backend: the SQLite ``Journal`` beside the output file.

    The result sink is the output file (``writer.ResultWriter``), which marks rows done through
    ``Journal.mark_done_many`` together with the file's offset; :meth:`finish` is the same
    transition for callers without a file (the conformance suite).
    """

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    async def check_settings(self, fingerprint: str, *, summary: str | None = None) -> None:
        self.journal.check_settings(fingerprint, summary=summary)

    async def get(self, key: str) -> RowRecord | None:
        return self.journal.get(key)

    async def is_done(self, key: str) -> bool:
        return self.journal.is_done(key)

    async def live_tokens(self) -> list[RowRecord]:
        return self.journal.live_tokens()

    async def submitting_rows(self) -> list[RowRecord]:
        return self.journal.submitting_rows()

    async def counts(self) -> dict[str, int]:
        return self.journal.counts()

    async def mark_submitting(self, job: Job, attempts: int, request_fp: str | None = None,
                              key_fp: str | None = None) -> None:
        self.journal.mark_submitting(job, attempts, request_fp, key_fp)

    async def mark_submitted(self, key: str, token: str, run_id: str | None,
                             submitted_at: float) -> None:
        self.journal.mark_submitted(key, token, run_id, submitted_at)

    async def mark_pending(self, key: str, *, attempts: int | None = None) -> None:
        self.journal.mark_pending(key, attempts=attempts)

    async def forget(self, key: str) -> None:
        self.journal.forget(key)

    async def finish(self, outcomes: Sequence[Outcome]) -> None:
        self.journal.mark_done_many(
            [(o.key, o.status, o.error.kind if o.error else None) for o in outcomes],
            self.journal.output_offset, tail=self.journal.output_tail)

    async def close(self) -> None:
        self.journal.close()
