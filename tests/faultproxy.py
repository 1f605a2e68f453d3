"""An in-process asyncio TCP proxy that injects network faults between the engine and the emulator.

No ``tc netem`` or Toxiproxy here, so faults the emulator's own knobs cannot produce are made at
the TCP level: the proxy forwards bytes both ways and, per *request*, may

- ``RESET_BEFORE_BODY``: RST the client as the request's first bytes arrive (the server sees
  nothing);
- ``RESET_AFTER_BODY``: forward the request, then RST the client as soon as the server starts
  answering (the server did the work; the answer is lost);
- ``STALL``: forward the request and swallow the answer (the client must time out);
- ``TRICKLE``: forward the answer ``trickle_bytes`` at a time, ``trickle_delay`` apart.

It finds request boundaries without parsing HTTP: the engine's aiohttp client never pipelines, so
on one connection client bytes after server bytes start a new request. ``idle_close`` mimics a
server closing an idle keep-alive connection at the very moment the client reuses it: a request
arriving on a connection idle for at least that long is closed (FIN) without being forwarded.

``plan(n)`` gives the fault of the n-th request (0-based, counted across connections in arrival
order), or None to forward it untouched. Counters (``connections``, ``requests``, ``faults``) let
tests compare what was injected with what the engine reports.
"""

from __future__ import annotations

import asyncio
import enum
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from types import TracebackType


class Fault(enum.Enum):
    RESET_BEFORE_BODY = "reset_before_body"
    RESET_AFTER_BODY = "reset_after_body"
    STALL = "stall"
    TRICKLE = "trickle"


Plan = Callable[[int], Fault | None]


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0) instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class _Conn:
    """One client connection and its upstream twin."""

    def __init__(self, proxy: FaultProxy, cr: asyncio.StreamReader, cw: asyncio.StreamWriter,
                 ur: asyncio.StreamReader, uw: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.cr, self.cw, self.ur, self.uw = cr, cw, ur, uw
        self.in_request = False  # client bytes seen since the last server bytes
        self.fault: Fault | None = None  # the fault of the request in progress
        self.last_activity = time.monotonic()
        self.dead = asyncio.Event()

    def kill(self, *, reset: bool) -> None:
        if reset:
            _rst(self.cw)
        else:
            self.cw.close()
        self.uw.transport.abort()
        self.dead.set()

    async def client_to_upstream(self) -> None:
        p = self.proxy
        while data := await self.cr.read(65536):
            if not self.in_request:  # a new request starts
                idle = time.monotonic() - self.last_activity
                self.in_request = True
                if p.idle_close is not None and p.requests_on(self) > 0 and idle >= p.idle_close:
                    p.faults["idle_close"] += 1
                    self.kill(reset=False)
                    return
                self.fault = p.next_fault(self)
                if self.fault is Fault.RESET_BEFORE_BODY:
                    self.kill(reset=True)
                    return
            self.last_activity = time.monotonic()
            self.uw.write(data)
            await self.uw.drain()
        self.uw.close()  # client finished sending: half-close upstream

    async def upstream_to_client(self) -> None:
        p = self.proxy
        while data := await self.ur.read(65536):
            self.in_request = False
            fault = self.fault
            if fault is Fault.RESET_AFTER_BODY:
                self.kill(reset=True)
                return
            if fault is Fault.STALL:
                continue  # swallow the answer; the client must give up on its own
            if fault is Fault.TRICKLE:
                for i in range(0, len(data), p.trickle_bytes):
                    self.cw.write(data[i : i + p.trickle_bytes])
                    await self.cw.drain()
                    await asyncio.sleep(p.trickle_delay)
            else:
                self.cw.write(data)
                await self.cw.drain()
            self.last_activity = time.monotonic()
        self.cw.close()


class FaultProxy:
    """``async with FaultProxy(host, port, plan) as proxy``: forwards 127.0.0.1:proxy.port."""

    def __init__(self, upstream_host: str, upstream_port: int, plan: Plan | None = None, *,
                 trickle_bytes: int = 16, trickle_delay: float = 0.005,
                 idle_close: float | None = None) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.plan: Plan = plan or (lambda n: None)
        self.trickle_bytes = trickle_bytes
        self.trickle_delay = trickle_delay
        self.idle_close = idle_close
        self.connections = 0
        self.requests = 0
        self.faults: Counter[str] = Counter()
        self._per_conn: Counter[int] = Counter()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._conns: set[_Conn] = set()
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests_on(self, conn: _Conn) -> int:
        return self._per_conn[id(conn)]

    def next_fault(self, conn: _Conn) -> Fault | None:
        n = self.requests
        self.requests += 1
        self._per_conn[id(conn)] += 1
        fault = self.plan(n)
        if fault is not None:
            self.faults[fault.value] += 1
        return fault

    async def __aenter__(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self._server is not None
        self._server.close()
        # Kill the connections rather than cancel their handlers: asyncio's stream server
        # reports a cancelled handler task as an error.
        for conn in list(self._conns):
            conn.kill(reset=False)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        conn: _Conn | None = None
        try:
            ur, uw = await asyncio.open_connection(*self.upstream)
            conn = _Conn(self, cr, cw, ur, uw)
            self._conns.add(conn)
            pumps = [asyncio.create_task(conn.client_to_upstream()),
                     asyncio.create_task(conn.upstream_to_client())]
            dead = asyncio.create_task(conn.dead.wait())
            try:
                # Done when both directions ended, or when a fault killed the connection.
                both = asyncio.gather(*pumps, return_exceptions=True)
                await asyncio.wait([both, dead], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (*pumps, dead):
                    t.cancel()
                await asyncio.gather(*pumps, dead, return_exceptions=True)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if conn is not None:
                conn.uw.transport.abort()
                self._conns.discard(conn)
                self._per_conn.pop(id(conn), None)
            cw.transport.abort()
            self._tasks.discard(task)
