"""Injected time: every stage that waits takes a ``Clock`` so tests control time.

``MonotonicClock`` is the real one. ``FakeClock`` is for tests: ``sleep`` parks the caller
until ``advance`` moves time past its deadline, so schedules are asserted exactly, without
sleeping for real.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol

__all__ = [
    "Clock",
    "FakeClock",
    "MonotonicClock",
]


class Clock(Protocol):
    """A source of monotonic time in seconds, and a way to wait on it."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    """The real clock: ``time.monotonic`` and ``asyncio.sleep``."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """A clock that only moves when told to (``advance``); sleepers wake in deadline order."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self.sleeps: list[float] = []  # every requested sleep, for assertions

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + max(0.0, seconds), next(self._seq), fut))
        await fut

    @property
    def next_deadline(self) -> float | None:
        """The earliest time a sleeper waits for, or None."""
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)
        return self._sleepers[0][0] if self._sleepers else None

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking each sleeper whose deadline passes, in order."""
        target = self._now + seconds
        while True:
            deadline = self.next_deadline
            if deadline is None or deadline > target:
                break
            _, _, fut = heapq.heappop(self._sleepers)
            self._now = max(self._now, deadline)
            fut.set_result(None)
            for _ in range(5):  # let the woken task run up to its next wait
                await asyncio.sleep(0)
        self._now = target
        for _ in range(5):
            await asyncio.sleep(0)

    async def run_until_idle(self, limit: float = 1e6) -> None:
        """Jump from deadline to deadline until nobody sleeps (or ``limit`` seconds pass)."""
        start = self._now
        while (d := self.next_deadline) is not None and d - start <= limit:
            await self.advance(max(0.0, d - self._now))
