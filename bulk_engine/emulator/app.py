"""The emulated Case Analysis API as an aiohttp application: routes, gate and handlers.

``create_app`` builds the app around one ``EmulatorState``. Every API call (``POST /case``,
``POST /case/retrieve``) passes the gate middleware first, in this order: injected 503
(``error_rate``, before anything else), ``api-key`` check (401), per-key rate limit (429 with
``Retry-After``); then the handler; then an optional injected stall before the answer leaves.
Handlers turn ``upload.py`` and ``state.py`` results into the answers of the API (``docs/api.md``).
``GET /_emulator/stats``, ``GET /_emulator/submissions`` and ``GET``/``POST /_emulator/limits``
(the per-key cap and rate limit, changeable mid-run for tests and benchmarks) need no key and
inject no fault.
"""

from __future__ import annotations

import json
import math
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from aiohttp import web

from bulk_engine.clock import Clock, MonotonicClock
from bulk_engine.emulator.config import EmulatorConfig
from bulk_engine.emulator.state import (
    EmulatorState,
    FaultKind,
    IdempotencyConflict,
    Run,
    Submission,
)
from bulk_engine.emulator.upload import UploadError, read_upload

__all__ = ["MAX_IDEMPOTENCY_KEY_LENGTH", "STATE_KEY", "Handler", "create_app"]

STATE_KEY = web.AppKey("emulator_state", EmulatorState)
_KEY_INDEX = web.RequestKey("emulator_key_index", int)
_ENDPOINTS: dict[str, Literal["submit", "poll"]] = {"/case": "submit", "/case/retrieve": "poll"}
MAX_IDEMPOTENCY_KEY_LENGTH = 255

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Abort(Exception):
    """Raised by a handler to cut the connection instead of answering (an injected fault)."""

    def __init__(self, kind: FaultKind, *, reset: bool) -> None:
        super().__init__(kind)
        self.kind: FaultKind = kind
        self.reset = reset


def create_app(config: EmulatorConfig, *, clock: Clock | None = None) -> web.Application:
    """Build the emulator application; its state is ``app[STATE_KEY]``.

    ``clock`` (default: ``MonotonicClock``) drives processing times, expiry, rate buckets,
    stalls and the waits of sync mode; a ``FakeClock`` makes all of them test-controlled.
    """
    app = web.Application(middlewares=[_api_gate])
    app[STATE_KEY] = EmulatorState(config, clock=clock or MonotonicClock())
    app.router.add_post("/case", _submit)
    app.router.add_post("/case/retrieve", _retrieve)
    app.router.add_get("/_emulator/stats", _stats)
    app.router.add_get("/_emulator/submissions", _submissions)
    app.router.add_get("/_emulator/limits", _get_limits)
    app.router.add_post("/_emulator/limits", _set_limits)
    return app


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"detail": detail}, status=status, headers=headers)


@web.middleware
async def _api_gate(request: web.Request, handler: Handler) -> web.StreamResponse:
    endpoint = _ENDPOINTS.get(request.path)
    if endpoint is None or request.method != "POST":
        return await handler(request)
    state = request.app[STATE_KEY]
    state.request_started()
    status = "500"
    try:
        response = await _gate(request, handler, state)
        status = str(response.status)
        return response
    except _Abort as abort:
        status = "aborted"
        state.count_fault(abort.kind)
        _cut_connection(request, reset=abort.reset)
        # Never reaches the client: aiohttp finds the transport closed and drops it quietly.
        return web.Response(status=204)
    except web.HTTPException as exc:
        status = str(exc.status)
        raise
    finally:
        state.request_finished(endpoint, status)


async def _gate(request: web.Request, handler: Handler, state: EmulatorState) -> web.StreamResponse:
    config = state.config
    if state.roll(config.error_rate):
        state.count("errors_injected")
        return _error(503, "service temporarily unavailable", {"Retry-After": "1"})
    api_key = request.headers.get("api-key")
    key_index = state.authenticate(api_key)
    if key_index is None:
        detail = "missing api-key header" if api_key is None else "invalid api-key"
        return _error(401, detail)
    wait = state.take_rate_token(key_index)
    if wait > 0:
        state.count("rate_limited")
        retry_after = max(1, math.ceil(wait - 1e-9))
        return _error(
            429,
            f"rate limit exceeded: at most {config.rate_limit:g} requests/s "
            f"(burst {config.burst}) per key",
            {"Retry-After": str(retry_after)},
        )
    request[_KEY_INDEX] = key_index
    response = await handler(request)
    if state.roll(config.stall_rate):
        state.count_fault("stall")
        await state.clock.sleep(config.stall_seconds)
    return response


def _cut_connection(request: web.Request, *, reset: bool) -> None:
    """Close the client's connection: with a TCP RST when ``reset``, else a plain close (FIN)."""
    transport = request.transport
    if transport is None:
        return
    if reset:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    else:
        transport.close()


