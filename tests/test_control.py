"""Control without restart: pause/resume, drain, live tunables (apply_settings, SIGHUP), the
/control endpoints and their token rule, SIGUSR1/SIGHUP on a real process."""

from __future__ import annotations

import json
import random
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from structlog.testing import capture_logs

from bulk_engine.admin import CONTROL_TOKEN_ENV, AdminServer, control_token, serve_admin
from bulk_engine.clock import FakeClock
from bulk_engine.config import Settings, load_settings
from bulk_engine.control import ConfigReloader, reload_tunables, retune_limiter
from bulk_engine.emulator import EmulatorConfig, run_emulator
from bulk_engine.engine import Engine, RunResult
from bulk_engine.errors import ConfigError
from bulk_engine.ratelimit import RateLimiter

from archive_factory import make_archive
from conftest import API_KEY, engine_settings, read_lines
from live import scrape, until, value
from procs import EngineProcess, emulator_process, journal_rows, wait_for

pytestmark = pytest.mark.timeout(120)


@asynccontextmanager
async def running(engine: Engine) -> AsyncIterator[Callable[[], RunResult | None]]:
    """``engine.run()`` in a task; yields a getter of its result (None until it returns).
    Leaving the block waits for the run's end."""
    results: list[RunResult] = []

    async def go() -> None:
        results.append(await engine.run())

    async with anyio.create_task_group() as tg:
        tg.start_soon(go)
        yield lambda: results[0] if results else None


def started(engine: Engine) -> bool:
    return engine._stages_ is not None


# ---- pause / resume --------------------------------------------------------------------------


async def test_pause_holds_new_uploads_while_polls_retrieve_then_resume_finishes(
        tmp_path: Path) -> None:
    """Paused with folders outstanding: no upload goes out, every outstanding folder is still
    retrieved (its line written); resumed, the run completes every row once."""
    n = 30
    manifest = make_archive(tmp_path / "a", n, seed=31)
    cfg = EmulatorConfig(api_keys=(API_KEY,), processing_time=(0.3, 0.5), seed=1)
    async with run_emulator(cfg) as emu:
        engine = Engine(engine_settings(emu.base_url, tmp_path / "out.jsonl", concurrency=2,
                                        max_outstanding=4), manifest)
        async with running(engine) as result:
            await until(lambda: engine.statistics().processing >= 2, what="2 outstanding")
            assert engine.pause() and not engine.pause()
            await until(lambda: engine.gate.waiting == 2, what="both submitters held")
            sent = emu.stats()["submissions"]
            await until(lambda: engine.statistics().processing == 0, what="all retrieved")
            await until(lambda: engine.summary.rows == sent, what="their lines durable")
            assert emu.stats()["submissions"] == sent < n  # nothing new while paused
            assert engine.statistics().control.paused
            assert engine.resume() and not engine.resume()
        res = result()
    assert res is not None and res.exit_code == 0
    lines = read_lines(tmp_path / "out.jsonl")
    assert sorted(r["id"] for r in lines) == sorted({r["id"] for r in lines}) and len(lines) == n
    assert emu.stats()["submissions"] == n and emu.stats()["duplicate_submissions"] == 0


# ---- drain -----------------------------------------------------------------------------------


