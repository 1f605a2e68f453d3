"""Helpers for tests of a live run: bounded waits, the admin server beside a run, scrapes
parsed by prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import aiohttp
import anyio
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from bulk_engine.admin import AdminServer, serve_admin
from bulk_engine.engine import Engine, RunResult

Families = dict[str, dict[str, Any]]


async def until(cond: Callable[[], bool], *, timeout: float = 30.0, what: str = "it") -> None:
    """Bounded polling of an in-process condition (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


async def scrape(server: AdminServer | str) -> tuple[str, Families]:
    """GET /metrics; the text and its families parsed by prometheus_client's parser."""
    url = server if isinstance(server, str) else server.url
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    families: Families = {}
    for fam in text_string_to_metric_families(text):
        families[fam.name] = {"type": fam.type, "samples": fam.samples}
    return text, families


def value(families: Families, sample: str, **labels: str) -> float:
    """The value of one sample (by its full name and labels); KeyError if absent."""
    for fam in families.values():
        for s in fam["samples"]:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise KeyError(f"{sample} {labels}")


def samples(families: Families, sample: str) -> list[Sample]:
    return [s for fam in families.values() for s in fam["samples"] if s.name == sample]


async def run_with_admin(engine: Engine,
                         body: Callable[[AdminServer, anyio.Event], Awaitable[None]],
                         rows_total: int | None = None) -> RunResult:
    """Run ``engine`` with the admin server; ``body(server, finished)`` runs beside it
    (``finished`` is set when ``Engine.run()`` has returned); the server stays up until
    ``body`` returns, so it can scrape after the run."""
    results: list[RunResult] = []
    finished = anyio.Event()

    async def go() -> None:
        results.append(await engine.run())
        finished.set()

    async with anyio.create_task_group() as tg:
        server = await tg.start(partial(serve_admin, engine, rows_total=lambda: rows_total))
        tg.start_soon(go)
        await body(server, finished)
        await finished.wait()
        tg.cancel_scope.cancel()
    return results[0]
