"""Control of a running engine without a restart: pause, resume, drain, and live tunables.

Where it sits::

    SIGUSR1, SIGHUP (runner: install_signal_handlers) ─┐
    POST /control/* (admin.py)                         ─┴▶ Engine.pause / resume / drain /
                                                           apply_settings
        Engine ─▶ SubmitGate (submitters wait while paused, drop tickets while draining; the
                  producer stops reading rows when draining)
               ─▶ the limiter (retune_limiter), the upload slots, the poll policy, the
                  outstanding bound (OutstandingSlots), the mass-failure window, the stuck watch

What each does:

- **pause**: no new upload starts (a submitter waits right before its request would go out);
  polls go on, so no result is lost to the 60-minute expiry. **resume** undoes it.
- **drain**: one way. No new folder is sent (tickets already handed to the submitters are
  withdrawn: their rows stay as they were in the journal and the rerun sends them; a dead
  token's resubmission is withdrawn the same way), every token already accepted is polled to
  its end and its line written, then the run ends as usual (exit 0, or 2 if a row failed).
- **apply_settings**: new values for :data:`TUNABLES`, validated through ``Settings`` as a
  whole first (a bad value changes nothing), then applied live. SIGHUP re-reads ``--config``
  (:class:`ConfigReloader`) and applies its tunables the same way; a bad file is logged and
  the old values are kept.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Protocol

from bulk_engine.config import Settings, override
from bulk_engine.errors import ConfigError
from bulk_engine.logs import get_logger
from bulk_engine.ratelimit import RateLimiter

__all__ = [
    "TUNABLES",
    "ConfigReloader",
    "ControlStatistics",
    "Controllable",
    "OutstandingSlots",
    "SubmitGate",
    "changed_settings",
    "install_signal_handlers",
    "reload_tunables",
    "retune_limiter",
    "tunable_values",
]

log = get_logger()

# The settings a running engine takes without a restart (SIGHUP, POST /control/settings).
TUNABLES = (
    "rate_limit", "burst", "concurrency", "poll_min", "poll_max", "max_outstanding",
    "max_failure_rate", "failure_window", "stuck_factor",
)


def tunable_values(settings: Settings) -> dict[str, Any]:
    """The tunables of ``settings``, by name (what a control answer shows: no secret)."""
    return {name: getattr(settings, name) for name in TUNABLES}


def changed_settings(current: Settings, values: Mapping[str, Any], *, source: str) -> Settings:
    """``current`` with ``values`` (tunables only), validated as a whole; ConfigError naming
    the setting and ``source`` otherwise."""
    fixed = sorted(set(values) - set(TUNABLES))
    if fixed:
        raise ConfigError(f"{', '.join(fixed)} cannot change while the run goes (from {source}); "
                          f"these can: {', '.join(TUNABLES)}")
    return override(current, values, source=source)


@dataclass(frozen=True, slots=True)
class ControlStatistics:
    """The control state of a run and the live values of its tunables."""

    paused: bool = False
    draining: bool = False
    rate_limit: float = 0.0  # the limiter's ceiling now (calls per second)
    burst: int = 0
    concurrency: int = 0  # upload slots now
    outstanding_limit: int = 0  # the outstanding window's bound now
    withdrawn: int = 0  # tickets not sent because of a drain (the rerun sends them)
    settings_applied: int = 0  # successful apply_settings calls (SIGHUP, /control/settings)
    settings_refused: int = 0  # refused ones (bad values, bad file): nothing changed


class Controllable(Protocol):
    """The control surface of a run (``Engine``), as signals and the admin server see it."""

    @property
    def settings(self) -> Settings: ...

    def pause(self) -> bool: ...

    def resume(self) -> bool: ...

    def drain(self) -> bool: ...

    def apply_settings(self, values: Mapping[str, Any], *,
                       source: str = ...) -> dict[str, list[Any]]: ...

    def refuse_settings(self, error: str, *, source: str) -> None: ...

    def control_state(self) -> dict[str, Any]: ...


# ---- the gate of new submissions ------------------------------------------------------------


class SubmitGate:
    """Whether a new submission may go: open, paused (it waits) or draining (it is dropped)."""

    def __init__(self) -> None:
        self._paused = False
        self._draining = False
        self._changed: asyncio.Event | None = None
        self.waiting = 0  # submissions waiting while paused

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def draining(self) -> bool:
        return self._draining

    def pause(self) -> bool:
        """Hold new submissions; True if this changed anything."""
        changed = not self._paused and not self._draining
        self._paused = True
        return changed

    def resume(self) -> bool:
        """Let new submissions go again; True if they were paused."""
        changed = self._paused and not self._draining
        self._paused = False
        self._notify()
        return changed

    def drain(self) -> bool:
        """No new submission from now on, for good; True the first time."""
        changed = not self._draining
        self._draining = True
        self._notify()
        return changed

    async def admit(self) -> bool:
        """Wait while paused; then True if the submission may go, False when draining."""
        while self._paused and not self._draining:
            if self._changed is None:
                self._changed = asyncio.Event()
            self.waiting += 1
            try:
                await self._changed.wait()
            finally:
                self.waiting -= 1
        return not self._draining

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None


# ---- the outstanding bound ------------------------------------------------------------------


class OutstandingSlots:
    """The outstanding window's bound: a counting semaphore whose limit may change while
    callers wait (lowering it evicts nobody; raising it wakes waiters at once).

    The self-tuning work replaces this with its adaptive window; the engine reads the bound
    through ``Engine.outstanding_limit()`` and sets it through ``set_limit``.
    """

    def __init__(self, limit: int) -> None:
        self._limit = _check_limit(limit)
        self._in_use = 0
        self._changed: asyncio.Event | None = None

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def in_use(self) -> int:
        return self._in_use

    def set_limit(self, limit: int) -> None:
        self._limit = _check_limit(limit)
        self._notify()

    async def acquire(self) -> None:
        while self._in_use >= self._limit:
            if self._changed is None:
                self._changed = asyncio.Event()
            await self._changed.wait()
        self._in_use += 1

    def release(self) -> None:
        if self._in_use <= 0:
            raise RuntimeError("release() without a matching acquire()")
        self._in_use -= 1
        self._notify()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None


def _check_limit(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"limit must be an integer >= 1, got {value!r}")
    return value


# ---- the rate limiter -----------------------------------------------------------------------


def retune_limiter(limiter: RateLimiter, *, rate: float | None, burst: int) -> None:
    """Give the run's limiter a new ceiling and burst, effective now
    (``RateLimiter.reconfigure``: a run slowed by 429s stays slowed in proportion)."""
    limiter.reconfigure(rate=rate, burst=burst)


# ---- SIGHUP and SIGUSR1 ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigReloader:
    """How SIGHUP re-reads the settings: ``load`` (CLI > environment > ``--config`` file, the
    precedence of the start) and the tunables the file cannot change because a flag or a
    variable sets them (``pinned``: named in the log so an edit that seems ignored is not)."""

    load: Callable[[], Settings]
    pinned: frozenset[str] = frozenset()


def reload_tunables(target: Controllable, reloader: ConfigReloader | None) -> bool:
    """SIGHUP: re-read the settings and apply their tunables; True if they were applied.

    A file that cannot be read or holds a bad value is logged (``config_reload_failed``) and
    counted, and the old values are kept.
    """
    if reloader is None:
        log.warning("config_reload_skipped", hint="no --config file (or BULK_ENGINE_CONFIG): "
                                                  "nothing to reload")
        return False
    try:
        fresh = reloader.load()
        current = target.settings
        target.apply_settings(tunable_values(fresh), source="SIGHUP")
    except ConfigError as exc:
        target.refuse_settings(str(exc), source="SIGHUP")
        return False
    fixed = [f.name for f in fields(Settings)
             if f.name not in TUNABLES and getattr(fresh, f.name) != getattr(current, f.name)]
    if fixed:
        log.warning("config_reload_needs_restart", settings=fixed,
                    hint="only these change live: " + ", ".join(TUNABLES))
    pinned = sorted(reloader.pinned & set(TUNABLES))
    if pinned:
        log.info("config_reload_pinned", settings=pinned,
                 hint="set on the command line or in the environment: the file cannot "
                      "change them")
    return True


def install_signal_handlers(loop: asyncio.AbstractEventLoop, target: Controllable,
                            reloader: ConfigReloader | None) -> None:
    """SIGUSR1 drains the run, SIGHUP reloads its tunables (SIGINT/SIGTERM stay the
    runner's). The handlers go when the loop closes."""

    def on_usr1() -> None:
        log.warning("drain_requested", signal="SIGUSR1")
        target.drain()

    loop.add_signal_handler(signal.SIGUSR1, on_usr1)
    loop.add_signal_handler(signal.SIGHUP, reload_tunables, target, reloader)