async def test_drain_retrieves_every_outstanding_token_sends_nothing_new_and_exits_0(
        tmp_path: Path) -> None:
    """Drain with tokens outstanding: each submitted folder gets its line (completed), no new
    folder is sent, exit 0, no live token left in the journal; the rerun sends the rest and
    nothing twice."""
    n = 40
    manifest = make_archive(tmp_path / "a", n, seed=32)
    out = tmp_path / "out.jsonl"
    cfg = EmulatorConfig(api_keys=(API_KEY,), processing_time=(0.2, 0.4), seed=2)
    async with run_emulator(cfg) as emu:
        settings = engine_settings(emu.base_url, out, concurrency=2, max_outstanding=6)
        engine = Engine(settings, manifest)
        async with running(engine) as result:
            await until(lambda: engine.statistics().processing >= 4, what="4 outstanding")
            with capture_logs() as logs:
                assert engine.drain() and not engine.drain()
        res = result()
        sent = emu.stats()["submissions"]
        assert res is not None and res.exit_code == 0
        lines = read_lines(out)
        assert len(lines) == sent < n
        assert all(r["status"] == "completed" for r in lines)
        assert {s["run_id"] for s in emu.state.submissions_json()} == {r["run_id"] for r in lines}
        states = {r["state"] for r in journal_rows(settings.journal_path).values()}
        assert states <= {"done", "pending"}, states
        assert res.summary.extra["rows_withdrawn"] == engine.statistics().control.withdrawn
        assert any(e["event"] == "draining" for e in logs)
        # The rerun: the rest of the rows, each sent once.
        res2 = await Engine(settings, manifest).run()
        stats = emu.stats()
    assert res2.exit_code == 0
    lines = read_lines(out)
    assert len(lines) == n == len({r["id"] for r in lines})
    assert stats["submissions"] == n and stats["duplicate_submissions"] == 0


# ---- live tunables ---------------------------------------------------------------------------


TUNED = """\
rate_limit = 123.0
burst = 7
concurrency = 3
poll_min = 0.05
poll_max = 0.3
max_outstanding = 9
max_failure_rate = 0.9
failure_window = 50
stuck_factor = 5.0
"""


async def test_sighup_applies_a_good_config_live_and_keeps_the_old_values_on_a_bad_one(
        tmp_path: Path) -> None:
    """reload_tunables (the SIGHUP handler) with a good file: the limiter, the upload slots,
    the poll policy, the outstanding bound, the mass-failure window and the stuck factor
    change at once; with a bad value or broken TOML: logged, nothing changes."""
    manifest = make_archive(tmp_path / "a", 12, seed=33)
    cfg_file = tmp_path / "tune.toml"
    cfg_file.write_text("rate_limit = 500.0\nburst = 50\n", encoding="utf-8")
    async with run_emulator(EmulatorConfig(api_keys=(API_KEY,), processing_time=(0.01, 0.05))
                            ) as emu:
        base = engine_settings(emu.base_url, tmp_path / "out.jsonl")
        cli = {k: getattr(base, k) for k in ("base_url", "api_key", "output", "progress",
                                              "seed", "retry_base", "retry_cap",
                                              "fsync_interval", "poll_min", "poll_max")}
        reloader = ConfigReloader(partial(load_settings, cli=cli, environ={},
                                          config_file=cfg_file))
        engine = Engine(reloader.load(), manifest)
        engine.pause()  # a stable run to look at: everything waits at the gate
        async with running(engine) as result:
            await until(lambda: started(engine) and engine.gate.waiting >= 1, what="the gate")
            st = engine._stages_
            assert st is not None
            cfg_file.write_text(TUNED, encoding="utf-8")
            with capture_logs() as logs:
                assert reload_tunables(engine, reloader)
            applied = next(e for e in logs if e["event"] == "settings_applied")
            assert applied["source"] == "SIGHUP" and applied["changes"]["concurrency"] == [8, 3]
            # poll_min/poll_max come from `cli` here: pinned, the file cannot change them.
            assert (engine.limiter.rate, engine.limiter.burst) == (123.0, 7)
            assert engine.limiter.current_rate == 123.0
            assert st.submitter.concurrency == 3
            assert engine.outstanding_limit() == st.outstanding.limit == 9
            assert (st.mass_failure.max_rate, st.mass_failure.size) == (0.9, 50)
            assert st.stuck.factor == 5.0 and st.scheduler._on_pending == st.stuck.check
            assert engine.settings.rate_limit == 123.0
            before = engine.control_state()
            bad_files = (TUNED.replace("burst = 7", "burst = 0"),
                         TUNED.replace("rate_limit = 123.0", "rate_limit = -1"),
                         TUNED.replace("max_outstanding = 9", "max_outstanding = 1"),
                         TUNED + "no_such_setting = 1\n", "rate_limit = [\n")
            for bad in bad_files:
                cfg_file.write_text(bad, encoding="utf-8")
                with capture_logs() as logs:
                    assert not reload_tunables(engine, reloader), bad
                assert [e["event"] for e in logs] == ["config_reload_failed"], bad
                assert engine.control_state() == before
            cfg_file.write_text(TUNED + "use_case = 'credit'\n", encoding="utf-8")
            with capture_logs() as logs:
                assert reload_tunables(engine, reloader)
            restart = next(e for e in logs if e["event"] == "config_reload_needs_restart")
            assert restart["settings"] == ["use_case"] and engine.settings.use_case == "rental"
            assert (engine.limiter.rate, st.submitter.concurrency, st.outstanding.limit) == (
                123.0, 3, 9)
            assert engine.statistics().control.settings_applied == 2
            engine.resume()
        res = result()
    assert res is not None and res.exit_code == 0 and len(read_lines(tmp_path / "out.jsonl")) == 12


