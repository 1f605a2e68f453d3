"""Hostile networks and archives, end to end: the engine against the in-process emulator.

Each fault test proves four things: the reaction matches the error policy
(docs/architecture.md), retries stay within budget (requests counted at the emulator or the
fault proxy against ``max_retries``), nothing hangs (pytest-timeout), and every manifest row
ends as exactly one output line.
Faults come from the emulator's knobs where it has one, else from ``faultproxy.FaultProxy``.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import random
import stat
import time
import unicodedata
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from bulk_engine import manifest as manifest_mod
from bulk_engine.client import multipart_filename
from bulk_engine.emulator import Emulator, EmulatorConfig, EmulatorState, run_emulator
from bulk_engine.engine import Engine, RunResult
from bulk_engine.scheduler import PollScheduler

from archive_factory import make_archive, make_folder
from conftest import API_KEY, engine_settings, expected_for_folder, read_lines
from faultproxy import Fault, FaultProxy

pytestmark = pytest.mark.timeout(30)


# ---- helpers -------------------------------------------------------------------------------


def emu_config(**kw: Any) -> EmulatorConfig:
    base: dict[str, Any] = dict(api_keys=(API_KEY,), processing_time=(0.01, 0.04), seed=11)
    base.update(kw)
    return EmulatorConfig(**base)


@asynccontextmanager
async def emulator(**kw: Any) -> AsyncIterator[Emulator]:
    # Stalled handlers sleep on; do not wait for them at shutdown.
    async with run_emulator(emu_config(**kw), shutdown_timeout=0.1) as emu:
        yield emu


def port_of(emu: Emulator) -> int:
    return int(emu.base_url.rsplit(":", 1)[1])


def manifest_folders(manifest: Path) -> dict[str, Path]:
    with manifest.open(newline="", encoding="utf-8") as fh:
        return {row["id"]: manifest.parent / row["folder"] for row in csv.DictReader(fh)}


async def run_engine(base_url: str, manifest: Path, out: Path,
                     **kw: Any) -> tuple[RunResult, Engine]:
    engine = Engine(engine_settings(base_url, out, **kw), manifest)
    return await engine.run(), engine


def one_line_each(out: Path, ids: list[str] | set[str]) -> dict[str, dict[str, Any]]:
    """Every row has exactly one output line; the lines by id."""
    lines = read_lines(out)
    counts = Counter(r["id"] for r in lines)
    assert counts == Counter(set(ids)), "every row must end as exactly one line"
    return {r["id"]: r for r in lines}


def assert_all_completed_correctly(out: Path, manifest: Path) -> dict[str, dict[str, Any]]:
    folders = manifest_folders(manifest)
    lines = one_line_each(out, set(folders))
    for row_id, rec in lines.items():
        assert rec["status"] == "completed", rec
        assert rec["result"] == expected_for_folder(folders[row_id]), row_id
    return lines


def calls_at_emulator(emu: Emulator) -> int:
    s = emu.stats()
    return int(s["submissions"] + s["polls"])


# ---- connection resets ----------------------------------------------------------------------


async def test_reset_before_body_is_retried_and_every_row_completes(tmp_path: Path) -> None:
    """30 % of POST /case reset before the body is read: retried, all rows complete, no dupes."""
    manifest = make_archive(tmp_path / "a", 30, seed=1)
    async with emulator(reset_before_body_rate=0.3) as emu:
        res, eng = await run_engine(emu.base_url, manifest, tmp_path / "out.jsonl")
        stats = emu.stats()
    assert res.exit_code == 0, res.summary.to_json()
    assert_all_completed_correctly(tmp_path / "out.jsonl", manifest)
    resets = stats["faults_injected"]["reset_before_body"]
    assert resets > 0
    c = eng.client
    assert c is not None
    # Every call reached the emulator; every reset cost exactly one retry, nothing more.
    assert c.stats.calls == calls_at_emulator(emu)
    assert c.stats.retries == c.stats.transport_errors == resets
    assert stats["submissions_by_status"]["aborted"] == resets
    assert stats["runs_created"] == 30 and stats["duplicate_submissions"] == 0


async def test_reset_before_body_every_time_fails_the_row_after_exact_budget(
    tmp_path: Path,
) -> None:
    """A row whose every POST is reset gets exactly 1 + max_retries POSTs, then a `failed`
    line (one row alone failing is the row's trouble, not an outage)."""
    manifest = make_archive(tmp_path / "a", 1, seed=2)
    async with emulator(reset_before_body_rate=1.0) as emu:
        res, _ = await run_engine(emu.base_url, manifest, tmp_path / "out.jsonl", max_retries=2)
        stats = emu.stats()
    assert stats["submissions"] == 1 * 3 and stats["polls"] == 0
    assert stats["runs_created"] == 0
    lines = one_line_each(tmp_path / "out.jsonl", manifest_folders(manifest))
    assert {r["status"] for r in lines.values()} == {"failed"}
    assert {r["error"]["kind"] for r in lines.values()} == {"ambiguous_submit"}
    assert res.exit_code == 2


async def test_reset_before_body_for_every_row_is_an_outage_not_failed_rows(
    tmp_path: Path,
) -> None:
    """Every POST of every row reset: the API is down. Each row stays within 1 + max_retries
    POSTs, no row is failed for it, and the run stops (exit 1) for a rerun to resume."""
    manifest = make_archive(tmp_path / "a", 4, seed=2)
    async with emulator(reset_before_body_rate=1.0) as emu:
        res, _ = await run_engine(emu.base_url, manifest, tmp_path / "out.jsonl", max_retries=2,
                                  outage_after=0.05, retry_base=0.05, retry_cap=0.1)
        stats = emu.stats()
    assert stats["submissions"] <= 4 * 3 and stats["runs_created"] == 0
    assert read_lines(tmp_path / "out.jsonl") == []
    assert res.exit_code == 1 and "unhealthy" in str(res.error)


async def test_resets_through_the_proxy_on_both_endpoints(tmp_path: Path) -> None:
    """TCP resets before the request and after the answer began, on submits and polls alike."""
    manifest = make_archive(tmp_path / "a", 30, seed=3)
    rng = random.Random(5)

    def plan(n: int) -> Fault | None:
        r = rng.random()
        return (Fault.RESET_BEFORE_BODY if r < 0.12
                else Fault.RESET_AFTER_BODY if r < 0.24 else None)

    async with emulator() as emu, FaultProxy("127.0.0.1", port_of(emu), plan) as proxy:
        res, eng = await run_engine(proxy.base_url, manifest, tmp_path / "out.jsonl")
        stats = emu.stats()
    assert res.exit_code == 0
    assert_all_completed_correctly(tmp_path / "out.jsonl", manifest)
    injected = proxy.faults["reset_before_body"] + proxy.faults["reset_after_body"]
    assert proxy.faults["reset_before_body"] > 0 and proxy.faults["reset_after_body"] > 0
    c = eng.client
    assert c is not None
    assert c.stats.calls == proxy.requests
    assert c.stats.retries == c.stats.transport_errors == injected
    # Calls reset before the body never reached the emulator; the others did.
    assert calls_at_emulator(emu) == proxy.requests - proxy.faults["reset_before_body"]
    # A lost 202 was retried with the same Idempotency-Key: the emulator replayed, no new run.
    assert stats["runs_created"] == 30 and stats["duplicate_submissions"] == 0


# ---- the lost 202 ---------------------------------------------------------------------------


async def test_lost_202_with_idempotency_key_creates_no_duplicate(tmp_path: Path) -> None:
    """The run was created but the 202 lost: the retry replays it (Idempotency-Key)."""
    manifest = make_archive(tmp_path / "a", 30, seed=4)
    async with emulator(drop_after_create_rate=0.3) as emu:
        res, eng = await run_engine(emu.base_url, manifest, tmp_path / "out.jsonl")
        stats = emu.stats()
    assert res.exit_code == 0
    lines = assert_all_completed_correctly(tmp_path / "out.jsonl", manifest)
    drops = stats["faults_injected"]["drop_after_create"]
    assert drops > 0
    assert stats["runs_created"] == 30 and stats["duplicate_submissions"] == 0
    assert stats["idempotent_replays"] == drops
    summary = res.summary.to_json()
    assert summary["ambiguous_submits"] == drops  # reported, so an operator can check
    c = eng.client
    assert c is not None and c.stats.retries == drops
    # The run_id of each line is the emulator's one run for that folder.
    run_ids = {s["run_id"] for s in emu.state.submissions_json()}
    assert {r["run_id"] for r in lines.values() if r["run_id"]} <= run_ids


async def test_lost_202_without_idempotency_is_counted_as_possible_duplicate(
    tmp_path: Path,
) -> None:
    """--no-idempotency: each lost 202 makes a second run, and the summary reports every one."""
    manifest = make_archive(tmp_path / "a", 20, seed=5)
    async with emulator(drop_after_create_rate=0.3) as emu:
        res, _ = await run_engine(emu.base_url, manifest, tmp_path / "out.jsonl",
                                  idempotency=False)
        stats = emu.stats()
    assert res.exit_code == 0
    assert_all_completed_correctly(tmp_path / "out.jsonl", manifest)
    drops = stats["faults_injected"]["drop_after_create"]
    assert drops > 0
    assert stats["duplicate_submissions"] == drops == stats["runs_created"] - 20
    assert res.summary.to_json()["ambiguous_submits"] == drops


# ---- stalls and trickles --------------------------------------------------------------------


async def test_stalls_past_the_client_timeout_are_retried(tmp_path: Path) -> None:
    """A call stalled past submit/poll timeout is abandoned and retried; no duplicate run."""
    manifest = make_archive(tmp_path / "a", 20, seed=6)
    async with emulator(stall_rate=0.2, stall_seconds=5.0) as emu:
        t0 = time.monotonic()
        res, eng = await run_engine(emu.base_url, manifest, tmp_path / "out.jsonl",
                                    submit_timeout=0.5, poll_timeout=0.5)
        elapsed = time.monotonic() - t0
        stats = emu.stats()
    assert res.exit_code == 0
    assert_all_completed_correctly(tmp_path / "out.jsonl", manifest)
    stalls = stats["faults_injected"]["stall"]
    assert stalls > 0
    c = eng.client
    assert c is not None
    # Each stall costs one timeout and one retry (a loaded machine may add a slow call).
    assert c.stats.retries == c.stats.transport_errors >= stalls
    assert stats["runs_created"] == 20 and stats["duplicate_submissions"] == 0
    assert elapsed < 5.0  # nobody waited for a stall to end


async def test_stall_every_time_gives_up_after_exact_budget(tmp_path: Path) -> None:
    """Every call stalls: the row tries 1 + max_retries times, then fails with kind timeout."""
    manifest = make_archive(tmp_path / "a", 1, seed=7)
    async with emulator(stall_rate=1.0, stall_seconds=5.0) as emu:
        res, _ = await run_engine(emu.base_url, manifest, tmp_path / "out.jsonl",
                                  submit_timeout=0.3, max_retries=1)
        stats = emu.stats()
    lines = one_line_each(tmp_path / "out.jsonl", manifest_folders(manifest))
    assert {(r["status"], r["error"]["kind"]) for r in lines.values()} == {("failed", "timeout")}
    # Two attempts, both with the same Idempotency-Key: one run and one replay.
    assert stats["runs_created"] == 1 and stats["idempotent_replays"] == 1
    assert res.exit_code == 2


async def test_slow_trickle_responses_complete(tmp_path: Path) -> None:
    """Every answer trickles in 16 bytes at a time: slow but within timeouts, all complete."""
    manifest = make_archive(tmp_path / "a", 12, seed=8)
    async with emulator() as emu, FaultProxy("127.0.0.1", port_of(emu),
                                              lambda n: Fault.TRICKLE) as proxy:
        res, eng = await run_engine(proxy.base_url, manifest, tmp_path / "out.jsonl",
                                    submit_timeout=5.0, poll_timeout=5.0)
    assert res.exit_code == 0
    assert_all_completed_correctly(tmp_path / "out.jsonl", manifest)
    assert eng.client is not None and eng.client.stats.retries == 0
    assert proxy.faults["trickle"] == proxy.requests == eng.client.stats.calls


async def test_trickle_slower_than_the_timeout_is_a_timeout(tmp_path: Path) -> None:
    """An answer trickling past submit_timeout: retried within budget, then failed (timeout)."""
    manifest = make_archive(tmp_path / "a", 1, seed=9)
    async with emulator() as emu, FaultProxy("127.0.0.1", port_of(emu), lambda n: Fault.TRICKLE,
                                              trickle_bytes=1, trickle_delay=0.02) as proxy:
        res, _ = await run_engine(proxy.base_url, manifest, tmp_path / "out.jsonl",
                                  submit_timeout=0.3, max_retries=1)
        stats = emu.stats()
    lines = one_line_each(tmp_path / "out.jsonl", manifest_folders(manifest))
    assert {(r["status"], r["error"]["kind"]) for r in lines.values()} == {("failed", "timeout")}
    assert proxy.requests == 2
    assert stats["runs_created"] == 1 and stats["idempotent_replays"] == 1
    assert res.exit_code == 2


# ---- 503 bursts with Retry-After ------------------------------------------------------------


def inject_503_burst(state: EmulatorState, *, start: int, length: int) -> list[tuple[float, int]]:
    """Answer API requests start..start+length-1 (arrival order) with 503 + Retry-After: 1.

    Returns the arrival log ``(monotonic time, request number)``. The gate reads
    ``state.config`` right after ``request_started`` with no await in between, so the swap is
    exact per request.
    """
    arrivals: list[tuple[float, int]] = []
    calm = state.config
    stormy = dataclasses.replace(calm, error_rate=1.0)
    original = state.request_started

    def started() -> None:
        n = len(arrivals)
        arrivals.append((time.monotonic(), n))
        state.config = stormy if start <= n < start + length else calm
        original()

    state.request_started = started  # type: ignore[method-assign]
    return arrivals


async def test_503_burst_pauses_every_caller_and_all_rows_complete(tmp_path: Path) -> None:
    """A burst of 503 + Retry-After: 1 pauses the whole run (no new call for ~1 s), then resumes."""
    manifest = make_archive(tmp_path / "a", 30, seed=10)
    async with emulator() as emu:
        arrivals = inject_503_burst(emu.state, start=15, length=8)
        res, eng = await run_engine(emu.base_url, manifest, tmp_path / "out.jsonl")
        stats = emu.stats()
    assert res.exit_code == 0
    assert_all_completed_correctly(tmp_path / "out.jsonl", manifest)
    c = eng.client
    assert c is not None
    assert stats["errors_injected"] == c.stats.unavailable == 8
    assert c.stats.retries == 8 and c.stats.calls == len(arrivals)
    assert eng.limiter.paused_seconds_total >= 1.0
    # Global pause: once the first 503 was seen, calls already on the wire may land, but no
    # new call leaves for about a second (Retry-After: 1).
    t_first = arrivals[15][0]
    quiet = [n for t, n in arrivals if t_first + 0.4 < t < t_first + 0.9]
    assert quiet == [], f"calls during the pause: {quiet}"
    assert arrivals[-1][0] - t_first >= 0.9


# ---- 500 on retrieve, malformed JSON ----------------------------------------------------------


async def test_retrieve_500_fails_the_row_as_analysis_failed(tmp_path: Path) -> None:
    """retrieve 500: `failed` with kind analysis_failed and http 500, no resubmit, exit 2."""
    manifest = make_archive(tmp_path / "a", 20, seed=12)
    folders = manifest_folders(manifest)
    async with emulator(fail_rate=0.5) as emu:
        res, eng = await run_engine(emu.base_url, manifest, tmp_path / "out.jsonl",
                                    max_failure_rate=1.0)
        stats = emu.stats()
    lines = one_line_each(tmp_path / "out.jsonl", folders)
    failed = [r for r in lines.values() if r["status"] == "failed"]
    assert len(failed) == stats["runs"]["failed"] > 0
    for r in failed:
        assert (r["error"]["kind"], r["error"]["http_status"], r["attempts"]) == (
            "analysis_failed", 500, 1)
    for r in lines.values():
        if r["status"] == "completed":
            assert r["result"] == expected_for_folder(folders[r["id"]])
    assert stats["submissions"] == 20 and stats["polls_by_status"]["500"] == len(failed)
    assert eng.client is not None and eng.client.stats.retries == 0
    assert res.exit_code == 2


async def test_malformed_json_is_retried_and_never_stored(tmp_path: Path) -> None:
    """40 % of 200/202 retrieve bodies are truncated JSON: retried; stored results are intact."""
    manifest = make_archive(tmp_path / "a", 20, seed=13)
    async with emulator(malformed_json_rate=0.4) as emu:
        res, eng = await run_engine(emu.base_url, manifest, tmp_path / "out.jsonl")
        stats = emu.stats()
    assert res.exit_code == 0
    assert_all_completed_correctly(tmp_path / "out.jsonl", manifest)
    bad = stats["faults_injected"]["malformed_json"]
    assert bad > 0
    c = eng.client
    assert c is not None
    assert c.stats.retries == bad and c.stats.calls == calls_at_emulator(emu)


# ---- keep-alive closed by the server ----------------------------------------------------------


async def test_server_closing_idle_keepalive_connections(tmp_path: Path) -> None:
    """keepalive_timeout 20 ms, calls 40 ms apart: the server closes every connection between
    calls, the client reconnects; all rows complete, no duplicate run."""
    manifest = make_archive(tmp_path / "a", 8, seed=14)
    async with emulator(keepalive_timeout=0.02) as emu, \
            FaultProxy("127.0.0.1", port_of(emu)) as proxy:
        res, eng = await run_engine(proxy.base_url, manifest, tmp_path / "out.jsonl",
                                    rate_limit=25.0, burst=1, poll_min=0.05)
        stats = emu.stats()
    assert res.exit_code == 0
    assert_all_completed_correctly(tmp_path / "out.jsonl", manifest)
    c = eng.client
    assert c is not None
    # The server really closed idle connections: most calls needed a fresh one.
    assert proxy.connections >= c.stats.calls // 3
    assert stats["runs_created"] == 8 and stats["duplicate_submissions"] == 0
    # On a loaded machine the real race shows up now and then (a request sent on a connection
    # the server is closing: ECONNRESET): each costs exactly one retry, and no duplicate run.
    assert c.stats.retries == c.stats.transport_errors
    assert c.stats.calls - c.stats.transport_errors <= calls_at_emulator(emu) <= c.stats.calls


async def test_connection_closed_just_as_it_is_reused(tmp_path: Path) -> None:
    """The race: a kept-alive connection closed as the next request goes out. Retried, no dupes."""
    manifest = make_archive(tmp_path / "a", 12, seed=15)
    async with emulator(processing_time=(0.05, 0.1)) as emu, \
            FaultProxy("127.0.0.1", port_of(emu), idle_close=0.03) as proxy:
        res, eng = await run_engine(proxy.base_url, manifest, tmp_path / "out.jsonl",
                                    concurrency=2, poll_min=0.08, poll_max=0.2)
        stats = emu.stats()
    assert res.exit_code == 0
    assert_all_completed_correctly(tmp_path / "out.jsonl", manifest)
    closed = proxy.faults["idle_close"]
    assert closed > 0
    c = eng.client
    assert c is not None
    assert c.stats.retries == c.stats.transport_errors == closed
    assert stats["runs_created"] == 12 and stats["duplicate_submissions"] == 0


# ---- mass failure -------------------------------------------------------------------------


async def test_mass_failure_stops_early_and_a_rerun_resumes(tmp_path: Path) -> None:
    """Every analysis fails: the run stops after the window with exit 1 and a clear message;
    a rerun against a fixed API resumes, and --retry-failed completes every row exactly once."""
    manifest = make_archive(tmp_path / "a", 80, seed=16)
    out = tmp_path / "out.jsonl"
    kw: dict[str, Any] = dict(max_failure_rate=0.5, failure_window=10, concurrency=4)
    async with emulator(fail_rate=1.0) as emu:
        res, _ = await run_engine(emu.base_url, manifest, out, **kw)
        first_submissions = emu.stats()["submissions"]
    assert res.exit_code == 1
    assert "failed server-side" in str(res.error) and "rerun" in str(res.error)
    first = read_lines(out)
    assert 10 <= len(first) < 40, "stopped early instead of burning the archive"
    assert first_submissions < 40
    assert Counter(r["id"] for r in first).most_common(1)[0][1] == 1
    assert {r["error"]["kind"] for r in first} == {"analysis_failed"}

    async with emulator() as emu:  # the API is fixed
        res2, _ = await run_engine(emu.base_url, manifest, out, **kw)
        second_submissions = emu.stats()["submissions"]
    lines = one_line_each(out, manifest_folders(manifest))
    assert res2.exit_code == 2  # the rows that failed before stay failed
    assert sum(r["status"] == "failed" for r in lines.values()) == len(first)
    assert second_submissions <= 80 - len(first) + 20  # only unfinished rows (+ in-flight ones)

    async with emulator() as emu:
        res3, _ = await run_engine(emu.base_url, manifest, out, retry_failed=True, **kw)
    assert res3.exit_code == 0
    assert_all_completed_correctly(out, manifest)


# ---- archive oddities, end to end -----------------------------------------------------------


async def test_archive_oddities_fail_their_rows_and_are_never_uploaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every odd row is a `failed` line with its kind, nothing odd reaches the API; odd names
    (non-UTF-8, NFC/NFD) upload with the right multipart filename."""
    root = tmp_path / "root"
    rng = random.Random(17)
    outside = tmp_path / "outside"
    make_folder(outside, rng, n_files=1)

    def case(name: str) -> Path:
        path = root / name
        make_folder(path, rng, n_files=1)
        return path

    good = {"ok1": case("ok1"), "ok2": case("ok2")}
    latin1 = case("latin1")
    (latin1 / os.fsdecode(b"re\xe7u.pdf")).write_bytes(b"%PDF-1.4 latin-1 named file\n")
    good["latin1"] = latin1
    nf = case("nf")
    nfc, nfd = unicodedata.normalize("NFC", "décision.pdf"), unicodedata.normalize(
        "NFD", "décision.pdf")
    (nf / nfc).write_bytes(b"%PDF-1.4 nfc\n")
    (nf / nfd).write_bytes(b"%PDF-1.4 nfd\n")
    good["nf"] = nf

    (case("symout") / "leak.pdf").symlink_to(next(outside.iterdir()))
    (case("dangling") / "gone.pdf").symlink_to(root / "nowhere.pdf")
    os.mkfifo(case("fifo") / "pipe")
    unreadable = case("unreadable") / "secret.pdf"
    unreadable.write_bytes(b"%PDF-1.4 unreadable\n")
    real_access = os.access
    monkeypatch.setattr(manifest_mod.os, "access",
                        lambda p, m: os.fspath(p) != os.fspath(unreadable) and real_access(p, m))
    (case("big") / "huge.pdf").write_bytes(b"%PDF-1.4\n" + b"0" * 20_000)
    (root / "empty").mkdir()
    device = False
    try:
        os.mknod(case("device") / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        device = True
    except OSError:
        pass

    expect = {
        "symout": "symlink_outside", "dangling": "symlink_dangling", "fifo": "special_file",
        "unreadable": "file_unreadable", "big": "file_too_large", "empty": "folder_empty",
        "dotdot": "outside_root", "absolute": "outside_root", "missing": "folder_missing",
        "ok1#2": "duplicate_id", "ragged": "ragged_row", "nul\ufffd": "bad_row",
    }
    rows = [f"{k},{k}" for k in ("ok1", "ok2", "latin1", "nf", "symout", "dangling", "fifo",
                                 "unreadable", "big", "empty")]
    if device:
        rows.append("device,device")
        expect["device"] = "special_file"
    rows += [
        "dotdot,../outside",
        f"absolute,{outside}",
        "missing,nowhere",
        "ok1,ok2",  # duplicate id
        "ragged,ok1,extra",
        "nul\x00,ok1",
    ]
    text = "\ufeffid,folder\r\n" + "".join(r + "\r\n" for r in rows)
    manifest = root / "manifest.csv"
    manifest.write_bytes(text.encode("utf-8"))

    out = tmp_path / "out.jsonl"
    async with emulator() as emu:
        res, eng = await run_engine(emu.base_url, manifest, out, confine_to=root,
                                    max_file_size=10_000, max_failure_rate=1.0)
        submissions = emu.state.submissions_json()
    lines = read_lines(out)
    assert len(lines) == len(rows), "one line per manifest row"
    by_line = {r["line"]: r for r in lines}
    assert sorted(by_line) == list(range(2, len(rows) + 2))
    assert eng.producer_stats.rows_read == len(rows)
    kinds: dict[str, str] = {}
    for r in lines:
        if r["status"] == "failed":
            key = "ok1#2" if r["error"]["kind"] == "duplicate_id" else r["id"]
            kinds[key] = r["error"]["kind"]
            assert r["error"]["message"], r
            assert r["attempts"] == 0 and r["submitted_at"] is None  # never sent
    assert kinds == expect
    completed = {r["id"]: r for r in lines if r["status"] == "completed"}
    assert set(completed) == set(good)
    for row_id, path in good.items():
        assert completed[row_id]["result"] == expected_for_folder(path), row_id
    assert res.exit_code == 2

    # Only the good folders reached the API, each once, with the names as on disk.
    assert len(submissions) == len(good)
    sent_names = sorted(f["name"] for s in submissions for f in s["files"])
    on_disk = sorted(multipart_filename(n) for p in good.values() for n in os.listdir(p))
    assert sent_names == on_disk
    assert "re%E7u.pdf" in sent_names  # undecodable byte → %XX, never dropped
    assert nfc in sent_names and nfd in sent_names and nfc != nfd
    assert not {"leak.pdf", "gone.pdf", "pipe", "secret.pdf", "huge.pdf"} & set(sent_names)


# ---- retrieve 403: a token of another key ---------------------------------------------------


async def test_tokens_of_another_key_stop_the_run_as_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Journal written with key A, rerun with key B: retrieve answers 403, the run stops at once
    (exit 1, a message naming the fix), nothing is written; the rerun with key A finishes."""
    manifest = make_archive(tmp_path / "a", 6, seed=18)
    out = tmp_path / "out.jsonl"
    other_key = "second-key-abcdef0123"
    added: list[object] = []
    async with emulator(api_keys=(API_KEY, other_key)) as emu:
        # Run 1 (key A): interrupted as soon as every row holds a live token.
        first = Engine(engine_settings(emu.base_url, out, poll_min=20, poll_max=30), manifest)
        original_add = PollScheduler.add

        def add(self: PollScheduler, sub: Any, *, delay: float | None = None) -> None:
            original_add(self, sub, delay=delay)
            added.append(sub)
            if len(added) == 6:
                first.interrupt()

        with monkeypatch.context() as m:
            m.setattr(PollScheduler, "add", add)
            r1 = await first.run()
        assert r1.exit_code == 130 and not read_lines(out)

        # Run 2 (key B): the live tokens belong to key A.
        r2 = await Engine(engine_settings(emu.base_url, out, api_key=other_key), manifest).run()
        assert r2.exit_code == 1
        assert "another key" in str(r2.error) and other_key not in str(r2.error)
        assert not read_lines(out)
        assert emu.stats()["polls_by_status"].get("403", 0) >= 1

        # Run 3 (key A again): resumes the same tokens, every row exactly once.
        r3 = await Engine(engine_settings(emu.base_url, out), manifest).run()
        stats = emu.stats()
    assert r3.exit_code == 0
    assert_all_completed_correctly(out, manifest)
    assert stats["runs_created"] == 6  # never resubmitted
