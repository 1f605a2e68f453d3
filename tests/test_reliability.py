"""Issue 10's defects, one regression test each (the hostile-server ones are in test_hostile.py).

Each test reproduces what a hostile trial found on the earlier engine — a wrong result accepted
silently, rows lost, a stall, an internal error shown as a bug — and proves the fix at the depth
where it belongs: the request identity, the output as the authority for "done", the manifest as
the authority for which rows exist, the output lock, storage errors named with their file.
"""

from __future__ import annotations

import csv
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from bulk_engine import cli
from bulk_engine.client import idempotency_key, submission_for
from bulk_engine.config import Settings
from bulk_engine.emulator import Emulator, EmulatorConfig, run_emulator
from bulk_engine.engine import Engine
from bulk_engine.errors import ConfigError, ManifestError
from bulk_engine.journal import Journal
from bulk_engine.logs import reset_logging
from bulk_engine.manifest import list_folder
from bulk_engine.models import Job, fingerprint_files
from bulk_engine.writer import OutputLock

from archive_factory import make_archive, make_folder
from conftest import API_KEY, engine_settings, expected_for_folder, read_lines
from test_resume import run_until, wait_stats

pytestmark = pytest.mark.timeout(60)


def fast_config(**kw: Any) -> EmulatorConfig:
    base: dict[str, Any] = dict(api_keys=(API_KEY,), processing_time=(0.01, 0.03),
                                max_parallel_analyses=20, seed=1)
    base.update(kw)
    return EmulatorConfig(**base)


def folders_of(manifest: Path) -> dict[str, Path]:
    with manifest.open(newline="", encoding="utf-8") as fh:
        return {row["id"]: manifest.parent / row["folder"] for row in csv.DictReader(fh)}


def write_manifest(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "folder"])
        w.writerows(rows)


def settings(emu: Emulator, out: Path, **kw: Any) -> Settings:
    return engine_settings(emu.base_url, out, **kw)


# ---- 1. the Idempotency-Key covers everything that changes the request -------------------------


def test_idempotency_key_changes_with_everything_the_request_asks() -> None:
    """Row id, payload as sent (analyse_type, use_case, the row's payload, the mode), files and
    key each change the key; only a new generation changes it for the same request."""
    job = Job(line=2, id="r1", folder="f", path=Path("/f"), files=(), fingerprint="abc")
    base = Settings(api_key="k1")

    def key(settings: Settings = base, j: Job = job, *, asynchronous: bool = True,
            generation: int = 1) -> str:
        return idempotency_key(submission_for(settings, j, asynchronous=asynchronous)[1],
                               generation)

    variants = {
        "base": key(),
        "analyse_type": key(base.replace(analyse_type=("decision", "explanation"))),
        "use_case": key(base.replace(use_case="credit")),
        "payload": key(j=Job(line=2, id="r1", folder="f", path=Path("/f"), files=(),
                             fingerprint="abc", payload={"x": 1})),
        "files": key(j=Job(line=2, id="r1", folder="f", path=Path("/f"), files=(),
                           fingerprint="abd")),
        "row": key(j=Job(line=2, id="r2", folder="f", path=Path("/f"), files=(),
                         fingerprint="abc")),
        "mode": key(asynchronous=False),
        "api_key": key(base.replace(api_key="k2")),
        "generation": key(generation=2),
    }
    assert len(set(variants.values())) == len(variants), variants
    assert key() == variants["base"]  # stable


async def test_a_new_analyse_type_is_a_new_request_never_a_replay(tmp_path: Path) -> None:
    """The same manifest run again into a new output asking decision, explanation and share_link:
    every row gets all three (its own folder's), none is a replay of the decision-only runs."""
    manifest = make_archive(tmp_path / "a", 12, seed=1)
    folders = folders_of(manifest)
    every = ("decision", "explanation", "share_link")
    async with run_emulator(fast_config()) as emu:
        r1 = await Engine(settings(emu, tmp_path / "one.jsonl"), manifest).run()
        r2 = await Engine(settings(emu, tmp_path / "all.jsonl", analyse_type=every),
                          manifest).run()
        stats = emu.stats()
    assert (r1.exit_code, r2.exit_code) == (0, 0)
    assert stats["idempotent_replays"] == 0 and stats["runs_created"] == 24
    for rec in read_lines(tmp_path / "all.jsonl"):
        assert rec["result"] == expected_for_folder(folders[rec["id"]], every), rec["id"]


# ---- 3. the output, not the journal, decides what is done ------------------------------------


