"""Resume after an interruption, in-process: the engine against the in-process emulator.

A crash is stood in for by ``Engine.interrupt()`` at a chosen moment (rows mid-POST, live tokens,
a partial output) or by editing the output/journal the way a crash would leave them (a torn last
line, a ``--retry-failed`` rewrite cut in the middle). Real SIGKILLs of a real process are in
``test_chaos.py``. Each test reruns the same command and checks invariant 1 (every row exactly
once) and invariant 2 (each result is the one computed from that row's folder).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from bulk_engine.client import multipart_filename
from bulk_engine.config import Settings
from bulk_engine.emulator import Emulator, EmulatorConfig, content_digest, run_emulator
from bulk_engine.engine import Engine, RunResult
from bulk_engine.journal import Journal
from bulk_engine.manifest import list_folder
from bulk_engine.writer import rewrite_without_failed

from archive_factory import make_archive, make_pdf
from conftest import API_KEY, engine_settings, expected_for_folder, key_for, read_lines

pytestmark = pytest.mark.timeout(60)


# ---------------------------------------------------------------------- helpers


def folders_of(manifest: Path) -> dict[str, Path]:
    with manifest.open(newline="", encoding="utf-8") as fh:
        return {row["id"]: manifest.parent / row["folder"] for row in csv.DictReader(fh)}


def digest_of(folder: Path) -> str:
    """The emulator's content digest of a folder as it is on disk now."""
    files = list_folder(folder, max_file_size=1 << 40, follow_symlinks=False)
    return content_digest(
        (multipart_filename(f.name), hashlib.sha256(f.path.read_bytes()).hexdigest())
        for f in files
    )


def assert_each_row_once(out: Path, folders: dict[str, Path]) -> list[dict[str, Any]]:
    """Exactly one line per manifest row, and every completed result is its folder's own."""
    lines = read_lines(out)
    ids = Counter(r["id"] for r in lines)
    assert sorted(ids) == sorted(folders), "rows missing or unknown"
    assert max(ids.values()) == 1, [i for i, n in ids.items() if n > 1]
    for rec in lines:
        assert rec["folder"] == f"cases/{rec['id']}"
        if rec["status"] == "completed":
            assert rec["result"] == expected_for_folder(folders[rec["id"]]), rec["id"]
    return lines


async def run_until(engine: Engine, cond: Callable[[], bool], *, timeout: float = 20) -> RunResult:
    """Run ``engine``, interrupting it (as Ctrl-C does) once ``cond()`` holds."""
    result: RunResult | None = None
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            with anyio.fail_after(timeout):
                while not cond():
                    await anyio.sleep(0.002)
            engine.interrupt()

        tg.start_soon(watch)
        result = await engine.run()
        tg.cancel_scope.cancel()
    assert result is not None
    return result


async def wait_stats(emu: Emulator, cond: Callable[[dict[str, Any]], bool],
                     *, timeout: float = 10) -> dict[str, Any]:
    """Poll the emulator's counters until ``cond`` holds."""
    with anyio.fail_after(timeout):
        while not cond(stats := emu.stats()):
            await anyio.sleep(0.01)
    return stats


def submissions_by_digest(emu: Emulator) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for sub in emu.state.submissions_json():
        out.setdefault(sub["digest"], []).append(sub)
    return out


def settings(emu: Emulator, out: Path, **kw: Any) -> Settings:
    return engine_settings(emu.base_url, out, **kw)


def fast_config(**kw: Any) -> EmulatorConfig:
    base: dict[str, Any] = dict(api_keys=(API_KEY,), processing_time=(0.01, 0.04),
                                max_parallel_analyses=20, seed=1)
    base.update(kw)
    return EmulatorConfig(**base)


# ---------------------------------------------------------------------- live tokens


