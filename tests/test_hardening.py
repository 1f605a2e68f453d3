"""Regressions found in review: each test pins a failure mode that once broke an invariant."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bulk_engine.clock import FakeClock
from bulk_engine.emulator import EmulatorConfig, run_emulator
from bulk_engine.engine import Engine
from bulk_engine.errors import ConfigError
from bulk_engine.models import Outcome, Submitted
from bulk_engine.scheduler import PollDecision, PollPolicy, PollScheduler

from archive_factory import make_archive
from conftest import API_KEY, engine_settings, read_lines
from test_resume import folders_of, run_until

pytestmark = pytest.mark.timeout(60)


def fast() -> EmulatorConfig:
    return EmulatorConfig(api_keys=(API_KEY,), processing_time=(0.01, 0.03), seed=1)


async def test_resumed_token_whose_folder_vanished_gets_one_line(tmp_path: Path) -> None:
    """A live token's folder removed before the rerun: one `failed` line, not two."""
    manifest = make_archive(tmp_path / "a", 10, seed=21)
    folders = folders_of(manifest)
    out = tmp_path / "out.jsonl"
    async with run_emulator(fast()) as emu:
        first = Engine(engine_settings(emu.base_url, out, poll_min=20, poll_max=30), manifest)
        await run_until(first, lambda: first.counters.submitted == 10)
        shutil.rmtree(folders["case-00003"])
        second = await Engine(engine_settings(emu.base_url, out), manifest).run()
    lines = read_lines(out)
    assert sorted(r["id"] for r in lines) == sorted(folders)  # each row exactly once
    gone = next(r for r in lines if r["id"] == "case-00003")
    assert gone["status"] == "failed"
    assert gone["error"]["kind"] == "folder_missing"
    assert second.exit_code == 2


def _root_with_a_non_utf8_folder(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    odd = os.path.join(os.fsencode(root), b"caf\xe9")
    try:
        os.mkdir(odd)
    except OSError:
        pytest.skip("filesystem refuses non-UTF-8 names")
    Path(os.fsdecode(odd), "doc.pdf").write_bytes(b"%PDF-1.4 odd folder\n")
    (root / "plain").mkdir()
    (root / "plain" / "doc.pdf").write_bytes(b"%PDF-1.4 plain folder\n")
    return root


async def test_root_folder_with_a_non_utf8_name_completes(tmp_path: Path) -> None:
    """--root with a folder named by undecodable bytes: the run completes and resumes cleanly."""
    root = _root_with_a_non_utf8_folder(tmp_path)
    out = tmp_path / "out.jsonl"
    async with run_emulator(fast()) as emu:
        s = engine_settings(emu.base_url, out, root=root)
        first = await Engine(s, None).run()
        again = await Engine(s, None).run()
        stats = emu.stats()
    lines = read_lines(out)
    assert first.exit_code == 0, first.summary.to_json()
    assert sorted(r["id"] for r in lines) == ["caf\\xe9", "plain"]
    assert all(r["status"] == "completed" for r in lines)
    assert again.exit_code == 0
    assert stats["submissions"] == 2  # the rerun found both done


def test_result_with_a_lone_surrogate_is_written_as_valid_json() -> None:
    """A result holding half an emoji encodes to a valid JSON line that round-trips."""
    out = Outcome(key="k", line=2, id="k", folder="f", status="completed",
                  result={"explanation": [{"data": {"en": "cut \ud83d"}}]})
    line = out.to_line()
    assert line.endswith(b"\n")
    assert json.loads(line)["result"] == out.result


async def _serve(handler: Any) -> tuple[web.AppRunner, int]:
    """A tiny server on a free port answering every path with ``handler``."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def test_redirect_is_fatal_and_never_carries_the_key(tmp_path: Path) -> None:
    """A 3xx from the API stops the run (exit 1); the redirect target never sees the key."""
    seen_keys: list[str | None] = []

    async def elsewhere(request: web.Request) -> web.Response:
        seen_keys.append(request.headers.get("api-key"))
        return web.json_response({"retrieve_token": "gAAAAAfake"}, status=202)

    other_runner, other_port = await _serve(elsewhere)

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://127.0.0.1:{other_port}{request.path}")

    runner, port = await _serve(redirect)
    try:
        manifest = make_archive(tmp_path / "a", 3, seed=22)
        out = tmp_path / "out.jsonl"
        result = await Engine(engine_settings(f"http://127.0.0.1:{port}", out), manifest).run()
    finally:
        await runner.cleanup()
        await other_runner.cleanup()
    assert result.exit_code == 1
    assert "redirect" in str(result.error)
    assert seen_keys == []


def test_numeric_api_key_in_a_config_file_is_never_echoed(tmp_path: Path) -> None:
    """A mistyped (numeric) api_key in TOML gives an error that does not show the value."""
    from bulk_engine.config import load_settings

    cfg = tmp_path / "c.toml"
    cfg.write_text("api_key = 98765432109876\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=cfg, environ={})
    assert "98765432109876" not in str(info.value)
    assert "api_key" in str(info.value)


async def test_scheduler_stays_alive_while_a_resubmission_is_held() -> None:
    """close() with a hold() outstanding: run() waits for release() and polls the re-added item."""
    clock = FakeClock()
    polled: list[str] = []
    sched: PollScheduler

    async def poll(sub: Submitted) -> PollDecision:
        polled.append(sub.token)
        return PollDecision.DONE

    sched = PollScheduler(poll, PollPolicy(1.0, 2.0, rng=random.Random(0)), clock=clock)
    sched.hold()
    sched.close()
    task = asyncio.create_task(sched.run())
    await clock.advance(5.0)
    assert not task.done()  # held open although closed and empty
    job: Any = None
    sched.add(Submitted(job=job, token="t2", submitted_at=0.0, submitted_mono=clock.now()),
              delay=1.0)
    sched.release()
    await clock.advance(1.0)
    await asyncio.wait_for(task, 1)
    assert polled == ["t2"]


async def test_scheduler_reports_how_late_due_polls_are() -> None:
    """lateness() is how far the earliest due poll is behind the clock: the producer's brake."""
    clock = FakeClock()

    async def poll(sub: Submitted) -> PollDecision:
        return PollDecision.DONE

    sched = PollScheduler(poll, PollPolicy(1.0, 2.0, rng=random.Random(0)), clock=clock)
    assert sched.lateness() == 0.0
    job: Any = None
    sched.add(Submitted(job=job, token="t", submitted_at=0.0, submitted_mono=0.0), delay=10.0)
    assert sched.lateness() == 0.0
    clock._now = 75.0  # time passed without the scheduler running (saturated rate)
    assert sched.lateness() == 65.0


async def test_refused_key_leaves_no_row_looking_like_a_possible_duplicate(
    tmp_path: Path,
) -> None:
    """A 401 on POST /case is a definite refusal: the rerun with the right key flags nothing."""
    manifest = make_archive(tmp_path / "a", 12, seed=23)
    out = tmp_path / "out.jsonl"
    async with run_emulator(EmulatorConfig(api_keys=("right-key",),
                                           processing_time=(0.01, 0.02))) as emu:
        refused = await Engine(engine_settings(emu.base_url, out), manifest).run()
        assert refused.exit_code == 1
        fixed = await Engine(engine_settings(emu.base_url, out, api_key="right-key"),
                             manifest).run()
    lines = read_lines(out)
    assert fixed.exit_code == 0
    assert len(lines) == 12
    assert fixed.summary.to_json()["possible_duplicates"] == 0
    assert all(r["possible_duplicate"] is False and r["attempts"] == 1 for r in lines)