async def test_deleted_output_is_rebuilt_by_re_polling_live_results(tmp_path: Path) -> None:
    """Output deleted, journal kept: the rerun writes every row again — re-polling the tokens of
    rows that completed recently (no new upload) — and says so (`rows_redone`)."""
    manifest = make_archive(tmp_path / "a", 20, seed=2)
    folders = folders_of(manifest)
    out = tmp_path / "out.jsonl"
    async with run_emulator(fast_config()) as emu:
        assert (await Engine(settings(emu, out), manifest).run()).exit_code == 0
        out.unlink()
        with capture_logs() as logs:
            r2 = await Engine(settings(emu, out), manifest).run()
        stats = emu.stats()
    assert r2.exit_code == 0
    lines = read_lines(out)
    assert sorted(r["id"] for r in lines) == sorted(folders)
    assert all(r["result"] == expected_for_folder(folders[r["id"]]) for r in lines)
    assert stats["submissions"] == 20  # nothing uploaded twice: the results were re-polled
    assert r2.summary.to_json()["rows_redone"] == 20
    assert any(e["event"] == "rows_redone" and e["repolled"] == 20 for e in logs)


async def test_failed_lines_deleted_by_hand_are_redone(tmp_path: Path) -> None:
    """Failed lines removed from the output by hand: the rerun resubmits exactly those rows."""
    manifest = make_archive(tmp_path / "a", 30, seed=3)
    folders = folders_of(manifest)
    out = tmp_path / "out.jsonl"
    async with run_emulator(fast_config(fail_rate=0.4, seed=5)) as emu:
        r1 = await Engine(settings(emu, out), manifest).run()
    first = read_lines(out)
    failed = {r["id"] for r in first if r["status"] == "failed"}
    assert r1.exit_code == 2 and len(failed) >= 5
    kept = [line for line in out.read_bytes().splitlines(keepends=True)
            if not any(f'"id":"{i}"'.encode() in line for i in failed)]
    out.write_bytes(b"".join(kept))
    async with run_emulator(fast_config()) as emu:
        r2 = await Engine(settings(emu, out), manifest).run()
        stats = emu.stats()
    assert r2.exit_code == 0 and stats["submissions"] == len(failed)
    lines = read_lines(out)
    assert sorted(r["id"] for r in lines) == sorted(folders)
    assert {r["id"] for r in lines if r["attempts"] == 2} == failed  # a new generation each


# ---- 6. the manifest decides which rows exist -------------------------------------------------


async def test_manifest_edited_after_a_kill(tmp_path: Path) -> None:
    """Interrupted with every token live; the manifest then loses two rows and one row points at
    another folder. The rerun writes no line for the removed rows (a warning each), and the
    changed row's result is its new folder's, under a new key — never the old folder's."""
    manifest = make_archive(tmp_path / "a", 8, seed=4)
    folders = folders_of(manifest)
    other = tmp_path / "a" / "cases" / "other"
    make_folder(other, random.Random(99))
    out = tmp_path / "out.jsonl"
    async with run_emulator(fast_config()) as emu:
        first = Engine(settings(emu, out, poll_min=20, poll_max=30), manifest)
        await run_until(first, lambda: first.counters.submitted == 8)
        rows = [(i, f"cases/{i}") for i in sorted(folders)]
        removed = {rows[1][0], rows[5][0]}
        changed = rows[3][0]
        write_manifest(manifest, [(i, "cases/other" if i == changed else f)
                                  for i, f in rows if i not in removed])
        with capture_logs() as logs:
            r2 = await Engine(settings(emu, out), manifest).run()
    assert r2.exit_code == 0
    lines = {r["id"]: r for r in read_lines(out)}
    assert set(lines) == set(folders) - removed
    assert lines[changed]["result"] == expected_for_folder(other)
    assert lines[changed]["attempts"] == 2
    left = [e for e in logs if e["event"] == "row_left_manifest"]
    assert sorted(e["id"] for e in left) == sorted(removed)
    assert r2.summary.to_json()["rows_dropped"] == 2


# ---- 7. one output, one writer -----------------------------------------------------------------


async def test_a_second_run_on_the_same_output_is_refused_whatever_its_journal(
    tmp_path: Path,
) -> None:
    """While one run writes an output, another given the same output and a different --journal
    is refused with a clear message (it used to append its lines too)."""
    manifest = make_archive(tmp_path / "a", 3, seed=5)
    out = tmp_path / "out.jsonl"
    with OutputLock(out):  # another process's run holds it
        engine = Engine(engine_settings("http://127.0.0.1:9", out,
                                        journal=tmp_path / "other.journal"), manifest)
        with pytest.raises(ConfigError, match="being written by another running"):
            await engine.run()
    assert not (tmp_path / "other.journal").exists()