async def test_live_tokens_are_polled_not_resubmitted(tmp_path: Path) -> None:
    """Interrupted with every token live: the rerun polls them; no folder is uploaded twice."""
    manifest = make_archive(tmp_path / "a", 30, seed=11)
    folders = folders_of(manifest)
    out = tmp_path / "out.jsonl"
    async with run_emulator(fast_config()) as emu:
        # Polls far in the future: every row stays `submitted` until the interrupt.
        first = Engine(settings(emu, out, poll_min=20, poll_max=30), manifest)
        r1 = await run_until(first, lambda: first.counters.submitted == 30)
        assert r1.exit_code == 130
        with Journal.open(out.with_name("out.jsonl.journal")) as j:
            assert j.counts()["submitted"] == 30
        second = await Engine(settings(emu, out), manifest).run()
        stats = emu.stats()
    assert second.exit_code == 0
    assert second.summary.to_json()["rows_resumed"] == 30
    assert stats["submissions"] == 30
    assert stats["duplicate_submissions"] == 0
    lines = assert_each_row_once(out, folders)
    assert all(r["status"] == "completed" and r["attempts"] == 1 for r in lines)


# ---------------------------------------------------------------------- torn line


async def test_torn_last_line_is_repaired_on_rerun(tmp_path: Path) -> None:
    """Half a JSON line appended after a partial run (a crash mid-write) is cut; rows once."""
    manifest = make_archive(tmp_path / "a", 40, seed=12)
    folders = folders_of(manifest)
    out = tmp_path / "out.jsonl"
    async with run_emulator(fast_config()) as emu:
        first = Engine(settings(emu, out, concurrency=2, max_outstanding=4), manifest)
        await run_until(first, lambda: first.counters.completed >= 10)
        partial = read_lines(out)
        assert 10 <= len(partial) < 40
        done = {r["id"] for r in partial}
        victim = next(i for i in sorted(folders) if i not in done)
        torn = (b'{"id":"%s","folder":"cases/%s","status":"completed","result":{"deci'
                % (victim.encode(), victim.encode()))
        with out.open("ab") as fh:
            fh.write(torn)
        second = await Engine(settings(emu, out), manifest).run()
    assert second.exit_code == 0
    assert not out.read_bytes().endswith(torn)
    lines = assert_each_row_once(out, folders)
    assert all(r["status"] == "completed" for r in lines)


