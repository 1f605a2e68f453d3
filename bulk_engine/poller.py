"""The poll callback: one ``POST /case/retrieve`` of one token, and what its answer means.

Where it sits: ``PollScheduler`` calls :meth:`Poller.poll` when a ``Submitted`` is due; the
answer goes through ``policy.retrieve_decision`` (pure: 202 again, 200 complete, 500 failed,
404/401 resubmit within the attempt budget) and this module only carries the decision out —
a line through the ``Finisher``, a resubmission through the ``Submitter`` (in a task of its own,
so that a poll slot never waits on an upload slot), or another poll.

A token's polls have the same retry budget and error kinds as any call: once spent, a healthy
API means this row's trouble (a `failed` line with the transport kind), an outage stops the run
with the token still journaled (``health.ApiHealth.verdict``).
"""

from __future__ import annotations

from typing import Any

import anyio.abc
import structlog

from bulk_engine.backend import JournalBackend, RowLost
from bulk_engine.client import CaseClient
from bulk_engine.clock import Clock
from bulk_engine.config import Settings
from bulk_engine.errors import PermanentError, TransientError
from bulk_engine.finisher import Finisher
from bulk_engine.logs import get_logger
from bulk_engine.models import ErrorInfo, Outcome, Submitted, Ticket
from bulk_engine.policy import RetrieveAction, retrieve_decision
from bulk_engine.scheduler import PollDecision, PollScheduler
from bulk_engine.submitter import Submitter
from bulk_engine.vocab import Status

__all__ = ["Poller"]

log = get_logger()


class Poller:
    """Applies the retrieve policy to each poll of each token."""

    def __init__(self, settings: Settings, *, client: CaseClient, backend: JournalBackend,
                 finisher: Finisher, submitter: Submitter, clock: Clock) -> None:
        self.settings = settings
        self._clock = clock
        self._window = submitter.window
        self._client = client
        self._backend = backend
        self._finisher = finisher
        self._submitter = submitter
        self._scheduler: PollScheduler | None = None
        self._tasks: anyio.abc.TaskGroup | None = None
        self.resubmits = 0

    def start(self, scheduler: PollScheduler, tasks: anyio.abc.TaskGroup) -> None:
        """Resubmissions after a dead token run as tasks of ``tasks`` under ``scheduler``."""
        self._scheduler, self._tasks = scheduler, tasks

    async def poll(self, sub: Submitted) -> PollDecision:
        """One poll of one token, with transport retries; applies the retrieve policy."""
        client = self._client
        structlog.contextvars.bind_contextvars(id=sub.job.id)  # one task per poll
        try:
            answer = await client.call_with_retries(
                lambda: client.retrieve_once(sub.token, sub.analyse_type),
                endpoint="retrieve", source=sub.job.key,
                on_retry=lambda exc: log.debug("retry", kind=exc.kind,
                                               http_status=exc.http_status, message=exc.message))
        except (PermanentError, TransientError) as exc:
            if isinstance(exc, TransientError) and not await client.health.verdict("retrieve"):
                raise client.health.outage_error() from None  # the token stays journaled
            await self._finish(sub, Status.FAILED,
                               error=ErrorInfo(exc.kind, exc.message, exc.http_status))
            return PollDecision.DROP  # not a completion time: the policy must not learn it
        decision = retrieve_decision(answer.status, sub.attempts, self.settings.max_attempts)
        if decision.action is RetrieveAction.AGAIN:
            sub.run_id = answer.run_id or sub.run_id
            self._window.pending(sub.job.key)
            return PollDecision.AGAIN
        if decision.action is RetrieveAction.COMPLETE:
            self._learn(sub)
            await self._finish(sub, Status.COMPLETED, result=answer.body)
            return PollDecision.DONE
        assert decision.kind is not None
        if decision.action is RetrieveAction.RESUBMIT:
            self._window.requeue(sub.job.key)
            self._resubmit(sub, decision.kind)
            return PollDecision.DROP
        if decision.kind == "analysis_failed":
            self._learn(sub)
            await self._finish(sub, Status.FAILED, error=ErrorInfo(
                "analysis_failed", f"the API could not analyse this folder: {answer.message}",
                500))
            return PollDecision.DONE
        await self._finish(sub, Status.FAILED, error=ErrorInfo(
            decision.kind, f"retrieve answered {answer.status} ({answer.message}) and the "
            f"attempt budget ({self.settings.max_attempts}) is spent", answer.status))
        return PollDecision.DROP

    def _learn(self, sub: Submitted) -> None:
        """The folder was found done: tell the window when, as an interval since its 202 —
        not done at its last 202 poll, done now (a token of an earlier run: age unknown)."""
        if sub.resumed:
            return
        upper = max(0.0, self._clock.now() - sub.submitted_mono)
        lower = (0.0 if sub.last_pending_mono is None
                 else min(upper, max(0.0, sub.last_pending_mono - sub.submitted_mono)))
        self._window.observe(sub.job.key, lower, upper)

    def _resubmit(self, sub: Submitted, reason: str) -> None:
        """A dead token: submit the folder again under the next generation (its own task)."""
        assert self._scheduler is not None and self._tasks is not None
        self.resubmits += 1
        log.info("resubmit", id=sub.job.id, reason=reason, attempt=sub.attempts + 1)
        scheduler = self._scheduler
        scheduler.hold()  # the run is not over while the resubmission is on its way

        async def resubmit(ticket: Ticket) -> None:
            try:
                await self._backend.mark_pending(ticket.job.key)
                await self._submitter.submit(ticket)
            except RowLost:  # another worker's now (--db): no resubmission from here
                self._finisher.drop(ticket.job.key)
            finally:
                scheduler.release()

        self._tasks.start_soon(resubmit, Ticket(sub.job, sub.attempts + 1, sub.possible_duplicate))

    async def _finish(self, sub: Submitted, status: Status, *, result: Any = None,
                      error: ErrorInfo | None = None) -> None:
        await self._finisher.api_row(Outcome.for_job(
            sub.job, status=status, attempts=sub.attempts, polls=sub.polls, result=result,
            error=error, submitted_at=sub.submitted_at, run_id=sub.run_id,
            possible_duplicate=sub.possible_duplicate))