async def _submit(request: web.Request) -> web.StreamResponse:
    """``POST /case``: stream the form, create (or replay) the run, answer 202 or the result."""
    state = request.app[STATE_KEY]
    config = state.config
    key_index = request[_KEY_INDEX]
    if state.roll(config.reset_before_body_rate):
        raise _Abort("reset_before_body", reset=True)

    idempotency_key = request.headers.get("Idempotency-Key")
    if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_LENGTH:
        return _error(
            400, f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} characters long"
        )
    try:
        upload = await read_upload(
            request,
            max_bytes=config.max_upload_bytes,
            on_bytes=lambda n: state.count("bytes_received", n),
        )
    except UploadError as exc:
        return _error(exc.status, exc.detail)
    try:
        submission = state.submit(key_index, upload, idempotency_key)
    except IdempotencyConflict:
        return _error(422, "Idempotency-Key already used for a different submission")

    if state.roll(config.drop_after_create_rate):
        _record_answer(submission, "aborted")
        raise _Abort("drop_after_create", reset=False)
    run = submission.run
    if upload.payload.asynchronous:
        token = state.issue_token(run.run_id, key_index)
        response = web.json_response({"retrieve_token": token}, status=202)
    else:
        delay = run.finished_at - state.clock.now()
        if delay > 0:
            await state.clock.sleep(delay)
        response = _final_answer(state, run)
    _record_answer(submission, response.status)
    return response


def _record_answer(submission: Submission, status: int | str) -> None:
    if submission.http_status is None:
        submission.http_status = status


def _final_answer(state: EmulatorState, run: Run) -> web.Response:
    """The answer for a run that is no longer queued or running."""
    status = state.run_status(run)
    if status == "completed":
        return web.json_response(run.result())
    if status == "failed":
        return _error(500, "the folder failed and produced no result")
    return _error(404, "run not found or result expired")


async def _retrieve(request: web.Request) -> web.StreamResponse:
    """``POST /case/retrieve``: the status table of ``docs/api.md`` (200/202/401/403/404/500)."""
    state = request.app[STATE_KEY]
    key_index = request[_KEY_INDEX]
    try:
        body = json.loads(await request.text())
    except ValueError:  # includes UnicodeDecodeError and JSONDecodeError
        return _error(401, "invalid retrieve_token: the body is not a JSON object")
    token = body.get("retrieve_token") if isinstance(body, dict) else None
    if not isinstance(token, str):
        return _error(401, "invalid retrieve_token: missing or not a string")
    opened = state.open_token(token)
    if opened is None:
        return _error(401, "invalid retrieve_token")
    run_id, key_hash = opened
    if key_hash != state.key_hash(key_index):
        return _error(403, "the retrieve_token belongs to another user")
    run = state.runs.get(run_id)
    if run is None:
        return _error(404, "run not found or result expired")
    status = state.run_status(run)
    if status in ("queued", "running"):
        return _maybe_malformed(state, {"status": "processing", "run_id": run_id}, 202)
    if status == "completed":
        return _maybe_malformed(state, run.result(), 200)
    return _final_answer(state, run)


def _maybe_malformed(state: EmulatorState, body: dict[str, Any], status: int) -> web.Response:
    """Answer ``body`` as JSON, or (``malformed_json_rate``) a truncated, invalid copy of it."""
    text = json.dumps(body)
    if state.roll(state.config.malformed_json_rate):
        state.count_fault("malformed_json")
        # A strict prefix of a JSON object never closes its brace, so it never parses.
        text = text[: max(1, len(text) // 2)]
    return web.Response(text=text, status=status, content_type="application/json")


async def _stats(request: web.Request) -> web.Response:
    """``GET /_emulator/stats``: the counters of ``EmulatorState.stats``."""
    return web.json_response(request.app[STATE_KEY].stats())


async def _submissions(request: web.Request) -> web.Response:
    """``GET /_emulator/submissions``: every submission that created a run, oldest first."""
    return web.json_response({"submissions": request.app[STATE_KEY].submissions_json()})


_LIMIT_FIELDS = ("max_parallel_analyses", "rate_limit", "burst")


async def _get_limits(request: web.Request) -> web.Response:
    """``GET /_emulator/limits``: the per-key cap, rate limit and burst in force."""
    return web.json_response(request.app[STATE_KEY].limits())


async def _set_limits(request: web.Request) -> web.Response:
    """``POST /_emulator/limits``: change some of them mid-run, e.g. ``{"max_parallel_analyses":
    5}`` (another job took slots of the key) or ``{"rate_limit": null}``; answers the limits now
    in force, or 400 for an unknown name or an invalid value (nothing changes then)."""
    state = request.app[STATE_KEY]
    try:
        body = json.loads(await request.text())
    except ValueError:
        return _error(400, "the body must be a JSON object")
    if not isinstance(body, dict):
        return _error(400, "the body must be a JSON object")
    unknown = sorted(set(body) - set(_LIMIT_FIELDS))
    if unknown:
        return _error(400, f"unknown limit(s): {', '.join(unknown)}; known: "
                           f"{', '.join(_LIMIT_FIELDS)}")
    try:
        state.set_limits(**body)
    except (TypeError, ValueError) as exc:
        return _error(400, str(exc))
    return web.json_response(state.limits())
