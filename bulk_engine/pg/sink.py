"""The ``--db`` result sink: each row's final word, written to the shared run in one fenced
transaction (done + its output line), instead of appended to a local file.

Where it sits::

    Finisher ─Outcome─▶ [bounded stream] ─▶ DatabaseSink ─finish_row─▶ RunStore (fenced UPDATE)
                                                 └─(written)─▶ on_durable (the run's summary)

The counterpart of ``writer.ResultWriter``: the single consumer of the outcomes. A row whose
lease was lost meanwhile is refused by the database (another worker owns it and writes its
line): the outcome is dropped here, counted, never written twice. Outcomes already received
are still written after an interrupt (the stream is drained, not cancelled).
``python -m bulk_engine export`` turns the run's lines into the JSONL file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import anyio.abc

from bulk_engine.logs import get_logger
from bulk_engine.models import Outcome
from bulk_engine.pg.backend import PgBackend

__all__ = ["DatabaseSink", "SinkStatistics"]

log = get_logger()


@dataclass(frozen=True, slots=True)
class SinkStatistics:
    """Rows this worker finished in the run, and outcomes refused (the row was another's)."""

    written: int
    refused: int


class DatabaseSink:
    """Finishes each outcome's row in the database, one fenced statement per row."""

    def __init__(self, backend: PgBackend, *,
                 on_durable: Callable[[list[Outcome]], None] | None = None) -> None:
        self.backend = backend
        self.on_durable = on_durable
        self._written = 0
        self._refused = 0

    def statistics(self) -> SinkStatistics:
        return SinkStatistics(self._written, self._refused)

    async def run(self, receive: anyio.abc.ObjectReceiveStream[Outcome]) -> None:
        """Consume ``receive`` until it ends."""
        async with receive:
            async for out in receive:
                if await self.backend.finish_row(out):
                    self._written += 1
                    if self.on_durable is not None:
                        self.on_durable([out])
                else:
                    self._refused += 1
                    log.info("late_result_refused", id=out.id,
                             hint="the row's lease ran out and another worker holds it: its "
                                  "line is that worker's")