async def test_apply_settings_refuses_what_cannot_change_and_bad_values() -> None:
    """Only the tunables change live; a bad value or a fixed setting raises ConfigError naming
    it, and nothing changes."""
    engine = Engine(Settings(api_key="k", root=Path("."), rate_limit=10.0), None)
    before = engine.settings
    for values, words in (({"api_key": "x"}, "api_key cannot change"),
                          ({"output": "/tmp/x"}, "output cannot change"),
                          ({"rate_limit": 0}, "rate_limit must be a positive"),
                          ({"concurrency": "many"}, "expected a whole number"),
                          ({"poll_min": 50, "poll_max": 40}, "poll_max (40.0) must not be"),
                          ({"concurrency": 10, "max_outstanding": 5}, "max_outstanding (5)")):
        with pytest.raises(ConfigError, match=r"(?s).*" + words.replace("(", r"\(")
                           .replace(")", r"\)")):
            engine.apply_settings(values, source="test")
        assert engine.settings is before
    assert engine.apply_settings({"rate_limit": "20", "burst": 5}) == {
        "rate_limit": [10.0, 20.0], "burst": [10, 5]}
    assert (engine.limiter.rate, engine.limiter.burst) == (20.0, 5)
    ctl = engine.statistics().control
    assert (ctl.settings_applied, ctl.settings_refused) == (1, 6)
    with capture_logs() as logs:
        engine.refuse_settings("bad file", source="SIGHUP")
    assert logs[0]["event"] == "config_reload_failed" and logs[0]["log_level"] == "error"


def test_retune_limiter_keeps_the_slowdown_ratio_and_applies_now() -> None:
    """A limiter slowed by a 429 stays slowed in proportion under a new ceiling; the new rate
    times the next call at once."""
    clock = FakeClock()
    lim = RateLimiter(10.0, 10, clock=clock, initial_tokens=0.0)
    lim.on_throttled()
    assert lim.current_rate == 5.0
    retune_limiter(lim, rate=40.0, burst=2)
    assert (lim.rate, lim.current_rate, lim.burst, lim.min_rate) == (40.0, 20.0, 2, 2.0)
    assert lim._reserve(clock.now()) == pytest.approx(1 / 20)  # a token every 50 ms now
    retune_limiter(lim, rate=4.0, burst=1)
    assert (lim.rate, lim.current_rate) == (4.0, 2.0)


async def test_raising_concurrency_live_starts_more_uploads_at_once(tmp_path: Path) -> None:
    """concurrency 1 → 4 while the run goes: more submitters start, and the API sees uploads
    in parallel (sync mode: each upload lasts the analysis)."""
    manifest = make_archive(tmp_path / "a", 12, seed=34)
    cfg = EmulatorConfig(api_keys=(API_KEY,), processing_time=(0.15, 0.2),
                         max_parallel_analyses=10)
    async with run_emulator(cfg) as emu:
        engine = Engine(engine_settings(emu.base_url, tmp_path / "out.jsonl", mode="sync",
                                        concurrency=1, max_outstanding=20), manifest)
        engine.pause()
        async with running(engine) as result:
            await until(lambda: started(engine) and engine.gate.waiting == 1, what="the gate")
            engine.apply_settings({"concurrency": 4})
            await until(lambda: engine.gate.waiting == 4, what="4 submitters")
            engine.resume()
        res = result()
        stats = emu.stats()
    assert res is not None and res.exit_code == 0
    assert stats["max_in_flight_requests"] == 4
    assert len(read_lines(tmp_path / "out.jsonl")) == 12


