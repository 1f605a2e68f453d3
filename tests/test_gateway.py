"""A real throttling gateway: nginx ``limit_req`` (429, no Retry-After) in front of the emulator.

nginx runs as a subprocess with a generated config (pid, logs and temp paths in ``tmp_path``,
listening on a free loopback port), keyed on the ``api-key`` header, proxying to the in-process
emulator. Two runs:

- engine ``--rate-limit`` equal to the gateway's rate: under 1 % of calls answered 429;
- engine limit 2x too high: the AIMD limiter (``ratelimit.py``) backs off on the first 429s,
  429s fade over the run, and every row still completes with its own result.

Skipped when nginx is not installed, except under ``CI=true`` where it fails: CI installs nginx
(``.ci/run``) and must not silently skip the only real-gateway test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bulk_engine.emulator import EmulatorConfig, run_emulator
from bulk_engine.engine import Engine, RunResult

from archive_factory import make_archive
from conftest import API_KEY, engine_settings, expected_for_folder, read_lines

pytestmark = [pytest.mark.nginx, pytest.mark.timeout(60)]

GATEWAY_RATE = 50  # requests per second per key
GATEWAY_BURST = 10
ROWS = 100

CONF = """
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
{user}
events {{ worker_connections 512; }}
http {{
    log_format gw '$msec $status $request_uri';
    access_log {tmp}/access.log gw;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    limit_req_zone $http_api_key zone=perkey:1m rate={rate}r/s;
    upstream emulator {{
        server 127.0.0.1:{upstream};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 512m;
        location / {{
            limit_req zone=perkey burst={burst} nodelay;
            limit_req_status 429;
            proxy_pass http://emulator;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
        }}
    }}
}}
"""


NGINX_PATHS = ("/usr/sbin/nginx", "/usr/local/sbin/nginx")  # often not on a user's PATH


def _nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (p for p in NGINX_PATHS if os.access(p, os.X_OK)), None)
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("nginx is not installed, and CI must run the gateway test (.ci/run)")
        pytest.skip("nginx is not installed")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_conf(tmp: Path, upstream_port: int) -> tuple[Path, int]:
    tmp.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    user = "user root;" if os.geteuid() == 0 else ""  # workers must write tmp as root did
    conf = tmp / "nginx.conf"
    conf.write_text(CONF.format(tmp=tmp, user=user, rate=GATEWAY_RATE, burst=GATEWAY_BURST,
                                upstream=upstream_port, port=port))
    return conf, port


@dataclass
class Gateway:
    base_url: str
    access_log: Path

    def entries(self) -> list[tuple[float, int, str]]:
        """(time, status, uri) of every request nginx answered."""
        out = []
        for line in self.access_log.read_text().splitlines():
            t, status, uri = line.split(" ", 2)
            out.append((float(t), int(status), uri))
        return out


@contextlib.asynccontextmanager
async def nginx_gateway(tmp: Path, upstream_port: int) -> AsyncIterator[Gateway]:
    binary = _nginx_binary()
    conf, port = _write_conf(tmp, upstream_port)
    proc = await asyncio.create_subprocess_exec(
        binary, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log"),
        "-g", "daemon off;", stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        # Ready when it accepts connections (or dead, with its error log as the reason).
        deadline = time.monotonic() + 10
        while True:
            if proc.returncode is not None:
                err = (tmp / "error.log").read_text() if (tmp / "error.log").exists() else ""
                pytest.fail(f"nginx exited with {proc.returncode}: {err}")
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                await w.wait_closed()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("nginx did not start listening within 10 s")
                await asyncio.sleep(0.02)
        yield Gateway(f"http://127.0.0.1:{port}", tmp / "access.log")
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def run_through_gateway(tmp_path: Path, engine_rate: float) -> tuple[
        RunResult, Engine, list[tuple[float, int, str]], Path]:
    manifest = make_archive(tmp_path / "a", ROWS, seed=21)
    cfg = EmulatorConfig(api_keys=(API_KEY,), processing_time=(0.01, 0.05), seed=5)
    async with run_emulator(cfg, shutdown_timeout=0.1) as emu:
        port = int(emu.base_url.rsplit(":", 1)[1])
        async with nginx_gateway(tmp_path / "nginx", port) as gw:
            out = tmp_path / "out.jsonl"
            engine = Engine(engine_settings(
                gw.base_url, out, rate_limit=engine_rate, burst=5, concurrency=8,
                poll_min=0.1, poll_max=0.5, retry_base=0.05, retry_cap=1.0,
            ), manifest)
            result = await engine.run()
        entries = gw.entries()
    # Every row completed, each with the result of its own folder.
    lines = read_lines(out)
    assert sorted(r["id"] for r in lines) == [f"case-{i:05d}" for i in range(ROWS)]
    for rec in lines:
        assert rec["status"] == "completed", rec
        assert rec["result"] == expected_for_folder(manifest.parent / rec["folder"])
    assert result.exit_code == 0
    assert engine.client is not None
    assert len(entries) == engine.client.stats.calls  # every call went through nginx
    return result, engine, entries, manifest


def share_429(entries: list[tuple[float, int, str]]) -> float:
    return sum(1 for _, status, _ in entries if status == 429) / len(entries)


async def test_at_the_gateway_rate_under_one_percent_429(tmp_path: Path) -> None:
    """--rate-limit equal to nginx's rate: the run completes with < 1 % of calls answered 429."""
    result, engine, entries, _ = await run_through_gateway(tmp_path, GATEWAY_RATE)
    assert engine.client is not None
    throttled = sum(1 for _, s, _ in entries if s == 429)
    assert throttled == engine.client.stats.throttled == result.summary.to_json()[
        "throttled_429"]
    assert share_429(entries) < 0.01, f"{throttled} of {len(entries)} calls answered 429"


async def test_twice_the_gateway_rate_adapts_and_completes(tmp_path: Path) -> None:
    """Engine limit 2x nginx's: AIMD halves on the first 429s and 429s fade; all rows complete.

    nginx sends no Retry-After, so only the adaptive rate and the retry backoff protect the run.
    A fixed-rate client at 2x would see about half of its calls refused.
    """
    _, engine, entries, _ = await run_through_gateway(tmp_path, 2 * GATEWAY_RATE)
    statuses = [s for _, s, _ in entries]
    t0, t1 = entries[0][0], entries[-1][0]
    mid = (t0 + t1) / 2
    first = sum(1 for t, s, _ in entries if s == 429 and t <= mid)
    second = sum(1 for t, s, _ in entries if s == 429 and t > mid)
    assert 429 in statuses, "the engine should have overrun the gateway at first"
    assert engine.limiter.rate_decreases >= 1
    assert share_429(entries) < 0.15, (first, second, len(entries))
    assert second <= first, (first, second)
    # The calls actually went at about the gateway's rate, not the engine's 2x.
    achieved = len(entries) / (t1 - t0)
    assert achieved < 1.3 * GATEWAY_RATE, achieved


def test_missing_nginx_skips_locally_but_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without nginx the gateway tests skip, except with CI=true, where they must fail."""
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(__name__ + ".NGINX_PATHS", ())
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        _nginx_binary()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI"):
        _nginx_binary()
