"""The admin server of a run: Prometheus ``/metrics`` and the ``/control/*`` requests.

Where it sits: the runner starts :func:`serve_admin` in the run's task group, on the run's
event loop, when ``--metrics-port`` is given; it stops with the run. Requests read the engine
(``metrics.py``) or call its control surface (``Engine.pause``, ``resume``, ``drain``,
``apply_settings``, the same methods SIGUSR1 and SIGHUP call)::

    GET  /metrics            Prometheus text format, read at scrape time
    GET  /control            {"paused", "draining", "settings": {tunables}}
    POST /control/pause      no new upload starts (polls go on)
    POST /control/resume     uploads start again
    POST /control/drain      no new folder; every accepted token retrieved; then the run ends
    POST /control/settings   a JSON object of tunables, applied live (400: nothing changed)

Who may control the run: the server listens on ``127.0.0.1`` by default. Bound to an address
that is not loopback it requires a token (``BULK_ENGINE_CONTROL_TOKEN``) and refuses to start
without one; when a token is set, every ``/control`` request must carry it
(``Authorization: Bearer TOKEN``), compared in constant time. A request with an ``Origin``
header (a web page's, which a browser would send from any site) is refused too. Refused
requests are logged (``control_refused``) and change nothing. ``/metrics`` needs no token: it
holds counts, never a row id, a retrieve token or the key.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import anyio.abc
from aiohttp import web

from bulk_engine.control import Controllable
from bulk_engine.errors import ConfigError
from bulk_engine.logs import get_logger
from bulk_engine.metrics import CONTENT_TYPE, EngineCollector, MetricsSource, render

__all__ = [
    "CONTROL_TOKEN_ENV",
    "AdminServer",
    "AdminTarget",
    "admin_app",
    "control_token",
    "is_loopback",
    "serve_admin",
]

log = get_logger()

CONTROL_TOKEN_ENV = "BULK_ENGINE_CONTROL_TOKEN"
_MAX_BODY = 64 * 1024


class AdminTarget(MetricsSource, Controllable, Protocol):
    """What the admin server serves: a run's figures and its control surface (``Engine``)."""


@dataclass(frozen=True, slots=True)
class AdminServer:
    """Where the admin server listens."""

    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost: it may resolve anywhere


def control_token(host: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The token ``/control`` requests must carry (None: no token, loopback only).

    Raises ConfigError when ``host`` is not loopback and no token is set: anyone who reaches
    the address could pause or drain the run.
    """
    env = os.environ if environ is None else environ
    token = env.get(CONTROL_TOKEN_ENV) or None
    if token is None and not is_loopback(host):
        raise ConfigError(
            f"--metrics-host {host} is not a loopback address: set {CONTROL_TOKEN_ENV} (a long "
            "random string) so that only holders of it can pause, drain or retune the run, or "
            "keep the default 127.0.0.1")
    return token


def admin_app(engine: AdminTarget, *, token: str | None,
              rows_total: Callable[[], int | None] | None = None) -> web.Application:
    """The aiohttp application of the admin server (its routes are in the module docstring)."""
    collector = EngineCollector(engine, rows_total=rows_total)
    expected = token.encode() if token is not None else None

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=render(collector), headers={"Content-Type": CONTENT_TYPE})

    def control(action: Callable[[web.Request], Awaitable[web.Response]]
                ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def guarded(request: web.Request) -> web.Response:
            refused = _refusal(request, expected)
            if refused is not None:
                status, reason = refused
                log.warning("control_refused", path=request.path, remote=request.remote,
                            reason=reason)
                return web.json_response({"error": reason}, status=status)
            return await action(request)

        return guarded

    def state(**extra: Any) -> web.Response:
        return web.json_response({**extra, **engine.control_state()})

    async def show(request: web.Request) -> web.Response:
        return state()

    async def pause(request: web.Request) -> web.Response:
        return state(changed=engine.pause())

    async def resume(request: web.Request) -> web.Response:
        return state(changed=engine.resume())

    async def drain(request: web.Request) -> web.Response:
        log.warning("drain_requested", source="POST /control/drain", remote=request.remote)
        return state(changed=engine.drain())

    async def settings(request: web.Request) -> web.Response:
        source = "POST /control/settings"
        try:
            body = json.loads(await request.text() or "null")
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict) or not body:
            error = 'send a JSON object of settings, e.g. {"rate_limit": 20}'
            engine.refuse_settings(error, source=source)
            return web.json_response({"error": error}, status=400)
        try:
            changed = engine.apply_settings(body, source=source)
        except ConfigError as exc:  # logged and counted by the engine
            return web.json_response({"error": str(exc)}, status=400)
        return state(changed=changed)

    app = web.Application(client_max_size=_MAX_BODY)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/control", control(show))
    app.router.add_post("/control/pause", control(pause))
    app.router.add_post("/control/resume", control(resume))
    app.router.add_post("/control/drain", control(drain))
    app.router.add_post("/control/settings", control(settings))
    return app


def _refusal(request: web.Request, expected: bytes | None) -> tuple[int, str] | None:
    """Why a /control request is refused ((HTTP status, reason)), or None to serve it."""
    if request.headers.get("Origin") is not None:
        return 403, "requests from web pages (with an Origin header) are refused"
    if expected is None:
        return None
    given = request.headers.get("Authorization", "")
    scheme, _, credentials = given.partition(" ")
    # compare_digest on the bytes: the time taken does not tell how much of a guess was right.
    if scheme.lower() != "bearer" or not hmac.compare_digest(credentials.strip().encode(),
                                                             expected):
        return 401, f"missing or wrong token (Authorization: Bearer ${CONTROL_TOKEN_ENV})"
    return None


async def serve_admin(
    engine: AdminTarget,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    rows_total: Callable[[], int | None] | None = None,
    environ: Mapping[str, str] | None = None,
    task_status: anyio.abc.TaskStatus[AdminServer] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin app until cancelled: ``await task_group.start(serve_admin, engine,
    ...)`` gives the :class:`AdminServer` (port 0 picks a free port). ConfigError when a token
    is needed and missing, or the address cannot be bound."""
    token = control_token(host, environ)
    runner = web.AppRunner(admin_app(engine, token=token, rows_total=rows_total),
                           access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(f"--metrics-port {port} on {host}: cannot listen there "
                              f"({exc.strerror or exc})") from None
        server = AdminServer(host, int(runner.addresses[0][1]))
        log.info("admin_listening", url=server.url, metrics=f"{server.url}/metrics",
                 control_token=token is not None)
        task_status.started(server)
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await runner.cleanup()