# ---- the /control endpoints ------------------------------------------------------------------


async def _post(server: AdminServer, path: str, body: Any = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any], str]:
    url = f"http://127.0.0.1:{server.port}{path}"
    async with aiohttp.ClientSession() as http, http.post(
            url, data=None if body is None else body if isinstance(body, str)
            else json.dumps(body), headers=headers or {}) as resp:
        text = await resp.text()
        return resp.status, json.loads(text), text


@asynccontextmanager
async def admin(engine: Engine, **kw: Any) -> AsyncIterator[AdminServer]:
    async with anyio.create_task_group() as tg:
        yield await tg.start(partial(serve_admin, engine, **kw))
        tg.cancel_scope.cancel()


async def test_control_endpoints_pause_resume_settings_drain() -> None:
    """On loopback without a token: each endpoint calls the engine's method and answers the
    state; a bad settings body answers 400 and changes nothing; no secret in any answer."""
    engine = Engine(Settings(api_key=API_KEY, root=Path("."), rate_limit=10.0), None)
    answers: list[str] = []
    async with admin(engine) as server:
        status, body, text = await _post(server, "/control/pause")
        answers.append(text)
        assert (status, body["changed"], body["paused"]) == (200, True, True)
        assert engine.gate.paused
        status, body, text = await _post(server, "/control/resume")
        answers.append(text)
        assert (status, body["paused"]) == (200, False)
        status, body, text = await _post(server, "/control/settings",
                                         {"rate_limit": 25, "max_outstanding": 100})
        answers.append(text)
        assert status == 200 and body["changed"] == {"rate_limit": [10.0, 25.0],
                                                     "max_outstanding": [2000, 100]}
        assert body["settings"]["rate_limit"] == 25.0 and engine.limiter.rate == 25.0
        for bad in ({"rate_limit": -3}, {"api_key": API_KEY}, [1], "{not json", {}):
            status, body, text = await _post(server, "/control/settings", bad)
            answers.append(text)
            assert status == 400 and "error" in body, bad
        assert engine.settings.rate_limit == 25.0 and engine.settings.api_key == API_KEY
        status, body, text = await _post(server, "/control/drain")
        answers.append(text)
        assert (status, body["draining"]) == (200, True) and engine.gate.draining
        async with aiohttp.ClientSession() as http, http.get(server.url + "/control") as resp:
            assert resp.status == 200 and (await resp.json())["draining"] is True
    assert not any(API_KEY in a or "gAAAA" in a for a in answers)


async def test_control_needs_the_token_when_bound_beyond_loopback(tmp_path: Path) -> None:
    """Bound to 0.0.0.0: no token set → refuses to start; with one, a request without it or
    with a wrong one is refused (401, logged, nothing changes), the right one is served. A
    web page's request (Origin) is refused even with the token."""
    engine = Engine(Settings(api_key=API_KEY, root=Path("."), rate_limit=10.0), None)
    with pytest.raises(ConfigError, match=CONTROL_TOKEN_ENV):
        control_token("0.0.0.0", {})
    with pytest.raises(Exception) as caught:
        async with admin(engine, host="0.0.0.0", environ={}):
            pass
    assert CONTROL_TOKEN_ENV in repr(caught.value.exceptions[0]
                                     if isinstance(caught.value, BaseExceptionGroup)
                                     else caught.value)
    assert control_token("127.0.0.1", {}) is None and control_token("::1", {}) is None
    token = "t0ken-" + "x" * 30
    async with admin(engine, host="0.0.0.0", environ={CONTROL_TOKEN_ENV: token}) as server:
        with capture_logs() as logs:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token},
                            {"Authorization": f"Bearer {token}", "Origin": "http://evil"}):
                status, _, text = await _post(server, "/control/drain", headers=headers)
                assert status in (401, 403) and not engine.gate.draining, headers
                assert token not in text
            status, _, _ = await _post(server, "/control/settings", {"rate_limit": 1},
                                       headers={})
            assert status == 401 and engine.settings.rate_limit == 10.0
        refused = [e for e in logs if e["event"] == "control_refused"]
        assert len(refused) == 5 and not any(token in json.dumps(e) for e in logs)
        status, _, _ = await _post(server, "/control/drain",
                                   headers={"Authorization": f"Bearer {token}"})
        assert status == 200 and engine.gate.draining
        _, fams = await scrape(f"http://127.0.0.1:{server.port}")  # metrics need no token
        assert value(fams, "bulk_engine_draining") == 1


