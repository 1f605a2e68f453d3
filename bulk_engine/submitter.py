"""The submitters: one multipart ``POST /case`` per ticket, and its token to the poll scheduler.

Where it sits::

    producer ─Ticket─▶ [bounded stream] ─▶ N × Submitter.worker ─Submitted─▶ PollScheduler
                                                     └─Outcome (sync result, failure)─▶ Finisher

Each ticket is one submission of one row: the payload is built once, its request identity and
generation give the ``Idempotency-Key`` (``client.idempotency_key``), the journal records
``submitting`` right before the first request goes out and ``submitted`` (the token) before the
token is polled. Transport errors are retried by the client; when they are spent, the API's
health decides (``health.ApiHealth.verdict``): a healthy API means this row's trouble (a
`failed` line), an outage stops the run with the row unfailed.

A submission cut short (an outage, an interrupt, a refused key) goes back to pending when none of
its requests can have created a run (:meth:`Submitter.forget_unsent`), so the rerun does not
flag it as a possible duplicate.

A folder in a bucket can fail its upload on the S3 side (``s3.access``): an object changed since
listing or unreadable fails the row (``file_changed``, ``file_unreadable``, or a transport kind
when S3 failed for this row alone), never retried as the listed folder; an S3 outage stops the
run. Either way the body never reached the API whole, so no run can exist for that attempt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream

from bulk_engine.backend import JournalBackend, RowLost
from bulk_engine.client import CaseClient, idempotency_key, submission_for
from bulk_engine.clock import Clock
from bulk_engine.config import Settings
from bulk_engine.control import SubmitGate
from bulk_engine.errors import (
    AmbiguousSubmitError,
    ApiError,
    ConfigError,
    ManifestError,
    PermanentError,
    StoreUnavailableError,
    TransientError,
)
from bulk_engine.finisher import Finisher
from bulk_engine.logs import get_logger, short_token
from bulk_engine.models import ErrorInfo, Job, Outcome, Submitted, Ticket
from bulk_engine.rules import goes_sync
from bulk_engine.scheduler import PollScheduler
from bulk_engine.tuning import OutstandingWindow
from bulk_engine.vocab import Status

__all__ = ["Submitter", "SubmitterStatistics", "sent_types"]

log = get_logger()


@dataclass(frozen=True, slots=True)
class SubmitterStatistics:
    """Submissions the API accepted, and uploads under way."""

    submitted: int  # 202s (and sync 200s) received
    uploading: int  # submissions whose POST /case has gone out and has no final answer yet


@dataclass(slots=True)
class _Sending:
    """A submission under way: can its body have reached a server yet?"""

    attempts: int  # its generation
    in_flight: bool = False  # a request of it is on the wire right now
    maybe_sent: bool = False  # an attempt failed after its body may have arrived


class Submitter:
    """Uploads tickets, with retries, through the run's one client."""

    def __init__(self, settings: Settings, *, client: CaseClient, backend: JournalBackend,
                 scheduler: PollScheduler, finisher: Finisher, key_fp: str, clock: Clock,
                 window: OutstandingWindow, gate: SubmitGate | None = None) -> None:
        self.settings = settings
        self._clock = clock
        self._client = client
        self._backend = backend
        self._scheduler = scheduler
        self._finisher = finisher
        self._key_fp = key_fp
        self.window = window  # a unit per folder submitted and not yet retrieved
        self._uploads = anyio.CapacityLimiter(settings.concurrency)
        self._sending: dict[str, _Sending] = {}
        self._submitted = 0
        self.gate = gate if gate is not None else SubmitGate()  # pause, drain (control.py)

    def statistics(self) -> SubmitterStatistics:
        return SubmitterStatistics(self._submitted, len(self._sending))

    @property
    def concurrency(self) -> int:
        """Uploads allowed in flight now."""
        return int(self._uploads.total_tokens)

    def set_concurrency(self, n: int) -> None:
        """Uploads allowed in flight from now on (callers beyond it wait for a slot)."""
        self._uploads.total_tokens = n

    def submission(self, job: Job, *, asynchronous: bool,
                   key_fp: str | None = None) -> tuple[dict[str, Any], str]:
        """The payload for ``job`` and its request identity (under ``key_fp``, else ours)."""
        return submission_for(self.settings, job, asynchronous=asynchronous,
                              key_fp=key_fp or self._key_fp)

    async def worker(self, recv: MemoryObjectReceiveStream[Ticket]) -> None:
        """Submit tickets until the stream ends."""
        async with recv:
            async for ticket in recv:
                # A unit of the outstanding window first: the window (tuning.py) is what keeps
                # the API's queue short; the row gives the unit back when it is finished.
                await self.window.acquire()
                await self.submit(ticket)

    async def submit(self, ticket: Ticket) -> None:
        """Upload one folder (with retries); hand its token to the scheduler, or finish it."""
        job = ticket.job
        if not await self.gate.admit():  # paused: waits here; draining: not sent at all
            self._finisher.withdrawn(job.key)
            return
        client = self._client
        structlog.contextvars.bind_contextvars(id=job.id)  # this task's logs name the row
        payload, identity = self.submission(job, asynchronous=not goes_sync(self.settings, job))
        idem = idempotency_key(identity, ticket.attempts) if self.settings.idempotency else None
        submitted_wall = time.time()
        sending = _Sending(ticket.attempts)

        async def before_send() -> None:
            # Journal intent once, when the first request of this submission really goes out.
            if job.key not in self._sending:
                if not await self.gate.admit():  # paused or drained since the ticket came
                    raise _Withdrawn
                await self._backend.mark_submitting(job, ticket.attempts, identity, self._key_fp)
                self._sending[job.key] = sending
            sending.in_flight = True

        def after_attempt(exc: ApiError) -> None:
            sending.in_flight = False
            sending.maybe_sent = sending.maybe_sent or isinstance(exc, AmbiguousSubmitError)
            log.debug("retry", kind=exc.kind, http_status=exc.http_status, message=exc.message)

        try:
            async with self._uploads, client.health.admit():
                answer = await client.call_with_retries(
                    lambda: client.submit_once(job, payload=payload, idem_key=idem,
                                               before_send=before_send),
                    endpoint="submit", source=job.key, on_retry=after_attempt,
                )
        except RowLost:  # refused at mark_submitting: nothing was sent
            self._finisher.drop(job.key)
            return
        except _Withdrawn:
            self._finisher.withdrawn(job.key)
            return
        except (PermanentError, TransientError) as exc:
            after_attempt(exc)
            if isinstance(exc, TransientError) and not await client.health.verdict("submit"):
                raise client.health.outage_error() from None  # forget_unsent settles the row
            self._sending.pop(job.key, None)
            await self._finisher.api_row(Outcome.for_job(
                job, status=Status.FAILED, attempts=ticket.attempts,
                error=ErrorInfo(exc.kind, exc.message, exc.http_status),
                submitted_at=submitted_wall, possible_duplicate=ticket.possible_duplicate))
            return
        except ManifestError as exc:  # the bucket's side of this row (see the module doc)
            sending.in_flight = False
            self._sending.pop(job.key, None)
            await self._finisher.api_row(Outcome.for_job(
                job, status=Status.FAILED, attempts=ticket.attempts,
                error=ErrorInfo(exc.kind, exc.message),
                submitted_at=submitted_wall, possible_duplicate=ticket.possible_duplicate))
            return
        except (StoreUnavailableError, ConfigError):  # S3 down, or its credentials refused
            sending.in_flight = False  # the body never reached the API whole: no run exists
            raise
        self._sending.pop(job.key, None)
        self._submitted += 1
        if answer.token is None:  # sync mode: the answer is the result
            await self._finisher.api_row(Outcome.for_job(
                job, status=Status.COMPLETED, attempts=ticket.attempts, result=answer.result,
                submitted_at=submitted_wall, possible_duplicate=ticket.possible_duplicate))
            return
        try:
            await self._backend.mark_submitted(job.key, answer.token, None, submitted_wall)
        except RowLost:  # its new owner sends it again under the same Idempotency-Key
            self._finisher.drop(job.key)
            return
        log.debug("submitted", id=job.id, token=short_token(answer.token))
        self._scheduler.add(Submitted(
            job=job, token=answer.token, submitted_at=submitted_wall,
            submitted_mono=self._clock.now(), attempts=ticket.attempts,
            possible_duplicate=ticket.possible_duplicate, analyse_type=sent_types(payload),
        ))
        self.window.submitted(job.key)

    async def forget_unsent(self, *, refused: bool) -> None:
        """Submissions cut short that cannot have created a run go back to pending: those whose
        every attempt failed before its body reached a server (connect errors), or all of them
        when the key was ``refused`` (the API creates no run for a refused key)."""
        with anyio.CancelScope(shield=True):
            for key, st in list(self._sending.items()):
                if refused or not (st.maybe_sent or st.in_flight):
                    try:
                        await self._backend.mark_pending(key, attempts=st.attempts - 1)
                    except RowLost:
                        pass  # another worker's now: it decides
        self._sending.clear()


class _Withdrawn(Exception):
    """Raised by ``before_send`` when the run drained: this folder's request does not go."""


def sent_types(payload: dict[str, Any]) -> tuple[str, ...]:
    """The analyse types a payload asks for (a manifest's payload column may override them)."""
    value = payload.get("analyse_type")
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value) if isinstance(value, list) else ()