# ---- 8. storage errors are messages, not tracebacks ---------------------------------------------


def test_journal_disk_full_is_a_clear_error_naming_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The journal's disk fills up mid-run (SQLite's "database or disk is full", here from a
    page cap): the CLI prints one line naming the journal and what to do, exit 1, no traceback."""
    manifest = make_archive(tmp_path / "a", 40, seed=6)
    real_setup = Journal._setup

    def capped(self: Journal) -> None:
        real_setup(self)
        pages = self._conn.execute("PRAGMA page_count").fetchone()[0]
        self._conn.execute(f"PRAGMA max_page_count = {pages + 1}")

    monkeypatch.setattr(Journal, "_setup", capped)
    code = _run_cli_against_emulator(tmp_path, manifest, capsys)
    err = capsys.readouterr().err
    assert code == 1
    assert "out.jsonl.journal" in err and "the disk is full" in err
    assert "Traceback" not in err and "internal error" not in err


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 KiB tmpfs: a real file system that fills up (needs root, as CI has)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a tmpfs: {done.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_output_disk_full_is_a_clear_error_naming_the_output(
    tmp_path: Path, tiny_disk: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The output's disk fills up (a 4 KiB tmpfs): one line naming the output and the cause,
    exit 1, no traceback; the journal (elsewhere) stays consistent for the rerun."""
    manifest = make_archive(tmp_path / "a", 40, seed=7)
    out = tiny_disk / "out.jsonl"
    code = _run_cli_against_emulator(tmp_path, manifest, capsys, out=out,
                                     journal=tmp_path / "out.journal")
    err = capsys.readouterr().err
    assert code == 1
    assert str(out) in err.replace("\n", "") and "No space left on device" in err
    assert "Traceback" not in err and "internal error" not in err


def test_an_output_that_is_a_device_is_refused(tmp_path: Path) -> None:
    """An output that is not a regular file (here a link to /dev/full, which reads forever) is
    refused before anything is read from it."""
    out = tmp_path / "out.jsonl"
    out.symlink_to("/dev/full")
    manifest = make_archive(tmp_path / "a", 1, seed=7)
    with pytest.raises(ConfigError, match="not a regular file"):
        anyio.run(Engine(engine_settings("http://127.0.0.1:9", out), manifest).run)


def _run_cli_against_emulator(tmp_path: Path, manifest: Path,
                              capsys: pytest.CaptureFixture[str], *, out: Path | None = None,
                              journal: Path | None = None) -> int:
    """``python -m bulk_engine`` in-process against an emulator in a thread of its own."""
    import asyncio
    import threading

    ready = threading.Event()
    stop: asyncio.Event | None = None
    url: list[str] = []

    async def serve() -> None:
        nonlocal stop
        stop = asyncio.Event()
        async with run_emulator(fast_config()) as emu:
            url.append(emu.base_url)
            ready.set()
            await stop.wait()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),))
    thread.start()
    try:
        assert ready.wait(10)
        os.environ["BULK_ENGINE_API_KEY"] = API_KEY
        args = [str(manifest), "--base-url", url[0], "--output",
                str(out or tmp_path / "out.jsonl"), "--rate-limit", "500", "--poll-min",
                "0.02", "--poll-max", "0.1", "--no-progress", "--log-level", "error"]
        if journal is not None:
            args += ["--journal", str(journal)]
        return cli.main(args)
    finally:
        reset_logging()  # the CLI configured structlog for the process: undo it
        os.environ.pop("BULK_ENGINE_API_KEY", None)
        assert stop is not None
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


@pytest.mark.parametrize("bad", ["key-with-newline\n", "key\rx", " padded"])
def test_a_key_with_a_line_break_is_a_config_error_that_never_shows_it(bad: str) -> None:
    """A key with a control character or surrounding spaces (a key file's trailing newline) is
    refused as a setting, with a message naming the setting and never the key."""
    with pytest.raises(ConfigError) as ei:
        Settings(api_key=bad)
    assert "api_key" in str(ei.value) and bad.strip() not in str(ei.value)


# ---- 9. rough edges ------------------------------------------------------------------------------


def test_a_symlink_loop_is_reported_as_a_loop(tmp_path: Path) -> None:
    """Two links pointing at each other: `symlink_dangling`, and the message says "loop"."""
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "doc.pdf").write_bytes(b"%PDF-1.4")
    os.symlink("b", folder / "a")
    os.symlink("a", folder / "b")
    with pytest.raises(ManifestError) as ei:
        list_folder(folder, max_file_size=1 << 20, follow_symlinks=False)
    assert ei.value.kind == "symlink_dangling" and "loop" in ei.value.message
    assert "does not exist" not in ei.value.message


