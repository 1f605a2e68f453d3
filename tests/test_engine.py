"""End to end: the engine against the in-process emulator, checked at both ends."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from bulk_engine.emulator import EmulatorConfig, run_emulator
from bulk_engine.engine import Engine

from archive_factory import make_archive
from conftest import API_KEY, engine_settings, expected_for_folder, folder_bytes, read_lines

pytestmark = pytest.mark.timeout(60)

FAST = EmulatorConfig(api_keys=(API_KEY,), processing_time=(0.01, 0.02))


def _folders(manifest: Path) -> dict[str, Path]:
    with manifest.open(newline="", encoding="utf-8") as fh:
        return {row["id"]: manifest.parent / row["folder"] for row in csv.DictReader(fh)}


async def test_every_row_once_with_its_own_result(tmp_path: Path) -> None:
    """250 folders: one line each, each result the one computed from that folder's bytes."""
    manifest = make_archive(tmp_path / "a", 250, seed=3)
    folders = _folders(manifest)
    cfg = EmulatorConfig(api_keys=(API_KEY,), processing_time=(0.01, 0.08),
                         max_parallel_analyses=10, seed=1)
    async with run_emulator(cfg) as emu:
        out = tmp_path / "out.jsonl"
        result = await Engine(engine_settings(emu.base_url, out, concurrency=6), manifest).run()
        stats = emu.stats()
    assert result.exit_code == 0, result.summary.to_json()
    lines = read_lines(out)
    assert len(lines) == 250
    assert sorted(r["id"] for r in lines) == sorted(folders)
    for rec in lines:
        assert rec["status"] == "completed"
        assert rec["result"] == expected_for_folder(folders[rec["id"]]), rec["id"]
    assert stats["bytes_received"] == sum(folder_bytes(p) for p in folders.values())
    assert stats["duplicate_submissions"] == 0
    assert stats["submissions"] == 250
    assert stats["max_parallel_observed"] <= 10


async def test_rate_limit_respected_at_the_server(tmp_path: Path) -> None:
    """Engine and emulator at the same rate: under 1 % of calls throttled, all rows complete.

    Both buckets refill at the same rate, so in steady state the server's bucket hovers near
    empty and a millisecond of arrival jitter can cost one 429; the AIMD step then backs off.
    """
    manifest = make_archive(tmp_path / "a", 60, seed=4)
    # The server's bucket holds a little more than the client's burst: arrival jitter on a
    # loaded 2-core machine must not count as the client breaking the rate.
    cfg = EmulatorConfig(api_keys=(API_KEY,), processing_time=(0.01, 0.05), rate_limit=80,
                         burst=10, seed=2)
    async with run_emulator(cfg) as emu:
        out = tmp_path / "out.jsonl"
        result = await Engine(
            engine_settings(emu.base_url, out, rate_limit=80, burst=5), manifest).run()
        stats = emu.stats()
    assert result.exit_code == 0
    calls = stats["submissions"] + stats["polls"]
    assert stats["rate_limited"] <= max(1, 0.01 * calls)
    assert len(read_lines(out)) == 60


async def test_bad_key_stops_the_run_early(tmp_path: Path) -> None:
    """A refused key stops the run within a handful of requests with exit 1 and a clear message."""
    manifest = make_archive(tmp_path / "a", 100, seed=5)
    async with run_emulator(EmulatorConfig(api_keys=("other",))) as emu:
        out = tmp_path / "out.jsonl"
        result = await Engine(engine_settings(emu.base_url, out, concurrency=4), manifest).run()
        stats = emu.stats()
    assert result.exit_code == 1
    assert "refused the key" in str(result.error)
    assert API_KEY not in str(result.error)
    assert stats["submissions"] <= 10


async def test_failed_folders_give_exit_2(tmp_path: Path) -> None:
    """fail_rate=0.3: failed rows are `failed` lines with analysis_failed, the run exits 2."""
    manifest = make_archive(tmp_path / "a", 40, seed=6)
    cfg = EmulatorConfig(api_keys=(API_KEY,), processing_time=(0.01, 0.03), fail_rate=0.3,
                         seed=3)
    async with run_emulator(cfg) as emu:
        out = tmp_path / "out.jsonl"
        result = await Engine(engine_settings(emu.base_url, out, max_failure_rate=1.0),
                              manifest).run()
    lines = read_lines(out)
    assert len(lines) == 40
    failed = [r for r in lines if r["status"] == "failed"]
    assert failed and all(r["error"]["kind"] == "analysis_failed" for r in failed)
    assert all(r["error"]["http_status"] == 500 for r in failed)
    assert result.exit_code == 2


