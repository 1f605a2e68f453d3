"""Self-tuning end to end (issue 12): the adaptive window and ``--rate-limit auto`` in the
engine, against the emulator configured with a cap or a rate the engine is not told.

The controllers themselves are tested with a fake clock in ``test_tuning.py``; here the engine
wires them: a cap that binds is found (folders stop queueing at the API), a rate limit is found
(few 429s), what was learned is reused by the next run, and the settings parse.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from bulk_engine.config import load_settings
from bulk_engine.emulator import Emulator, EmulatorConfig, run_emulator
from bulk_engine.engine import Engine, RunResult

from archive_factory import make_archive
from conftest import API_KEY, engine_settings, read_lines

pytestmark = pytest.mark.timeout(90)


def queue_waits(emu: Emulator) -> list[float]:
    """Seconds each analysis waited at the API for one of the key's slots."""
    return [run.started_at - run.created_at for run in emu.state.runs.values()]


async def run(emu: Emulator, manifest: Path, out: Path, **kw: Any) -> RunResult:
    return await Engine(engine_settings(emu.base_url, out, **kw), manifest).run()


async def test_the_window_finds_a_cap_and_folders_stop_queueing(tmp_path: Path) -> None:
    """A key capped at 10 parallel analyses (as documented): with a fixed window of 2000 every
    folder is submitted at once and waits its turn at the API; the adaptive window (the
    default) learns the cap and keeps the queue short — the mean wait at the API falls to under
    a third, polls per folder too, the throughput stays, and the window ends near the cap."""
    manifest = make_archive(tmp_path / "a", 150, seed=1)
    cfg = EmulatorConfig(api_keys=(API_KEY,), processing_time=(0.2, 0.4),
                         max_parallel_analyses=10, seed=2)
    common: dict[str, Any] = dict(poll_min=0.1, poll_max=0.3, concurrency=4)
    async with run_emulator(cfg) as emu:
        fixed = await run(emu, manifest, tmp_path / "fixed.jsonl", **common)
        fixed_waits = queue_waits(emu)
    async with run_emulator(cfg) as emu:
        adaptive = await run(emu, manifest, tmp_path / "adaptive.jsonl", adaptive_window=True,
                             **common)
        adaptive_waits = queue_waits(emu)
    assert (fixed.exit_code, adaptive.exit_code) == (0, 0)
    assert len(read_lines(tmp_path / "adaptive.jsonl")) == 150
    assert statistics.mean(adaptive_waits) < 0.3 * statistics.mean(fixed_waits)
    a, f = adaptive.summary.to_json(), fixed.summary.to_json()
    assert a["polls_per_folder"] < 0.6 * f["polls_per_folder"]
    window = a["window"]
    assert window["phase"] != "fixed" and 10 <= window["limit"] <= 60  # not 2000
    assert f["window"]["phase"] == "fixed"
    wall = {name: r.summary.span for name, r in (("fixed", fixed), ("adaptive", adaptive))}
    assert wall["adaptive"] is not None and wall["fixed"] is not None
    assert wall["adaptive"] <= 1.35 * wall["fixed"]  # the cap stays busy


async def test_a_max_outstanding_below_4_is_a_fixed_window(tmp_path: Path) -> None:
    """--max-outstanding 3 with the adaptive window on (the default): the bound is the window
    (the controller needs a warm-up of 4 folders at once), not a crash."""
    manifest = make_archive(tmp_path / "a", 6, seed=4)
    async with run_emulator(EmulatorConfig(api_keys=(API_KEY,), processing_time=(0.01, 0.05),
                                           seed=3)) as emu:
        result = await run(emu, manifest, tmp_path / "out.jsonl", adaptive_window=True,
                           max_outstanding=3, concurrency=2)
    assert result.exit_code == 0 and len(read_lines(tmp_path / "out.jsonl")) == 6
    assert result.summary.to_json()["window"] == {**result.summary.to_json()["window"],
                                                  "phase": "fixed", "limit": 3}


async def test_auto_rate_finds_the_key_s_limit_with_few_429s(tmp_path: Path) -> None:
    """The key allows 25 calls/s, the engine is not told: ``--rate-limit auto`` climbs, takes
    the rate at its first 429s as the limit and settles under it; every row completes, and
    the summary says what it found."""
    manifest = make_archive(tmp_path / "a", 60, seed=3)
    cfg = EmulatorConfig(api_keys=(API_KEY,), processing_time=(0.05, 0.1), rate_limit=25.0,
                         burst=5, max_parallel_analyses=100, seed=4)
    async with run_emulator(cfg) as emu:
        with capture_logs():
            res = await run(emu, manifest, tmp_path / "out.jsonl", rate_limit=None, burst=5,
                            poll_min=0.05, poll_max=0.2, max_retries=8)
        stats = emu.stats()
    assert res.exit_code == 0 and len(read_lines(tmp_path / "out.jsonl")) == 60
    calls = stats["submissions"] + stats["polls"]
    assert stats["rate_limited"] <= 0.06 * calls
    rate = res.summary.to_json()["rate"]
    assert rate["mode"] == "auto"
    if rate["limit_estimate"] is not None:  # a 429 was seen: the estimate is near the truth
        assert 10 <= rate["limit_estimate"] <= 40


async def test_what_was_learned_starts_the_next_run(tmp_path: Path) -> None:
    """A run with the same base URL and key starts from what the last one learned (logged),
    the rate settled rather than starting at 2 calls/s."""
    manifest = make_archive(tmp_path / "a", 30, seed=5)
    cfg = EmulatorConfig(api_keys=(API_KEY,), processing_time=(0.05, 0.1), rate_limit=30.0,
                         burst=5, seed=6)
    kw: dict[str, Any] = dict(rate_limit=None, burst=5, poll_min=0.05, poll_max=0.2,
                              adaptive_window=True)
    async with run_emulator(cfg) as emu:
        first = await run(emu, manifest, tmp_path / "one.jsonl", **kw)
        engine = Engine(engine_settings(emu.base_url, tmp_path / "two.jsonl", **kw), manifest)
        with capture_logs() as logs:
            second = await engine.run()
    assert (first.exit_code, second.exit_code) == (0, 0)
    assert any(e["event"] == "learned_limits_loaded" for e in logs)
    first_rate = first.summary.to_json()["rate"]["calls_per_s"]
    assert engine.limiter.statistics().phase != "starting" or first_rate <= 2.5


@pytest.mark.parametrize(("raw", "expected"), [("auto", None), ("AUTO", None), ("12.5", 12.5)])
def test_rate_limit_auto_or_a_number_from_every_source(tmp_path: Path, raw: str,
                                                       expected: float | None) -> None:
    """`auto` (any case) or a number, from the command line, the environment or a file."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'rate_limit = "{raw}"\n' if raw.lower() == "auto" else f"rate_limit = {raw}\n")
    assert load_settings(cli={"rate_limit": raw}, environ={}).rate_limit == expected
    assert load_settings(environ={"BULK_ENGINE_RATE_LIMIT": raw}).rate_limit == expected
    assert load_settings(config_file=cfg, environ={}).rate_limit == expected
    assert load_settings(environ={}).rate_limit is None  # the default: auto
