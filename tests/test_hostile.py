"""A hostile API of the test's own: answers that look like success but are not, and outages.

The emulator is faithful; these answers come from a tiny aiohttp server written here, whose
two endpoints answer whatever each test scripts: a gateway's own 200 to an async submit, a
retrieve 200 that is not a result (``[1,2,3]``, HTML, a result without the requested keys),
502 forever, a retrieve that never answers, and an API that is not there at all. The engine
must never write ``completed`` for such an answer, must not stall for hours, and must not turn
an outage into failed lines (issue 10, defects 2, 4 and 5).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from bulk_engine.emulator import EmulatorConfig, run_emulator
from bulk_engine.engine import Engine, RunResult
from bulk_engine.errors import ApiUnavailableError
from bulk_engine.journal import Journal

from archive_factory import make_archive
from conftest import API_KEY, engine_settings, expected_for_folder, read_lines

pytestmark = pytest.mark.timeout(30)

TOKEN = "gAAAAABhostile-token-0000000000000000000000"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Hostile:
    """The server's script and what it saw."""

    submit: Handler
    retrieve: Handler
    submits: int = 0
    retrieves: int = 0
    tokens_issued: list[str] = field(default_factory=list)


@asynccontextmanager
async def hostile_api(submit: Handler, retrieve: Handler) -> AsyncIterator[tuple[str, Hostile]]:
    """Serve ``submit`` and ``retrieve`` on a free port; yield (base URL, Hostile)."""
    h = Hostile(submit, retrieve)

    async def on_submit(request: web.Request) -> web.StreamResponse:
        h.submits += 1
        await request.read()  # take the whole upload, as a real server does
        return await h.submit(request)

    async def on_retrieve(request: web.Request) -> web.StreamResponse:
        h.retrieves += 1
        return await h.retrieve(request)

    app = web.Application()
    app.router.add_post("/case", on_submit)
    app.router.add_post("/case/retrieve", on_retrieve)
    runner = web.AppRunner(app, shutdown_timeout=0.1, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", h
    finally:
        await runner.cleanup()


# ---- scripted answers --------------------------------------------------------------------------


async def token_202(request: web.Request) -> web.StreamResponse:
    return web.json_response({"retrieve_token": TOKEN}, status=202)


async def gateway_200(request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok", "service": "gateway"})


async def list_200(request: web.Request) -> web.StreamResponse:
    return web.json_response([1, 2, 3])


async def html_200(request: web.Request) -> web.StreamResponse:
    return web.Response(text="<html><body>Maintenance</body></html>", content_type="text/html")


async def bad_gateway(request: web.Request) -> web.StreamResponse:
    return web.Response(status=502, text="<html>502 Bad Gateway</html>", content_type="text/html")


async def never_answers(request: web.Request) -> web.StreamResponse:
    await asyncio.Event().wait()  # the server hangs: the client's timeout must fire
    raise AssertionError("unreachable")


async def decision_only_200(request: web.Request) -> web.StreamResponse:
    """A well-formed result, but only ``decision``: the answer to another request."""
    return web.json_response({"decision": {"status": "approved", "status_fraud": "low",
                                           "status_validation": "compliant"}})


def fast(base_url: str, out: Path, **kw: Any) -> Any:
    """Time scaled down, ratios kept: an outage is declared after 0.1 s of failing calls, well
    inside one call's retries (4 retries, 0.05–0.2 s backoff), as the defaults' 10 s are inside
    the ~1 minute of 8 retries."""
    kw.setdefault("max_retries", 4)
    kw.setdefault("retry_base", 0.05)
    kw.setdefault("retry_cap", 0.2)
    kw.setdefault("outage_after", 0.1)
    return engine_settings(base_url, out, max_failure_rate=1.0, **kw)


async def run(base_url: str, manifest: Path, out: Path, **kw: Any) -> RunResult:
    return await Engine(fast(base_url, out, **kw), manifest).run()


@asynccontextmanager
async def in_front_of_the_emulator(
    override: Callable[[str, int, web.Request], Awaitable[web.StreamResponse | None]],
) -> AsyncIterator[tuple[str, Hostile, str]]:
    """A hostile front: every call goes on to a real emulator unless ``override(endpoint, n,
    request)`` answers instead (``n``: that endpoint's call number, from 0). Yields (URL of the
    front, its Hostile record, the emulator's URL)."""
    cfg = EmulatorConfig(api_keys=(API_KEY,), processing_time=(0.01, 0.02))
    async with run_emulator(cfg) as emu:

        async def forward(request: web.Request, path: str) -> web.StreamResponse:
            headers = {"api-key": request.headers["api-key"],
                       "Content-Type": request.headers["Content-Type"]}
            async with aiohttp.ClientSession() as session, session.post(
                    emu.base_url + path, headers=headers, data=await request.read()) as r:
                return web.Response(body=await r.read(), status=r.status,
                                    content_type="application/json")

        def handler(endpoint: str, path: str) -> Handler:
            calls = 0

            async def handle(request: web.Request) -> web.StreamResponse:
                nonlocal calls
                n, calls = calls, calls + 1
                answer = await override(endpoint, n, request)
                return answer if answer is not None else await forward(request, path)

            return handle

        async with hostile_api(handler("submit", "/case"),
                               handler("retrieve", "/case/retrieve")) as (url, h):
            yield url, h, emu.base_url


# ---- answers that are not results --------------------------------------------------------------


async def test_gateway_200_to_every_async_submit_stops_the_run_and_completes_nothing(
    tmp_path: Path,
) -> None:
    """POST /case answered 200 {"status": "ok"} (a gateway's own answer) every time: no row is
    completed; the API counts as broken, so the run stops (exit 1) naming the answer, no row is
    burned, and each submission stayed within its retry budget."""
    manifest = make_archive(tmp_path / "a", 5, seed=1)
    out = tmp_path / "out.jsonl"
    async with hostile_api(gateway_200, token_202) as (url, h):
        res = await run(url, manifest, out)
    assert res.exit_code == 1 and isinstance(res.error, ApiUnavailableError)
    assert "gateway" in str(res.error) and "not the documented answer" in str(res.error)
    assert read_lines(out) == [] and h.retrieves == 0
    assert h.submits <= 5 * 5  # at most 1 + max_retries each


async def test_a_gateway_200_for_one_row_fails_that_row_malformed_response(tmp_path: Path) -> None:
    """One row's POST /case answered 200 {"status": "ok"} every time while the API works for
    the others: that row fails `malformed_response` with a snippet of the body, never
    `completed`; every other row completes with its own result."""
    manifest = make_archive(tmp_path / "a", 6, seed=1)
    out = tmp_path / "out.jsonl"
    victim: list[str] = []  # the first row's Idempotency-Key: stable across its retries

    async def override(endpoint: str, n: int, request: web.Request) -> web.StreamResponse | None:
        if endpoint == "submit":
            key = request.headers["Idempotency-Key"]
            victim[:] = victim or [key]
            if key == victim[0]:
                return await gateway_200(request)
        return None

    async with in_front_of_the_emulator(override) as (url, _, _):
        res = await run(url, manifest, out, concurrency=1)
    lines = {r["id"]: r for r in read_lines(out)}
    failed = [r for r in lines.values() if r["status"] == "failed"]
    assert len(lines) == 6 and res.exit_code == 2 and len(failed) == 1
    bad = failed[0]
    assert bad["result"] is None
    assert bad["error"]["kind"] == "malformed_response" and "gateway" in bad["error"]["message"]
    for row_id, r in lines.items():
        if r is not bad:
            assert r["result"] == expected_for_folder(tmp_path / "a" / r["folder"]), row_id


@pytest.mark.parametrize("answer", [list_200, html_200, decision_only_200],
                         ids=["json-list", "html", "another-requests-result"])
async def test_retrieve_200_that_is_not_this_requests_result_is_refused(
    tmp_path: Path, answer: Handler
) -> None:
    """A retrieve 200 whose body is not an object holding exactly the requested analyse types
    (here decision + share_link) is `malformed_response`, never `completed` — for the one token
    that gets it, while the others complete."""
    manifest = make_archive(tmp_path / "a", 5, seed=2)
    out = tmp_path / "out.jsonl"
    first_token: list[str] = []

    async def override(endpoint: str, n: int, request: web.Request) -> web.StreamResponse | None:
        if endpoint == "retrieve":
            token = (await request.json())["retrieve_token"]
            first_token[:] = first_token or [token]
            if token == first_token[0]:
                return await answer(request)
        return None

    async with in_front_of_the_emulator(override) as (url, _, _):
        res = await run(url, manifest, out, concurrency=1,
                        analyse_type=("decision", "share_link"))
    lines = read_lines(out)
    failed = [r for r in lines if r["status"] == "failed"]
    assert len(lines) == 5 and res.exit_code == 2
    assert [(r["error"]["kind"], r["result"]) for r in failed] == [("malformed_response", None)]
    assert all(set(r["result"]) == {"decision", "share_link"}
               for r in lines if r["status"] == "completed")


# ---- an API that stops answering: stop fast, fail nothing ------------------------------------


@pytest.mark.parametrize("answer", [bad_gateway, html_200, never_answers],
                         ids=["502-forever", "html-200", "never-answers"])
async def test_retrieve_failing_for_everyone_stops_the_run_without_failing_rows(
    tmp_path: Path, answer: Handler
) -> None:
    """Retrieve answering 502 forever, HTML, or nothing at all: the API is declared unhealthy
    (a warning), new uploads stop, and once a token's retries are spent the run stops (exit 1)
    with every token still journaled — nothing failed, nothing stalled for hours."""
    manifest = make_archive(tmp_path / "a", 60, seed=3)
    out = tmp_path / "out.jsonl"
    async with hostile_api(token_202, answer) as (url, h):
        with capture_logs() as logs:
            res = await run(url, manifest, out, poll_timeout=0.3, concurrency=2,
                            rate_limit=40.0, burst=5)
    assert res.exit_code == 1 and isinstance(res.error, ApiUnavailableError)
    assert "unhealthy since" in str(res.error) and "rerun" in str(res.error)
    assert read_lines(out) == []  # no row was burned
    assert any(e["event"] == "api_unhealthy" and e["log_level"] == "warning" for e in logs)
    # New uploads stopped once the API was unhealthy: far from the whole manifest went out.
    assert h.submits < 40
    with Journal.open(tmp_path / "out.jsonl.journal") as j:
        assert j.counts()["submitted"] == h.submits  # every token kept: a rerun polls them


async def test_api_unreachable_from_the_start_fails_no_row_and_a_rerun_completes(
    tmp_path: Path,
) -> None:
    """Nothing listens at the API's address: the run stops (exit 1) with no line written and no
    row flagged a possible duplicate (nothing reached a server); the rerun, with the API back,
    completes every row."""
    manifest = make_archive(tmp_path / "a", 12, seed=4)
    out = tmp_path / "out.jsonl"
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
        res = await run(dead, manifest, out)
    assert res.exit_code == 1 and isinstance(res.error, ApiUnavailableError)
    assert read_lines(out) == []
    with Journal.open(tmp_path / "out.jsonl.journal") as j:
        assert j.submitting_rows() == []  # connect errors: no POST reached anything
    cfg = EmulatorConfig(api_keys=(API_KEY,), processing_time=(0.01, 0.02))
    async with run_emulator(cfg) as emu:
        res2 = await run(emu.base_url, manifest, out)
    lines = read_lines(out)
    assert res2.exit_code == 0 and len(lines) == 12
    assert all(r["status"] == "completed" and not r["possible_duplicate"] for r in lines)


async def test_one_token_failing_alone_fails_its_row_and_a_plain_rerun_retries_it(
    tmp_path: Path,
) -> None:
    """A single token whose retrieve answers 502 while the API is otherwise fine: after its
    retry budget its row fails `server_error` (not final); the others complete. A plain rerun
    (no flag) retries that row, and with the API fixed it completes."""
    manifest = make_archive(tmp_path / "a", 6, seed=5)
    out = tmp_path / "out.jsonl"
    first_token: list[str] = []

    async def override(endpoint: str, n: int, request: web.Request) -> web.StreamResponse | None:
        if endpoint == "retrieve":
            token = (await request.json())["retrieve_token"]
            first_token[:] = first_token or [token]
            if token == first_token[0]:
                return await bad_gateway(request)
        return None

    async with in_front_of_the_emulator(override) as (url, _, emu_url):
        res = await run(url, manifest, out, concurrency=1)
        lines = {r["id"]: r for r in read_lines(out)}
        failed = [r for r in lines.values() if r["status"] == "failed"]
        assert res.exit_code == 2 and len(lines) == 6
        assert [r["error"]["kind"] for r in failed] == ["server_error"]
        res2 = await run(emu_url, manifest, out)
    lines2 = read_lines(out)
    assert res2.exit_code == 0 and len(lines2) == 6  # one line per row, the failed one replaced
    redone = next(r for r in lines2 if r["id"] == failed[0]["id"])
    assert redone["status"] == "completed"
    assert redone["result"] == expected_for_folder(tmp_path / "a" / failed[0]["folder"])
