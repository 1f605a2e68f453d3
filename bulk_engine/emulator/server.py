"""Serving the emulator in-process: ``run_emulator`` starts it on a free port for tests and demos.

It wires ``app.create_app`` into an aiohttp ``AppRunner`` (with the profile's keep-alive timeout)
and a ``TCPSite``, optionally over TLS, and yields an ``Emulator`` handle: the base URL to point a
client at, and the live state for assertions. The CLI (``cli.py``) uses it too.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from bulk_engine.clock import Clock
from bulk_engine.emulator.app import STATE_KEY, create_app
from bulk_engine.emulator.config import EmulatorConfig
from bulk_engine.emulator.state import EmulatorState

__all__ = ["Emulator", "run_emulator"]


@dataclass(frozen=True)
class Emulator:
    """A running emulator: where to reach it and what it has seen."""

    base_url: str
    state: EmulatorState
    config: EmulatorConfig

    def stats(self) -> dict[str, Any]:
        """The same counters as ``GET /_emulator/stats``."""
        return self.state.stats()


@asynccontextmanager
async def run_emulator(
    config: EmulatorConfig | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    ssl_context: ssl.SSLContext | None = None,
    clock: Clock | None = None,
    shutdown_timeout: float = 1.0,
) -> AsyncIterator[Emulator]:
    """Serve the emulator on ``host:port`` (port 0: a free one) until the block exits.

    ``ssl_context`` (a server context, e.g. from trustme) switches the base URL to https.
    ``clock`` is passed to ``create_app``. On exit, requests still in progress get
    ``shutdown_timeout`` seconds to finish before they are cancelled.
    """
    config = config or EmulatorConfig()
    app = create_app(config, clock=clock)
    runner = web.AppRunner(
        app,
        keepalive_timeout=config.keepalive_timeout,
        shutdown_timeout=shutdown_timeout,
        access_log=None,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
        bound_port = runner.addresses[0][1]
        scheme = "https" if ssl_context is not None else "http"
        url_host = f"[{host}]" if ":" in host else host
        yield Emulator(
            base_url=f"{scheme}://{url_host}:{bound_port}",
            state=app[STATE_KEY],
            config=config,
        )
    finally:
        await runner.cleanup()
