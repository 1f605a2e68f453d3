"""Real crashes of a real process: the engine CLI killed (SIGKILL) or interrupted (SIGINT/SIGTERM).

The emulator runs in its own process, so its runs, tokens and counters outlive every engine
process, as the real API does. Each test drives ``python -m bulk_engine`` the way an operator
does (key in the environment, the same command rerun) and checks the output at the end:

* every manifest row exactly once, no torn line (invariant 1);
* every result equal to the one computed from that row's folder on disk (invariant 2);
* duplicate analyses at the server only for rows caught ``submitting`` (mid-POST) by a kill,
  and none at all while the emulator honours the Idempotency-Key.

Waits poll the output file, the journal or the emulator's counters with deadlines; the only
deliberate waits are the random delays before a kill, which are what the chaos test is about.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bulk_engine.client import multipart_filename
from bulk_engine.emulator import content_digest
from bulk_engine.manifest import list_folder

from archive_factory import make_archive
from conftest import expected_for_folder, key_for
from procs import (
    EmulatorProcess,
    EngineProcess,
    assert_clean_jsonl,
    count_lines,
    emulator_process,
    journal_meta,
    journal_rows,
    journal_snapshot,
    run_engine,
    wait_for,
)

# Tuning for the CLI: fast polls, a high client rate, and few folders outstanding at a time so
# that submissions go on during the whole run (a kill can catch rows mid-POST at any moment).
ENGINE_ARGS = ("--poll-min", "0.05", "--poll-max", "0.5", "--rate-limit", "300",
               "--concurrency", "8", "--max-outstanding", "40", "--seed", "1")
EMULATOR_ARGS = ("--processing-time", "0.05:0.5", "--max-parallel-analyses", "60",
                 "--seed", "1")


def folders_of(manifest: Path) -> dict[str, Path]:
    with manifest.open(newline="", encoding="utf-8") as fh:
        return {row["id"]: manifest.parent / row["folder"] for row in csv.DictReader(fh)}


def digest_of(folder: Path) -> str:
    files = list_folder(folder, max_file_size=1 << 40, follow_symlinks=False)
    return content_digest(
        (multipart_filename(f.name), hashlib.sha256(f.path.read_bytes()).hexdigest())
        for f in files
    )


def check_output(out: Path, folders: dict[str, Path]) -> list[dict[str, Any]]:
    """No torn line; one line per row; every completed result is its own folder's."""
    lines = assert_clean_jsonl(out)
    ids = Counter(r["id"] for r in lines)
    assert sorted(ids) == sorted(folders), "rows missing or unknown"
    twice = sorted(i for i, n in ids.items() if n > 1)
    assert not twice, f"rows written more than once: {twice[:10]}"
    for rec in lines:
        assert rec["folder"] == f"cases/{rec['id']}"
        if rec["status"] == "completed":
            assert rec["result"] == expected_for_folder(folders[rec["id"]]), rec["id"]
    return lines


def check_journal_matches_output(out: Path) -> None:
    """After a clean stop: the journal's done rows are exactly the output's lines."""
    lines = assert_clean_jsonl(out)
    rows = journal_rows(out.with_name(out.name + ".journal"))
    done = {k for k, r in rows.items() if r["state"] == "done"}
    assert done == {r["id"] for r in lines}
    for rec in lines:
        assert rows[rec["id"]]["outcome"] == rec["status"]
    meta = journal_meta(out.with_name(out.name + ".journal"))
    assert int(meta["output_offset"]) == out.stat().st_size
    assert meta.get("rewrite_pending", "0") == "0"