async def test_bad_rows_become_failed_lines_and_the_run_goes_on(tmp_path: Path) -> None:
    """Missing, empty and file-less folders are `failed` lines with their kind; others complete."""
    root = tmp_path / "a"
    manifest = make_archive(root, 5, seed=7)
    (root / "empty").mkdir()
    with manifest.open("a", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["gone", "no/such/folder"])
        w.writerow(["blank", ""])
        w.writerow(["nofiles", "empty"])
    async with run_emulator(FAST) as emu:
        out = tmp_path / "out.jsonl"
        result = await Engine(engine_settings(emu.base_url, out), manifest).run()
        stats = emu.stats()
    by_id = {r["id"]: r for r in read_lines(out)}
    assert len(by_id) == 8
    assert by_id["gone"]["error"]["kind"] == "folder_missing"
    assert by_id["blank"]["error"]["kind"] == "empty_folder"
    assert by_id["nofiles"]["error"]["kind"] == "folder_empty"
    assert all(by_id[i]["status"] == "failed" for i in ("gone", "blank", "nofiles"))
    assert sum(r["status"] == "completed" for r in by_id.values()) == 5
    assert stats["submissions"] == 5
    assert result.exit_code == 2
    assert result.summary.to_json()["rows_rejected"] == 3


async def test_root_walk_makes_each_leaf_folder_a_row(tmp_path: Path) -> None:
    """--root: every leaf folder is a row whose id is its relative path."""
    root = tmp_path / "a"
    manifest = make_archive(root, 6, seed=8)
    manifest.unlink()
    async with run_emulator(FAST) as emu:
        out = tmp_path / "out.jsonl"
        settings = engine_settings(emu.base_url, out, root=root)
        result = await Engine(settings, None).run()
    lines = read_lines(out)
    assert result.exit_code == 0
    assert len(lines) == 6
    for rec in lines:
        assert (root / rec["id"]).is_dir()
        assert rec["result"] == expected_for_folder(root / rec["id"])


async def test_sync_mode_bounds_uploads_in_flight(tmp_path: Path) -> None:
    """Sync mode holds each POST open while the folder runs: in flight never above concurrency."""
    manifest = make_archive(tmp_path / "a", 24, seed=9)
    folders = _folders(manifest)
    cfg = EmulatorConfig(api_keys=(API_KEY,), processing_time=(0.05, 0.1),
                         max_parallel_analyses=10)
    async with run_emulator(cfg) as emu:
        out = tmp_path / "out.jsonl"
        result = await Engine(engine_settings(emu.base_url, out, mode="sync", concurrency=3),
                              manifest).run()
        stats = emu.stats()
    assert result.exit_code == 0
    assert stats["max_in_flight_requests"] == 3
    assert stats["polls"] == 0
    for rec in read_lines(out):
        assert rec["polls"] == 0
        assert rec["result"] == expected_for_folder(folders[rec["id"]])


async def test_auto_mode_sends_small_decision_folders_sync(tmp_path: Path) -> None:
    """auto: small decision-only folders go sync, folders asking share_link go async."""
    root = tmp_path / "a"
    manifest = make_archive(root, 10, seed=10)
    with manifest.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "folder", "analyse_type"])
        for i, row in enumerate(rows):
            w.writerow([row["id"], row["folder"], "decision;share_link" if i % 2 else ""])
    async with run_emulator(FAST) as emu:
        out = tmp_path / "out.jsonl"
        result = await Engine(engine_settings(emu.base_url, out, mode="auto"), manifest).run()
        subs = emu.state.submissions_json()
    assert result.exit_code == 0
    modes = sorted(s["asynchronous"] for s in subs)
    assert modes == [False] * 5 + [True] * 5
    for rec in read_lines(out):
        i = int(rec["id"].split("-")[-1])
        want = ("decision", "share_link") if i % 2 else ("decision",)
        assert rec["result"] == expected_for_folder(root / rows[i]["folder"], want)


async def test_outstanding_folders_are_bounded(tmp_path: Path) -> None:
    """max_outstanding caps folders submitted but not yet retrieved, as seen by the server."""
    manifest = make_archive(tmp_path / "a", 40, seed=11)
    cfg = EmulatorConfig(api_keys=(API_KEY,), processing_time=(0.15, 0.25),
                         max_parallel_analyses=100)
    async with run_emulator(cfg) as emu:
        out = tmp_path / "out.jsonl"
        settings = engine_settings(emu.base_url, out, concurrency=4, max_outstanding=6)
        result = await Engine(settings, manifest).run()
        stats = emu.stats()
    assert result.exit_code == 0
    assert len(read_lines(out)) == 40
    # Every accepted folder starts at once (cap 100), so analyses running together = outstanding.
    assert 4 <= stats["max_parallel_observed"] <= 6
