"""No API call for a row this worker may no longer own: the lease guard around the governor.

Where it sits: with ``--db`` each API key's ``CaseClient`` is given a :class:`GuardedLimiter`,
the key's shared ``Governor`` behind a :class:`LeaseGuard`::

    Submitter / Poller ─▶ CaseClient ─acquire─▶ GuardedLimiter ─▶ LeaseGuard.ready()
                                                      └─▶ Governor (a slot on the database clock)

Before a call goes, and again once its slot is granted:

* while this worker's leases are not surely current (``LeaseKeeper.valid()``: a renewal could
  not reach the database, or the process was paused), every call waits (``api_calls_held``
  is logged once, ``api_calls_resumed`` when they go again);
* once a renewal got through after the horizon had passed (``LeaseKeeper.lapses``), some leases
  may have run out and been claimed by others: the backend keeps only the ones the database
  still gives this worker (``RunStore.held``) before any call goes;
* a slot granted much later than it was due (the process was stopped while it slept) is not
  used: the call asks for a fresh one, so a resumed process does not add its stale slots to
  the other workers' calls;
* a poll names its row (:meth:`LeaseGuard.polling`): a row no longer held raises
  ``backend.RowLost`` instead of calling (a submit is fenced by ``mark_submitting``, right
  after its slot and before its request).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import anyio

from bulk_engine.backend import RowLost
from bulk_engine.clock import Clock
from bulk_engine.logs import get_logger
from bulk_engine.pg.backend import PgBackend
from bulk_engine.pg.governor import Governor, Grant
from bulk_engine.pg.rows import LeaseKeeper, RunStore
from bulk_engine.ratelimit import PRIORITY_SUBMIT

__all__ = ["STALE_GRANT_S", "GuardedLimiter", "LeaseGuard"]

log = get_logger()

#: A granted slot used this much later than it was due is dropped (the process was stopped).
STALE_GRANT_S = 1.0

_polling: ContextVar[str | None] = ContextVar("bulk_engine_pg_polling", default=None)


class LeaseGuard:
    """Holds this worker's API calls while its leases may have lapsed (see the module doc)."""

    def __init__(self, store: RunStore, keeper: LeaseKeeper, backend: PgBackend, *,
                 clock: Clock) -> None:
        self.store = store
        self.keeper = keeper
        self.backend = backend
        self.clock = clock
        self._lapses_seen = 0
        self._held = False
        self._lock = anyio.Lock()
        self.holds = 0  # times calls were held
        self.pruned = 0  # leases let go after a lapse
        self.stale_grants = 0

    def current(self) -> bool:
        """True when a call may go now: leases surely current, any lapse dealt with."""
        return self.keeper.valid() and self.keeper.lapses == self._lapses_seen

    async def ready(self) -> None:
        """Return once a call may go (at once in the usual case)."""
        while not self.current():
            if not self.keeper.valid():
                if not self._held:
                    self._held = True
                    self.holds += 1
                    log.warning("api_calls_held", worker=self.keeper.worker,
                                hint="this worker's leases may have run out (the database did "
                                     "not answer its renewals, or it was paused): no API call "
                                     "until a renewal gets through")
                await self.keeper.wait_valid()
                continue
            await self._prune()
        if self._held:
            self._held = False
            log.warning("api_calls_resumed", worker=self.keeper.worker,
                        rows_kept=self.backend.leases)

    async def _prune(self) -> None:
        async with self._lock:
            lapses = self.keeper.lapses
            if lapses == self._lapses_seen:
                return
            held = await self.store.held(self.keeper.worker)
            lost = self.backend.prune(held)
            self.pruned += lost
            self._lapses_seen = lapses
            if lost:
                log.warning("leases_pruned", worker=self.keeper.worker, rows_lost=lost,
                            rows_kept=len(held),
                            hint="rows other workers took over meanwhile are dropped here")

    @contextmanager
    def polling(self, key: str) -> Iterator[None]:
        """The calls made inside are for row ``key`` (the poll's task): checked when granted."""
        token = _polling.set(key)
        try:
            yield
        finally:
            _polling.reset(token)

    def check_row(self) -> None:
        """Raise RowLost when the calling poll's row is no longer held here."""
        key = _polling.get()
        if key is not None and not self.backend.holds(key):
            raise RowLost(key)

    def fresh(self, grant: Grant) -> bool:
        """False for a slot used much later than it was due (counted, logged once)."""
        if grant.due is None or self.clock.now() - grant.due <= STALE_GRANT_S:
            return True
        self.stale_grants += 1
        if self.stale_grants == 1:
            log.warning("stale_rate_slot", late_s=round(self.clock.now() - grant.due, 1),
                        hint="the process was paused while it waited for a slot: a fresh "
                             "one is asked for instead")
        return False


class GuardedLimiter:
    """The client's limiter with ``--db``: the key's governor, behind this worker's guard."""

    def __init__(self, governor: Governor, guard: LeaseGuard) -> None:
        self.governor = governor
        self.guard = guard

    @property
    def current_rate(self) -> float:
        return self.governor.current_rate

    @property
    def paused_until(self) -> float:
        return self.governor.paused_until

    def pause_for(self, seconds: float) -> None:
        self.governor.pause_for(seconds)

    def on_throttled(self) -> None:
        self.governor.on_throttled()

    def on_success(self) -> None:
        self.governor.on_success()

    async def acquire(self, priority: int = PRIORITY_SUBMIT) -> Grant:
        """A slot of the key's shared rate, granted only while the call may go."""
        while True:
            await self.guard.ready()
            self.guard.check_row()
            grant = await self.governor.acquire(priority)
            if self.guard.current() and self.guard.fresh(grant):
                self.guard.check_row()
                return grant