@pytest.fixture(scope="module")
def archive300(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 folders, shared read-only by the chaos tests."""
    return make_archive(tmp_path_factory.mktemp("chaos") / "a", 300, seed=42)


@pytest.fixture(scope="module")
def archive120(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 folders, shared read-only by the signal tests."""
    return make_archive(tmp_path_factory.mktemp("signals") / "a", 120, seed=44)


# ---------------------------------------------------------------------- SIGKILL chaos


def _chaos(manifest: Path, out: Path, emu: EmulatorProcess, *extra: str, kills_wanted: int,
           seed: int) -> dict[str, Any]:
    """SIGKILL the engine ``kills_wanted`` times at random moments, then run it to the end."""
    rng = random.Random(seed)
    n_rows = len(folders_of(manifest))
    kills: list[dict[str, Any]] = []
    scratch = out.parent / "journal-copies"
    while len(kills) < kills_wanted:
        start_lines = count_lines(out)
        assert start_lines < n_rows - 10, f"run nearly over after {len(kills)} kills: retune"
        with EngineProcess(manifest, out, emu.base_url, *ENGINE_ARGS, *extra,
                           tag=f"kill{len(kills)}") as eng:
            # Progress, not a clock: the first new line means this process is past its startup
            # and resume, with submissions and polls in full swing.
            wait_for(lambda e=eng, n=start_lines: count_lines(out) > n or not e.running(),
                     timeout=30, what="the engine's first new line")
            assert eng.running(), f"engine exited early: {eng.log_text()[-2000:]}"
            delay = rng.uniform(0.05, 0.5)
            try:
                code = eng.proc.wait(delay)  # returns early only if the run ended by itself
            except subprocess.TimeoutExpired:
                pass
            else:
                raise AssertionError(f"run finished (exit {code}) before kill {len(kills) + 1}")
            assert eng.kill() == -signal.SIGKILL
        snap = journal_snapshot(out.with_name(out.name + ".journal"), scratch)
        kills.append({
            "delay": round(delay, 3),
            "lines": count_lines(out),
            "torn": out.read_bytes()[-1:] not in (b"", b"\n"),
            "counts": snap["counts"],
            "submitting": snap["submitting"],
        })
    code, log = run_engine(manifest, out, emu.base_url, *ENGINE_ARGS, *extra,
                           "--stats-json", str(out.parent / "final-stats.json"), timeout=60)
    assert code == 0, log[-3000:]
    final = json.loads((out.parent / "final-stats.json").read_text())
    return {"kills": kills, "final": final}


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("idempotency", [True, False], ids=["idempotency-key", "no-idempotency"])
def test_sigkill_chaos_every_row_once(archive300: Path, tmp_path: Path, idempotency: bool) -> None:
    """300 folders, engine SIGKILLed 5 times at random moments, then rerun to completion.

    Each row ends exactly once with its own result. Duplicate analyses at the server only for
    rows a kill caught mid-POST, and none while the Idempotency-Key is sent and honoured.
    """
    folders = folders_of(archive300)
    out = tmp_path / "out.jsonl"
    extra = () if idempotency else ("--no-idempotency",)
    t0 = time.monotonic()
    with emulator_process(*EMULATOR_ARGS) as emu:
        report = _chaos(archive300, out, emu, *extra, kills_wanted=5,
                        seed=7 if idempotency else 8)
        stats = emu.stats()
        subs = emu.submissions()
    elapsed = time.monotonic() - t0
    kills = report["kills"]
    caught: Counter[str] = Counter(k for kill in kills for k in kill["submitting"])
    live_at_kills = [kill["counts"].get("submitted", 0) for kill in kills]
    print(f"\nchaos idempotency={idempotency}: {len(kills)} kills, {elapsed:.1f} s, "
          f"lines at kills {[k['lines'] for k in kills]}, live tokens {live_at_kills}, "
          f"submitting {[len(k['submitting']) for k in kills]}, torn tails "
          f"{sum(k['torn'] for k in kills)}, duplicates {stats['duplicate_submissions']}, "
          f"replays {stats['idempotent_replays']}, submissions {stats['submissions']}")

    assert len(kills) >= 5
    assert any(live_at_kills), "no kill caught a live token: the test proves little"
    lines = check_output(out, folders)
    assert all(r["status"] == "completed" for r in lines)
    check_journal_matches_output(out)

    digest_to_id = {digest_of(f): i for i, f in folders.items()}
    assert len(digest_to_id) == len(folders)
    runs_per_row = Counter(digest_to_id[s["digest"]] for s in subs)
    assert set(runs_per_row) == set(folders)
    extra_runs = {i: n - 1 for i, n in runs_per_row.items() if n > 1}
    assert sum(extra_runs.values()) == stats["duplicate_submissions"]
    # Only rows caught mid-POST can have been analysed twice, once more per such kill at most.
    for row_id, n in extra_runs.items():
        assert n <= caught[row_id], (row_id, n, caught[row_id])
    assert stats["duplicate_submissions"] <= sum(caught.values())
    # The journal flags every row sent again after being caught mid-POST.
    flagged = {k for k, r in journal_rows(out.with_name(out.name + ".journal")).items()
               if r["possible_duplicate"]}
    assert set(extra_runs) <= flagged
    # ... and so does its output line; only rows some kill caught mid-POST are flagged.
    flagged_lines = {r["id"] for r in lines if r.get("possible_duplicate")}
    assert set(extra_runs) <= flagged_lines <= set(caught)
    # The last kill's mid-POST rows were all sent again, as possible duplicates, by the rerun.
    assert report["final"]["possible_duplicates"] >= len(kills[-1]["submitting"])
    if idempotency:
        assert stats["duplicate_submissions"] == 0
        assert stats["runs_created"] == len(folders)
        assert stats["idempotent_replays"] <= sum(caught.values())
        # One key per folder, the same in every process that sent it.
        for sub in subs:
            row_id = digest_to_id[sub["digest"]]
            assert sub["idempotency_key"] == key_for(row_id, folders[row_id], 1)
            assert sub["replays"] <= caught[row_id]
    else:
        assert all(s["idempotency_key"] is None for s in subs)


# ---------------------------------------------------------------------- SIGINT / SIGTERM


def _signal_run(manifest: Path, out: Path, emu: EmulatorProcess, sig: int,
                ) -> tuple[int, float, str]:
    """Start the engine, send ``sig`` once it has written 20 new lines.

    Returns the exit code, the seconds from the signal to the exit, and the child's log.
    """
    start = count_lines(out)
    with EngineProcess(manifest, out, emu.base_url, *ENGINE_ARGS, tag="sig") as eng:
        eng.wait_for_lines(start + 20, timeout=30)
        assert eng.running(), "run ended before the signal"
        t = time.monotonic()
        eng.signal(sig)
        code = eng.wait(10)
        took = time.monotonic() - t
        log = eng.log_text()
    assert "Traceback" not in log, log[-3000:]
    return code, took, log


def _finish_and_check(manifest: Path, out: Path, emu: EmulatorProcess) -> None:
    """Rerun the same command to the end: every row once, right results, journal in step."""
    code, log = run_engine(manifest, out, emu.base_url, *ENGINE_ARGS, timeout=60)
    assert code == 0, log[-3000:]
    lines = check_output(out, folders_of(manifest))
    assert all(r["status"] == "completed" for r in lines)
    check_journal_matches_output(out)
    assert emu.stats()["duplicate_submissions"] == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("sig", "want"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["sigint", "sigterm"])
def test_signal_stops_cleanly_and_rerun_finishes(
    archive120: Path, tmp_path: Path, sig: int, want: int
) -> None:
    """SIGINT → 130, SIGTERM → 143 within seconds; no torn line, journal in step; rerun finishes."""
    out = tmp_path / "out.jsonl"
    with emulator_process(*EMULATOR_ARGS) as emu:
        code, took, log = _signal_run(archive120, out, emu, sig)
        assert code == want
        assert took < 5.0, f"took {took:.2f} s to stop"
        assert "state saved" in log, log[-2000:]
        partial = assert_clean_jsonl(out)
        assert 20 <= len(partial) < 120
        # A graceful stop journals every line it wrote before exiting.
        check_journal_matches_output(out)
        print(f"\n{signal.Signals(sig).name}: exit {code} in {took:.2f} s, {len(partial)} lines")
        _finish_and_check(archive120, out, emu)


@pytest.mark.timeout(60)
def test_second_sigint_exits_at_once(archive120: Path, tmp_path: Path) -> None:
    """A second SIGINT during the graceful stop exits at once (130); the rerun still finishes.

    Two signals sent back to back merge into one in the kernel, so the second is sent only once
    the child has logged the first. The graceful stop takes ~0.1 s: if it wins the race, that
    attempt was just a clean SIGINT (its run resumes) and the test tries again.
    """
    manifest, out = archive120, tmp_path / "out.jsonl"
    with emulator_process(*EMULATOR_ARGS) as emu:
        for attempt in range(4):
            start = count_lines(out)
            with EngineProcess(manifest, out, emu.base_url, *ENGINE_ARGS,
                               tag=f"double{attempt}") as eng:
                eng.wait_for_lines(start + 20, timeout=30)
                assert eng.running(), "run ended before the signal"
                t = time.monotonic()
                eng.signal(signal.SIGINT)
                wait_for(lambda e=eng: '"interrupted"' in e.log_text() or not e.running(),
                         timeout=5, interval=0.001, what="the first SIGINT to be handled")
                second_sent = eng.running()
                eng.signal(signal.SIGINT)
                code = eng.wait(10)
                took = time.monotonic() - t
                log = eng.log_text()
            assert code == 130, log[-2000:]
            assert "Traceback" not in log, log[-2000:]
            assert_clean_jsonl(out)
            if second_sent and "state saved" not in log:
                break  # left at once: no summary, no "state saved"
        else:
            pytest.fail("the graceful stop always finished before the second SIGINT")
        print(f"\ndouble SIGINT: exit 130 in {took:.2f} s on attempt {attempt + 1}")
        _finish_and_check(manifest, out, emu)


# ---------------------------------------------------------------------- --retry-failed, killed


@pytest.mark.timeout(90)
def test_retry_failed_killed_midway_then_rerun_once(tmp_path: Path) -> None:
    """A --retry-failed run SIGKILLed after its rewrite, rerun: one line per row, all completed."""
    manifest = make_archive(tmp_path / "a", 80, seed=43)
    folders = folders_of(manifest)
    out = tmp_path / "out.jsonl"
    with emulator_process(*EMULATOR_ARGS, "--fail-rate", "0.5") as emu:
        code, log = run_engine(manifest, out, emu.base_url, *ENGINE_ARGS,
                               "--max-failure-rate", "1", timeout=60)
    assert code == 2, log[-3000:]
    failed = {r["id"] for r in assert_clean_jsonl(out) if r["status"] == "failed"}
    assert len(failed) >= 20
    ok_lines = len(folders) - len(failed)
    with emulator_process(*EMULATOR_ARGS) as emu:
        with EngineProcess(manifest, out, emu.base_url, *ENGINE_ARGS, "--retry-failed",
                           tag="retry") as eng:
            # The rewrite drops the failed lines (the file shrinks), then retried rows append.
            wait_for(lambda: (ok_lines < count_lines(out) < len(folders) and
                     b'"status":"failed"' not in out.read_bytes()) or not eng.running(),
                     timeout=30, what="the rewrite and the first retried rows")
            assert eng.running(), "retry run ended before the kill"
            assert eng.kill() == -signal.SIGKILL
        mid = assert_clean_jsonl(out)
        assert all(r["status"] == "completed" for r in mid)
        code, log = run_engine(manifest, out, emu.base_url, *ENGINE_ARGS, "--retry-failed",
                               timeout=60)
        stats = emu.stats()
    assert code == 0, log[-3000:]
    lines = check_output(out, folders)
    assert all(r["status"] == "completed" for r in lines)
    assert stats["duplicate_submissions"] == 0
    assert stats["runs_created"] == len(failed)
    check_journal_matches_output(out)