async def test_retry_after_pause_is_logged(tmp_path: Path) -> None:
    """The server's Retry-After pauses every call: it is logged (it used to be silent)."""
    manifest = make_archive(tmp_path / "a", 20, seed=8)
    async with run_emulator(fast_config(rate_limit=5.0, burst=2)) as emu:
        with capture_logs() as logs:
            res = await Engine(settings(emu, tmp_path / "out.jsonl", rate_limit=50.0, burst=10),
                               manifest).run()
    pauses = [e for e in logs if e["event"] == "paused_by_server"]
    assert res.exit_code == 0 and pauses
    assert all(e["http_status"] == 429 and e["seconds"] >= 1 for e in pauses)
    throttled = res.summary.to_json()["throttled_429"]
    assert len(pauses) <= throttled  # one line per new or longer pause, never more


async def test_a_stalled_submit_is_visible_and_bounded(tmp_path: Path) -> None:
    """An API that never answers POST /case: each timed-out attempt is a warning naming the
    row; the default timeout is bounded (120 s, not 300 s per attempt)."""
    assert Settings().submit_timeout == 120.0
    manifest = make_archive(tmp_path / "a", 1, seed=9)
    async with run_emulator(fast_config(stall_rate=1.0, stall_seconds=5.0),
                            shutdown_timeout=0.1) as emu:
        with capture_logs() as logs:
            res = await Engine(settings(emu, tmp_path / "out.jsonl", submit_timeout=0.2,
                                        max_retries=1), manifest).run()
    warnings = [e for e in logs if e["event"] == "call_timed_out"]
    assert res.exit_code == 2 and len(warnings) == 2
    assert all(e["log_level"] == "warning" and e["endpoint"] == "submit" for e in warnings)


async def test_resumed_rows_are_not_counted_as_skipped_done(tmp_path: Path) -> None:
    """Rows finished from tokens resumed at startup are `rows_resumed`, not `rows_skipped_done`
    (which counts rows an earlier run had finished)."""
    manifest = make_archive(tmp_path / "a", 16, seed=10)
    out = tmp_path / "out.jsonl"
    async with run_emulator(fast_config()) as emu:
        first = Engine(settings(emu, out, concurrency=2, max_outstanding=6), manifest)
        await run_until(first, lambda: first.counters.completed >= 4)
        done_before = len(read_lines(out))
        await wait_stats(emu, lambda st: st["runs"]["queued"] + st["runs"]["running"] == 0)
        second = Engine(settings(emu, out), manifest)
        r2 = await second.run()
    s = r2.summary.to_json()
    assert r2.exit_code == 0 and len(read_lines(out)) == 16
    assert s["rows_skipped_done"] == done_before
    assert s["rows_resumed"] + s["rows_skipped_done"] + s["rows"] >= 16
    assert s["rows_skipped_done"] + s["rows"] == 16


def test_an_unusable_manifest_leaves_no_journal_behind(tmp_path: Path) -> None:
    """A manifest with no `folder` column stops the run before any state exists for it."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,path\n1,x\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    with pytest.raises(ConfigError, match="no 'folder' column"):
        anyio.run(Engine(engine_settings("http://127.0.0.1:9", out), manifest).run)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv"]  # no journal, no output


async def test_a_fresh_run_does_not_warn_that_the_output_changed(tmp_path: Path) -> None:
    """No output and no journal yet: nothing to rescan, no `output_changed` warning."""
    manifest = make_archive(tmp_path / "a", 3, seed=11)
    async with run_emulator(fast_config()) as emu:
        with capture_logs() as logs:
            res = await Engine(settings(emu, tmp_path / "out.jsonl"), manifest).run()
    assert res.exit_code == 0
    assert [e for e in logs if e["event"] == "output_changed"] == []


def test_fingerprints_follow_file_changes(tmp_path: Path) -> None:
    """(Guard for the request identity) a folder's fingerprint changes with its files."""
    folder = tmp_path / "f"
    make_folder(folder, random.Random(1))
    before = fingerprint_files(list_folder(folder, max_file_size=1 << 30, follow_symlinks=False))
    shutil.copy(next(folder.iterdir()), folder / "zz-extra.pdf")
    after = fingerprint_files(list_folder(folder, max_file_size=1 << 30, follow_symlinks=False))
    assert before != after
