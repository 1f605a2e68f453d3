"""Journal: row state transitions, batching, run binding, --retry-failed, crash safety."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bulk_engine.config import Settings
from bulk_engine.errors import ConfigError
from bulk_engine.journal import (
    SCHEMA_VERSION,
    Journal,
    settings_fingerprint,
    settings_summary,
)
from bulk_engine.models import Job

REPO = Path(__file__).resolve().parents[1]


def make_job(i: int, *, line: int | None = None) -> Job:
    return Job(
        line=line if line is not None else i + 2,
        id=f"row-{i}",
        folder=f"folders/{i}",
        path=Path(f"/archive/folders/{i}"),
        files=(),
        use_case="rental",
        analyse_type=("decision", "share_link"),
        payload={"tenant": f"t{i}"},
        fingerprint=f"fp{i}",
    )


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal.open(tmp_path / "out.jsonl.journal")
    yield j
    j.close()


def test_new_journal_has_schema_version_and_zero_offset(journal: Journal) -> None:
    """A fresh journal records its schema version and starts at output offset 0."""
    assert journal.get_meta("schema_version") == str(SCHEMA_VERSION)
    assert journal.output_offset == 0
    assert journal.get("nope") is None
    assert not journal.is_done("nope")
    assert not journal.rewrite_pending


def test_journal_uses_wal_and_normal_sync(journal: Journal) -> None:
    """The journal runs in WAL mode with synchronous=NORMAL, as documented."""
    conn = journal._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL


def test_submit_poll_done_lifecycle(journal: Journal) -> None:
    """submitting → submitted (token kept) → pending (token dropped) → submitted → done."""
    job = make_job(1)
    journal.mark_submitting(job, attempts=1)
    rec = journal.get(job.key)
    assert rec is not None
    assert (rec.state, rec.id, rec.folder, rec.line) == ("submitting", "row-1", "folders/1", 3)
    assert (rec.path, rec.fingerprint, rec.attempts) == ("/archive/folders/1", "fp1", 1)
    assert [r.key for r in journal.submitting_rows()] == [job.key]
    assert rec.extra is not None and json.loads(rec.extra) == {
        "use_case": "rental",
        "analyse_type": ["decision", "share_link"],
        "payload": {"tenant": "t1"},
    }

    journal.mark_submitted(job.key, "tok-AAAAAAAAAAAA", "run-1", 1000.5)
    rec = journal.get(job.key)
    assert rec is not None
    assert (rec.state, rec.token, rec.run_id, rec.submitted_at) == (
        "submitted",
        "tok-AAAAAAAAAAAA",
        "run-1",
        1000.5,
    )
    assert [r.key for r in journal.live_tokens()] == [job.key]
    assert journal.submitting_rows() == []

    journal.mark_pending(job.key)
    rec = journal.get(job.key)
    assert rec is not None and rec.state == "pending" and rec.token is None
    assert journal.live_tokens() == []

    journal.mark_submitting(job, attempts=2)
    journal.mark_submitted(job.key, "tok-BBBB", "run-2", 1001.0)
    journal.mark_done_many([(job.key, "completed")], output_offset=123)
    rec = journal.get(job.key)
    assert rec is not None
    assert (rec.state, rec.outcome, rec.attempts, rec.token) == ("done", "completed", 2, None)
    assert journal.is_done(job.key)
    assert journal.output_offset == 123
    assert not rec.possible_duplicate


def test_resubmitting_a_row_left_submitting_flags_possible_duplicate(journal: Journal) -> None:
    """A second mark_submitting on a row still `submitting` (POST fate unknown) flags it."""
    job = make_job(1)
    journal.mark_submitting(job, attempts=1)
    journal.mark_submitting(job, attempts=2)
    rec = journal.get(job.key)
    assert rec is not None and rec.possible_duplicate and rec.attempts == 2
    other = make_job(2)
    journal.mark_submitting(other, attempts=1)
    journal.mark_possible_duplicate(other.key)
    rec = journal.get(other.key)
    assert rec is not None and rec.possible_duplicate


def test_mark_submitted_without_row_raises(journal: Journal) -> None:
    """A token for a row that was never marked submitting is a programming error."""
    with pytest.raises(KeyError):
        journal.mark_submitted("ghost", "tok", None, 1.0)


def test_mark_done_many_inserts_unknown_keys_and_moves_offset(journal: Journal) -> None:
    """Bad rows (never journaled) are inserted as done; the offset moves with them."""
    journal.mark_done_many([("bad-1", "failed"), ("bad-2\x00dup@7", "failed")], 500)
    assert journal.is_done("bad-1") and journal.is_done("bad-2\x00dup@7")
    rec = journal.get("bad-1")
    assert rec is not None and rec.outcome == "failed" and rec.id is None
    assert journal.output_offset == 500
    journal.mark_done_many([], 600)
    assert journal.output_offset == 600


def test_mark_done_many_rejects_unknown_outcome(journal: Journal) -> None:
    """Only 'completed' and 'failed' are outcomes; nothing is written otherwise."""
    with pytest.raises(ValueError, match="outcome"):
        journal.mark_done_many([("a", "completed"), ("b", "weird")], 10)
    assert journal.get("a") is None and journal.output_offset == 0


def test_batch_of_10k_done_marks_is_fast(journal: Journal) -> None:
    """10k single done-marks inside one batch commit well under a second (sanity bound)."""
    start = time.perf_counter()
    with journal.batch():
        for i in range(10_000):
            journal.mark_done_many([(f"k{i}", "completed")], i)
    elapsed = time.perf_counter() - start
    assert journal.counts()["done"] == 10_000
    assert journal.output_offset == 9_999
    assert elapsed < 1.0, f"10k batched done-marks took {elapsed:.2f}s"


def test_batch_rolls_back_when_the_block_raises(journal: Journal) -> None:
    """A batch is one transaction: an exception inside leaves no trace of it."""
    journal.mark_done_many([("before", "completed")], 10)
    with pytest.raises(RuntimeError), journal.batch():
        journal.mark_done_many([("inside", "completed")], 20)
        raise RuntimeError("boom")
    assert journal.get("inside") is None
    assert journal.output_offset == 10
    journal.mark_done_many([("after", "failed")], 30)  # the connection is usable again
    assert journal.is_done("after")


def test_nested_batches_join_the_outer_transaction(journal: Journal) -> None:
    """An inner batch commits nothing by itself; the outer one decides."""
    with pytest.raises(RuntimeError), journal.batch():
        with journal.batch():
            journal.mark_done_many([("inner", "completed")], 5)
        raise RuntimeError("outer fails")
    assert journal.get("inner") is None


def test_seen_reports_keys_already_seen_this_session(tmp_path: Path) -> None:
    """seen() is False the first time, True after; a new reader forgets (per run)."""
    path = tmp_path / "j"
    with Journal.open(path) as j:
        reader = j.reader()
        assert reader.seen("a") is False
        assert reader.seen("b") is False
        assert reader.seen("a") is True
        with j.batch():
            assert reader.seen("c") is False
            assert reader.seen("c") is True
        reader.close()
    with Journal.open(path) as j:
        reader = j.reader()
        assert reader.seen("a") is False
        reader.close()


def test_seen_scales_to_many_keys(journal: Journal) -> None:
    """seen() handles 50k distinct keys quickly and still finds the duplicates."""
    reader = journal.reader()
    assert not any(reader.seen(f"id-{i}") for i in range(50_000))
    assert reader.seen("id-49999") and reader.seen("id-0")
    reader.close()


def test_check_settings_binds_the_journal_to_one_run(journal: Journal, tmp_path: Path) -> None:
    """Same settings pass; different use_case raises ConfigError saying how to fix it."""
    manifest = tmp_path / "manifest.csv"
    base = Settings(use_case="rental")
    fp = settings_fingerprint(base, manifest)
    journal.check_settings(fp, summary=settings_summary(base, manifest))
    journal.check_settings(fp)  # a resume with the same settings

    other = base.replace(use_case="insurance")
    with pytest.raises(ConfigError) as err:
        journal.check_settings(
            settings_fingerprint(other, manifest), summary=settings_summary(other, manifest)
        )
    msg = str(err.value)
    assert "different run" in msg
    assert "--output" in msg and "delete" in msg
    assert "insurance" in msg and "rental" in msg


def test_fingerprint_ignores_tuning_and_port_but_not_input(tmp_path: Path) -> None:
    """Concurrency, rate, key and port may change on resume; the manifest may not."""
    m = tmp_path / "m.csv"
    a = Settings(base_url="http://127.0.0.1:8001", api_key="k1", concurrency=2)
    b = a.replace(base_url="http://127.0.0.1:9009", api_key="k2", concurrency=30, rate_limit=99)
    assert settings_fingerprint(a, m) == settings_fingerprint(b, m)
    assert settings_fingerprint(a, m) != settings_fingerprint(a, tmp_path / "other.csv")
    assert settings_fingerprint(a, m) != settings_fingerprint(
        a.replace(analyse_type=("decision", "share_link")), m
    )


def test_api_key_is_never_stored(tmp_path: Path) -> None:
    """Neither the fingerprint, the summary nor the database file holds the API key."""
    secret = "sk-live-SECRET-1234567890"
    path = tmp_path / "j"
    s = Settings(api_key=secret)
    with Journal.open(path) as j:
        j.check_settings(settings_fingerprint(s, "m.csv"), summary=settings_summary(s, "m.csv"))
        assert secret not in (j.get_meta("settings_summary") or "")
    for f in tmp_path.iterdir():
        assert secret.encode() not in f.read_bytes()


def test_retry_failed_moves_failed_rows_through_retrying_to_pending(journal: Journal) -> None:
    """begin: done+failed → retrying (+rewrite_pending); finish: → pending, offset set."""
    journal.mark_done_many([("ok", "completed"), ("bad1", "failed"), ("bad2", "failed")], 300)
    assert journal.begin_retry_failed() == 2
    assert journal.rewrite_pending
    assert list(journal.keys_in_state("retrying")) == ["bad1", "bad2"]
    assert journal.is_done("ok") and not journal.is_done("bad1")
    assert journal.counts()["retrying"] == 2

    journal.finish_retry_failed(100)
    assert not journal.rewrite_pending
    assert journal.output_offset == 100
    assert list(journal.keys_in_state("retrying")) == []
    assert list(journal.keys_in_state("pending")) == ["bad1", "bad2"]
    rec = journal.get("bad1")
    assert rec is not None and rec.outcome is None
    assert journal.is_done("ok")


def test_keys_in_state_pages_through_many_keys(journal: Journal) -> None:
    """keys_in_state yields every key once, in order, across page boundaries."""
    keys = [f"k{i:05d}" for i in range(2_345)]
    journal.mark_done_many([(k, "failed") for k in keys], 1)
    journal.begin_retry_failed()
    assert list(journal.keys_in_state("retrying")) == keys


def test_counts_per_state_and_outcome(journal: Journal) -> None:
    """counts() gives every state (zero-filled) and done rows per outcome."""
    journal.mark_submitting(make_job(1), 1)
    journal.mark_submitting(make_job(2), 1)
    journal.mark_submitted(make_job(2).key, "t", None, 1.0)
    journal.mark_done_many([("a", "completed"), ("b", "completed"), ("c", "failed")], 9)
    assert journal.counts() == {
        "pending": 0,
        "submitting": 1,
        "submitted": 1,
        "done": 3,
        "retrying": 0,
        "completed": 2,
        "failed": 1,
    }


def test_rows_and_meta_persist_across_close_and_reopen(tmp_path: Path) -> None:
    """What was committed is there after close and reopen."""
    path = tmp_path / "j"
    with Journal.open(path) as j:
        j.mark_submitting(make_job(1), 1)
        j.mark_submitted(make_job(1).key, "tok-1", "run-1", 5.0)
        j.mark_done_many([("x", "failed")], 77)
        j.set_meta("started_at", "2024-01-01")
    with Journal.open(path) as j:
        assert [r.token for r in j.live_tokens()] == ["tok-1"]
        assert j.is_done("x") and j.output_offset == 77
        assert j.get_meta("started_at") == "2024-01-01"


def test_second_open_of_a_journal_in_use_is_refused(journal: Journal) -> None:
    """Two runs cannot share one journal: the second gets a clear ConfigError."""
    with pytest.raises(ConfigError, match="in use by another"):
        Journal.open(journal.path, lock_timeout=0.05)


def test_a_file_that_is_not_a_journal_is_refused(tmp_path: Path) -> None:
    """Pointing the journal at some other file gives a ConfigError, not a traceback."""
    bogus = tmp_path / "results.jsonl"
    bogus.write_bytes(b'{"id": "x"}\n' * 200)
    with pytest.raises(ConfigError, match="not a bulk_engine journal"):
        Journal.open(bogus)


def test_a_journal_from_a_newer_schema_is_refused(tmp_path: Path) -> None:
    """A journal written by a newer bulk_engine is not misread."""
    path = tmp_path / "j"
    with Journal.open(path) as j:
        j.set_meta("schema_version", str(SCHEMA_VERSION + 1))
    with pytest.raises(ConfigError, match="newer"):
        Journal.open(path)


def test_row_record_repr_hides_the_token(journal: Journal) -> None:
    """A RowRecord can be logged: its repr omits the token, token_hint cuts it short."""
    journal.mark_submitting(make_job(1), 1)
    journal.mark_submitted(make_job(1).key, "gAAAAAB-very-secret-token", None, 1.0)
    rec = journal.get(make_job(1).key)
    assert rec is not None
    assert "very-secret" not in repr(rec)
    assert rec.token_hint == "gAAAAAB-very…"  # logs.short_token: 12 characters kept
    assert "secret" not in rec.token_hint


def test_journal_refuses_use_from_another_thread(journal: Journal) -> None:
    """The one connection belongs to the event-loop thread; other threads are refused."""
    errors: list[BaseException] = []

    def other() -> None:
        try:
            journal.is_done("x")
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert len(errors) == 1 and isinstance(errors[0], sqlite3.ProgrammingError)


_CRASH_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from bulk_engine.journal import Journal
    from bulk_engine.models import Job

    path, how = Path(sys.argv[1]), sys.argv[2]
    j = Journal.open(path)
    job = Job(line=2, id="live", folder="f", path=Path("/f"), files=())
    j.mark_submitting(job, 1)
    j.mark_submitted(job.key, "tok-live", "run-live", 12.5)
    with j.batch():
        for i in range(500):
            j.mark_done_many([(f"done-{i}", "completed")], (i + 1) * 100)
    j.set_meta("marker", "committed")
    # A batch that never reaches its commit: must not appear after the crash.
    with j.batch():
        j.mark_done_many([("uncommitted", "completed")], 999_999)
        sys.stdout.write("ready\\n")
        sys.stdout.flush()
        if how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        else:
            os._exit(3)
    """
)


@pytest.mark.parametrize("how", ["sigkill", "os_exit"])
def test_committed_rows_survive_a_process_crash(tmp_path: Path, how: str) -> None:
    """A child commits rows then dies without closing (SIGKILL / os._exit): all commits remain."""
    path = tmp_path / "j"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH_CHILD, str(path), how],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.stdout == "ready\n", proc.stderr
    expected_rc = -signal.SIGKILL if how == "sigkill" else 3
    assert proc.returncode == expected_rc, proc.stderr
    with Journal.open(path) as j:
        live = j.live_tokens()
        assert [(r.key, r.token, r.run_id) for r in live] == [("live", "tok-live", "run-live")]
        assert j.counts()["done"] == 500
        assert j.is_done("done-0") and j.is_done("done-499")
        assert j.output_offset == 50_000
        assert j.get_meta("marker") == "committed"
        assert j.get("uncommitted") is None