async def test_torn_line_of_a_done_row_is_cut_and_not_redone(tmp_path: Path) -> None:
    """A torn copy of a row already done is cut; that row keeps its one line and is not resent."""
    manifest = make_archive(tmp_path / "a", 20, seed=13)
    folders = folders_of(manifest)
    out = tmp_path / "out.jsonl"
    async with run_emulator(fast_config()) as emu:
        first = Engine(settings(emu, out, concurrency=2, max_outstanding=4), manifest)
        await run_until(first, lambda: first.counters.completed >= 5)
        data = out.read_bytes()
        first_line = data.split(b"\n", 1)[0]
        with out.open("ab") as fh:
            fh.write(first_line[: len(first_line) // 2])
        before = emu.stats()["submissions"]
        await Engine(settings(emu, out), manifest).run()
        after = emu.stats()["submissions"]
    assert out.read_bytes().startswith(data)
    assert_each_row_once(out, folders)
    assert after - before <= 20 - len(data.splitlines())


# ---------------------------------------------------------------------- rerun is a no-op


@pytest.mark.parametrize(("fail_rate", "code"), [(0.0, 0), (0.3, 2)])
async def test_finished_run_rerun_is_a_no_op(tmp_path: Path, fail_rate: float, code: int) -> None:
    """Rerunning a finished run: zero API calls, byte-identical output, the same exit code."""
    manifest = make_archive(tmp_path / "a", 30, seed=14)
    folders = folders_of(manifest)
    out = tmp_path / "out.jsonl"
    async with run_emulator(fast_config(fail_rate=fail_rate, seed=3)) as emu:
        s = settings(emu, out, max_failure_rate=1.0)
        r1 = await Engine(s, manifest).run()
        assert r1.exit_code == code
        data = out.read_bytes()
        before = emu.stats()
        r2 = await Engine(s, manifest).run()
        after = emu.stats()
    assert r2.exit_code == code
    assert out.read_bytes() == data
    assert after["submissions"] == before["submissions"]
    assert after["polls"] == before["polls"]
    assert r2.summary.to_json()["api_calls"] == 0
    lines = assert_each_row_once(out, folders)
    assert any(r["status"] == "failed" for r in lines) == (code == 2)


# ---------------------------------------------------------------------- expired tokens


async def _expire_live_tokens(tmp_path: Path, emu: Emulator, n: int) -> tuple[Path, Path]:
    """A run interrupted with ``n`` live tokens, then waited on until every result expired."""
    manifest = make_archive(tmp_path / "a", n, seed=15)
    out = tmp_path / "out.jsonl"
    first = Engine(settings(emu, out, poll_min=20, poll_max=30), manifest)
    await run_until(first, lambda: first.counters.submitted == n)
    await wait_stats(emu, lambda st: st["runs"]["expired"] == n)
    return manifest, out


async def test_expired_token_is_resubmitted_with_a_new_key(tmp_path: Path) -> None:
    """Journaled tokens answer 404 on resume: resubmitted once (attempts 2), under a new key."""
    n = 8
    async with run_emulator(fast_config(result_ttl=0.3)) as emu:
        manifest, out = await _expire_live_tokens(tmp_path, emu, n)
        folders = folders_of(manifest)
        result = await Engine(settings(emu, out, poll_min=0.02, poll_max=0.05), manifest).run()
        stats = emu.stats()
        subs = submissions_by_digest(emu)
    assert result.exit_code == 0, result.summary.to_json()
    assert stats["polls_by_status"].get("404") == n
    lines = assert_each_row_once(out, folders)
    assert all(r["status"] == "completed" and r["attempts"] == 2 for r in lines)
    assert result.summary.to_json()["resubmits"] == n
    # Each folder: its first submission keyed by generation 1, the deliberate resubmit by 2.
    assert len(subs) == n
    for row_id, folder in folders.items():
        keys = [s["idempotency_key"] for s in subs[digest_of(folder)]]
        assert keys == [key_for(row_id, folder, 1), key_for(row_id, folder, 2)]


async def test_expired_token_beyond_budget_fails_token_expired(tmp_path: Path) -> None:
    """With the attempt budget spent, an expired token ends the row `failed` (token_expired)."""
    n = 5
    async with run_emulator(fast_config(result_ttl=0.3)) as emu:
        manifest, out = await _expire_live_tokens(tmp_path, emu, n)
        folders = folders_of(manifest)
        before = emu.stats()["submissions"]
        result = await Engine(settings(emu, out, max_attempts=1, max_failure_rate=1.0),
                              manifest).run()
        after = emu.stats()["submissions"]
    assert result.exit_code == 2
    assert after == before  # no resubmission
    lines = assert_each_row_once(out, folders)
    for rec in lines:
        assert rec["status"] == "failed"
        assert rec["error"]["kind"] == "token_expired"
        assert rec["error"]["http_status"] == 404
        assert rec["attempts"] == 1


# ---------------------------------------------------------------------- changed folders


async def test_changed_folder_is_resubmitted_not_paired(tmp_path: Path) -> None:
    """A folder edited while its token was live is resubmitted; its result is the new content's."""
    n = 12
    manifest = make_archive(tmp_path / "a", n, seed=16)
    folders = folders_of(manifest)
    out = tmp_path / "out.jsonl"
    async with run_emulator(fast_config()) as emu:
        first = Engine(settings(emu, out, poll_min=20, poll_max=30), manifest)
        await run_until(first, lambda: first.counters.submitted == n)
        changed = folders["case-00003"]
        old_digest = digest_of(changed)
        victim = sorted(changed.glob("*.pdf"))[0]
        victim.write_bytes(make_pdf(random.Random(99), "rewritten"))
        st = victim.stat()
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
        new_digest = digest_of(changed)
        assert new_digest != old_digest
        result = await Engine(settings(emu, out), manifest).run()
        stats = emu.stats()
        subs = submissions_by_digest(emu)
    assert result.exit_code == 0, result.summary.to_json()
    lines = assert_each_row_once(out, folders)  # expected_for_folder reads the NEW content
    rec = next(r for r in lines if r["id"] == "case-00003")
    assert rec["result"] == expected_for_folder(changed)
    assert rec["attempts"] == 2
    assert all(r["attempts"] == 1 for r in lines if r["id"] != "case-00003")
    assert stats["submissions"] == n + 1
    assert stats["duplicate_submissions"] == 0
    # The old content went out once (generation 1), the new content once, under a new key.
    assert [s["idempotency_key"] for s in subs[old_digest]] != [None]
    (resub,) = subs[new_digest]
    assert resub["idempotency_key"] == key_for("case-00003", changed, 2)
    assert victim.name in {f["name"] for f in resub["files"]}


# ---------------------------------------------------------------------- rows caught mid-POST


@pytest.mark.parametrize("idempotency", [True, False])
async def test_rows_caught_submitting_are_resent_with_the_same_key(
    tmp_path: Path, idempotency: bool
) -> None:
    """Rows interrupted mid-POST (the server already holds their run) are resent on rerun.

    With the Idempotency-Key the server replays the run: no duplicate analysis. Without it each
    of those rows, and only those, is analysed twice; the summary counts them as possible
    duplicates either way.
    """
    n, conc = 16, 4
    manifest = make_archive(tmp_path / "a", n, seed=17)
    folders = folders_of(manifest)
    out = tmp_path / "out.jsonl"
    # Every call stalls after doing its work: the first `conc` POSTs create runs, then hang.
    cfg = fast_config(stall_rate=1.0, stall_seconds=3.0)
    async with run_emulator(cfg, shutdown_timeout=0.2) as emu:
        first = Engine(settings(emu, out, concurrency=conc, idempotency=idempotency), manifest)
        r1 = await run_until(first, lambda: emu.stats()["runs_created"] == conc)
        assert r1.exit_code == 130
        with Journal.open(out.with_name("out.jsonl.journal")) as j:
            caught = {r.key for r in j.submitting_rows()}
        assert len(caught) == conc
        emu.state.config = dataclasses.replace(cfg, stall_rate=0.0)  # the fault clears
        r2 = await Engine(settings(emu, out, concurrency=conc, idempotency=idempotency),
                          manifest).run()
        stats = emu.stats()
        subs = submissions_by_digest(emu)
    assert r2.exit_code == 0, r2.summary.to_json()
    assert r2.summary.to_json()["possible_duplicates"] == conc
    lines = assert_each_row_once(out, folders)
    assert all(r["status"] == "completed" for r in lines)
    # The rows sent again after the crash say so on their own line.
    assert {r["id"] for r in lines if r.get("possible_duplicate")} == caught
    if idempotency:
        assert stats["duplicate_submissions"] == 0
        assert stats["idempotent_replays"] == conc
        assert stats["runs_created"] == n
        for row_id, folder in folders.items():
            (digest,) = [d for d, ss in subs.items()
                         if ss[0]["idempotency_key"] == key_for(row_id, folder, 1)]
            assert len(subs[digest]) == 1
            assert subs[digest][0]["replays"] == (1 if row_id in caught else 0)
    else:
        assert stats["duplicate_submissions"] == conc
        assert stats["runs_created"] == n + conc
        assert all(s["idempotency_key"] is None for ss in subs.values() for s in ss)
        twice = {d for d, ss in subs.items() if len(ss) == 2}
        assert len(twice) == conc


async def test_changed_folder_caught_mid_post_gets_a_new_key(tmp_path: Path) -> None:
    """A folder edited after a crash mid-POST is sent under a new key: its new content's result.

    Same key with other bytes would be refused by an idempotent server (422) or, worse, replay
    the old content's run; the key includes the folder fingerprint, so neither happens.
    """
    n, conc = 8, 2
    manifest = make_archive(tmp_path / "a", n, seed=22)
    folders = folders_of(manifest)
    out = tmp_path / "out.jsonl"
    cfg = fast_config(stall_rate=1.0, stall_seconds=3.0)
    async with run_emulator(cfg, shutdown_timeout=0.2) as emu:
        first = Engine(settings(emu, out, concurrency=conc), manifest)
        await run_until(first, lambda: emu.stats()["runs_created"] == conc)
        with Journal.open(out.with_name("out.jsonl.journal")) as j:
            caught = sorted(r.key for r in j.submitting_rows())
        assert len(caught) == conc
        changed = folders[caught[0]]
        old_digest = digest_of(changed)
        victim = sorted(changed.glob("*.pdf"))[0]
        victim.write_bytes(make_pdf(random.Random(7), "edited"))
        emu.state.config = dataclasses.replace(cfg, stall_rate=0.0)
        result = await Engine(settings(emu, out, concurrency=conc), manifest).run()
        stats = emu.stats()
        subs = submissions_by_digest(emu)
    assert result.exit_code == 0, result.summary.to_json()
    lines = assert_each_row_once(out, folders)  # the edited row: the new content's result
    assert all(r["status"] == "completed" for r in lines)
    assert stats["submissions_by_status"].get("422", 0) == 0
    assert stats["idempotent_replays"] == conc - 1  # the unchanged caught row only
    assert stats["runs_created"] == n + 1  # the old content's run is orphaned, never read
    (new,) = subs[digest_of(changed)]
    (old,) = subs[old_digest]
    assert new["idempotency_key"] != old["idempotency_key"]


async def test_idempotency_key_stable_across_transport_retries(tmp_path: Path) -> None:
    """A POST whose answer is lost is retried with the same key: the server replays, no new run."""
    n = 30
    manifest = make_archive(tmp_path / "a", n, seed=18)
    folders = folders_of(manifest)
    out = tmp_path / "out.jsonl"
    async with run_emulator(fast_config(drop_after_create_rate=0.3, seed=5)) as emu:
        result = await Engine(settings(emu, out), manifest).run()
        stats = emu.stats()
        subs = emu.state.submissions_json()
    assert result.exit_code == 0, result.summary.to_json()
    drops = stats["faults_injected"]["drop_after_create"]
    assert drops > 0
    assert stats["runs_created"] == n
    assert stats["duplicate_submissions"] == 0
    assert stats["idempotent_replays"] == drops
    expected_keys = {key_for(i, f, 1) for i, f in folders.items()}
    assert {s["idempotency_key"] for s in subs} == expected_keys
    assert sum(s["replays"] for s in subs) == drops
    lines = assert_each_row_once(out, folders)
    assert all(r["status"] == "completed" and r["attempts"] == 1 for r in lines)


# ---------------------------------------------------------------------- --retry-failed


async def test_retry_failed_rewrites_the_output_with_one_line_per_row(tmp_path: Path) -> None:
    """--retry-failed resubmits only failed rows; the output keeps exactly one line per row.

    The failed rows' lines are dropped by an atomic rewrite (a temporary file, fsynced, renamed
    over the output, directory fsynced) before anything is resubmitted, so a reader of the
    output sees either the old file or the new one, never a row twice.
    """
    n = 40
    manifest = make_archive(tmp_path / "a", n, seed=19)
    folders = folders_of(manifest)
    out = tmp_path / "out.jsonl"
    async with run_emulator(fast_config(fail_rate=0.3, seed=4)) as emu:
        r1 = await Engine(settings(emu, out, max_failure_rate=1.0), manifest).run()
    assert r1.exit_code == 2
    first = {r["id"]: r for r in read_lines(out)}
    failed = {i for i, r in first.items() if r["status"] == "failed"}
    assert failed and len(failed) < n
    async with run_emulator(fast_config()) as emu:
        r2 = await Engine(settings(emu, out, retry_failed=True), manifest).run()
        stats = emu.stats()
        # The same --retry-failed command once more: nothing failed, nothing to do.
        data, inode = out.read_bytes(), out.stat().st_ino
        r3 = await Engine(settings(emu, out, retry_failed=True), manifest).run()
        assert emu.stats()["submissions"] == stats["submissions"]
    assert r3.exit_code == 0
    assert out.read_bytes() == data
    assert out.stat().st_ino == inode  # not even rewritten
    assert r2.exit_code == 0, r2.summary.to_json()
    assert stats["submissions"] == len(failed)  # only the failed rows went out again
    lines = assert_each_row_once(out, folders)
    assert all(r["status"] == "completed" for r in lines)
    for rec in lines:
        if rec["id"] in failed:
            assert rec["attempts"] == 2
        else:
            assert rec == first[rec["id"]]  # kept byte for byte (same parsed line)
    assert not out.with_name(out.name + ".tmp").exists()


@pytest.mark.parametrize("crash_at", ["after_begin", "after_rewrite"])
@pytest.mark.parametrize("flag_on_rerun", [True, False])
async def test_retry_failed_cut_short_is_finished_by_the_rerun(
    tmp_path: Path, crash_at: str, flag_on_rerun: bool
) -> None:
    """A --retry-failed run that died between its journal steps is completed by the next run."""
    n = 20
    manifest = make_archive(tmp_path / "a", n, seed=20)
    folders = folders_of(manifest)
    out = tmp_path / "out.jsonl"
    async with run_emulator(fast_config(fail_rate=0.4, seed=6)) as emu:
        await Engine(settings(emu, out, max_failure_rate=1.0), manifest).run()
    failed = {r["id"] for r in read_lines(out) if r["status"] == "failed"}
    assert failed
    # What a crash inside Engine.run's --retry-failed step leaves behind.
    with Journal.open(out.with_name("out.jsonl.journal")) as j:
        j.begin_retry_failed()
        if crash_at == "after_rewrite":
            rewrite_without_failed(out, j)
    async with run_emulator(fast_config()) as emu:
        r2 = await Engine(settings(emu, out, retry_failed=flag_on_rerun), manifest).run()
        stats = emu.stats()
    assert r2.exit_code == 0, r2.summary.to_json()
    assert stats["submissions"] == len(failed)
    lines = assert_each_row_once(out, folders)
    assert all(r["status"] == "completed" for r in lines)


async def test_retry_failed_interrupted_then_rerun_once(tmp_path: Path) -> None:
    """--retry-failed interrupted midway, rerun with --retry-failed: every row still once."""
    n = 40
    manifest = make_archive(tmp_path / "a", n, seed=21)
    folders = folders_of(manifest)
    out = tmp_path / "out.jsonl"
    async with run_emulator(fast_config(fail_rate=0.5, seed=7)) as emu:
        await Engine(settings(emu, out, max_failure_rate=1.0), manifest).run()
    failed = {r["id"] for r in read_lines(out) if r["status"] == "failed"}
    assert len(failed) >= 6
    async with run_emulator(fast_config()) as emu:
        eng = Engine(settings(emu, out, retry_failed=True, concurrency=2, max_outstanding=2),
                     manifest)
        await run_until(eng, lambda: eng.counters.completed >= 2)
        partial = read_lines(out)
        assert len(partial) < n
        r3 = await Engine(settings(emu, out, retry_failed=True), manifest).run()
        stats = emu.stats()
    assert r3.exit_code == 0
    assert stats["duplicate_submissions"] == 0
    lines = assert_each_row_once(out, folders)
    assert all(r["status"] == "completed" for r in lines)