# ---- a real process: SIGHUP and SIGUSR1 ------------------------------------------------------


def _log_events(eng: EngineProcess) -> list[dict[str, Any]]:
    out = []
    for line in eng.log_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _event(eng: EngineProcess, name: str) -> dict[str, Any] | None:
    return next((e for e in _log_events(eng) if e.get("event") == name), None)


def _scrape_sync(url: str) -> dict[str, Any]:
    return anyio.run(scrape, url)[1]


@pytest.mark.timeout(150)
def test_a_real_process_reloads_on_sighup_and_drains_on_sigusr1(tmp_path: Path) -> None:
    """python -m bulk_engine --metrics-port 0 --config F: SIGHUP with a good file changes the
    served rate limit, with a bad one logs and keeps it; SIGUSR1 drains: exit 0, one line per
    folder sent, no live token left."""
    n = 200
    manifest = make_archive(tmp_path / "a", n, seed=35)
    out = tmp_path / "out.jsonl"
    cfg = tmp_path / "run.toml"
    base = "poll_min = 0.05\npoll_max = 0.3\nconcurrency = 2\nmax_outstanding = 6\n"
    cfg.write_text(base + "rate_limit = 20.0\n", encoding="utf-8")
    with emulator_process("--processing-time", "0.2:0.4") as emu, EngineProcess(
            manifest, out, emu.base_url, "--config", str(cfg), "--metrics-port", "0",
            "--log-level", "info") as eng:
        wait_for(lambda: _event(eng, "admin_listening") is not None or not eng.running(),
                 timeout=30, what="the admin server")
        listening = _event(eng, "admin_listening")
        assert listening is not None, eng.log_text()[-2000:]
        url = listening["url"]
        eng.wait_for_lines(3, timeout=30)
        rate = "bulk_engine_rate_limit_configured_calls_per_second"
        assert value(_scrape_sync(url), rate) == 20.0
        cfg.write_text(base + "rate_limit = 7.0\n", encoding="utf-8")
        eng.signal(signal.SIGHUP)
        wait_for(lambda: value(_scrape_sync(url), rate) == 7.0, timeout=20, what="rate 7")
        cfg.write_text(base + "rate_limit = -1\n", encoding="utf-8")
        eng.signal(signal.SIGHUP)
        wait_for(lambda: _event(eng, "config_reload_failed") is not None, timeout=20,
                 what="config_reload_failed")
        fams = _scrape_sync(url)
        assert value(fams, rate) == 7.0 and value(fams, "bulk_engine_settings_refused_total") == 1
        eng.signal(signal.SIGUSR1)
        code = eng.wait(60)
        log = eng.log_text()
        stats = emu.stats()
    assert code == 0, log[-3000:]
    assert '"drain_requested"' in log and "drained: every accepted folder" in log
    lines = read_lines(out)
    assert len(lines) == stats["submissions"] < n
    assert all(r["status"] == "completed" for r in lines)
    assert {r["state"] for r in journal_rows(Path(f"{out}.journal")).values()} <= {
        "done", "pending"}
    assert API_KEY not in log


def test_seeded_random_is_untouched_by_control() -> None:
    """Pausing and resuming an idle engine draws nothing from its seeded generator."""
    engine = Engine(Settings(api_key="k", root=Path("."), seed=7), None)
    engine.pause()
    engine.resume()
    assert engine.rng.random() == random.Random(7).random()
