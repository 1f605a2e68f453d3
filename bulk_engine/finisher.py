"""The end of every row: one ``Outcome`` to the result sink, counted and logged once.

Where it sits::

    producer (bad rows) ──┐
    submitters (sync results, refused uploads) ──┼──Outcome──▶ Finisher ──▶ [stream] ──▶ sink
    poll callback (results, failures) ──┘                    (writer, or a database)

For a row that went to the API, the Finisher also gives back its outstanding slot and feeds the
mass-failure window (``policy.MassFailureWindow``), which stops the run when most recent rows
failed on the API's side. Every row logs one canonical ``row_done`` event here. A row the
journal says is no longer this worker's (``backend.RowLost``, with ``--db``) ends here too,
without a line: :meth:`Finisher.drop`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from bulk_engine.logs import get_logger
from bulk_engine.models import Outcome
from bulk_engine.policy import MassFailureWindow
from bulk_engine.stats import decision_of
from bulk_engine.vocab import Status

__all__ = ["Finisher", "FinisherStatistics", "SlotReleaser"]

log = get_logger()


class SlotReleaser(Protocol):
    def release(self, key: str | None = None) -> None: ...


@dataclass(frozen=True, slots=True)
class FinisherStatistics:
    """Rows finished by this run."""

    completed: int
    failed: int
    withdrawn: int = 0  # tickets not sent because the run drains: no line, the rerun sends them

    @property
    def done(self) -> int:
        return self.completed + self.failed


class Finisher:
    """Sends each row's Outcome to the sink exactly once."""

    def __init__(self, send: MemoryObjectSendStream[Outcome], *, outstanding: SlotReleaser,
                 mass_failure: MassFailureWindow) -> None:
        self._send = send
        self._outstanding = outstanding
        self._mass_failure = mass_failure
        self._completed = 0
        self._failed = 0
        self.dropped = 0  # rows another worker took over (--db): no line from this one
        self._withdrawn = 0

    def statistics(self) -> FinisherStatistics:
        return FinisherStatistics(self._completed, self._failed, self._withdrawn)

    async def bad_row(self, out: Outcome) -> None:
        """A row that never reached the API (a bad manifest row, a folder that became bad)."""
        await self._emit(out)

    async def api_row(self, out: Outcome) -> None:
        """A row the API answered for: its slot is freed and the mass-failure window counts it.

        Shielded: a result in hand must reach the sink even on Ctrl-C (no hang: a dead sink has
        closed its stream, and the send raises).
        """
        self._outstanding.release(out.key)
        with anyio.CancelScope(shield=True):
            await self._emit(out)
        # Stop when most recent API rows failed server-side (state saved; rerun resumes).
        self._mass_failure.add(out.error.kind if out.error else None)

    def drop(self, key: str) -> None:
        """A row with an outstanding unit that is no longer this worker's (``RowLost``): its
        unit is given back, it gets no line from here (its new owner writes it)."""
        self._outstanding.release(key)
        self.dropped += 1
        log.info("row_dropped", key=key, hint="another worker holds this row now")

    def withdrawn(self, key: str) -> None:
        """A ticket the run will not send (it drains): its slot is freed, it gets no line; its
        journal state is left as it was, so the rerun sends it."""
        self._outstanding.release(key)
        self._withdrawn += 1

    async def _emit(self, out: Outcome) -> None:
        if out.status == Status.COMPLETED:
            self._completed += 1
        else:
            self._failed += 1
        log.info("row_done", id=out.id, status=out.status, attempts=out.attempts,
                 polls=out.polls, error=out.error.kind if out.error else None,
                 decision=decision_of(out.result), latency_s=out.to_json()["latency_s"])
        await self._send.send(out)
