"""``--dry-run``: read the manifest, check every row and folder, print the plan, send nothing.

Runs the producer exactly as a real run would (the same ``rules.row_stream``, the same checks and
``BadRow`` kinds, the same ``rules.goes_sync``), against the journal read-only when one exists:
the journal's settings check is applied as the run applies it (a journal of another run is
refused with the run's message), "already done" is what a rerun would skip and rows whose
retrieve token is still live are counted as polls, not uploads. No API call, no API key, no
writes (the duplicate-id check of a new output uses a throw-away SQLite file, not memory).
Folders in buckets are listed as the run lists them (LIST requests only, never an object's
body), against the store the journal was bound to if there is one; the plan counts the
requests.

Exit code: 0 every row can be submitted; 2 some rows would fail (listed); 1 the manifest, the
settings or the journal are unusable.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bulk_engine.client import key_fingerprint
from bulk_engine.config import Settings
from bulk_engine.errors import BulkEngineError, ConfigError
from bulk_engine.journal import Journal, JournalReader, settings_fingerprint, settings_summary
from bulk_engine.learned import LearnedLimits
from bulk_engine.logs import redact
from bulk_engine.manifest import ProducerStats
from bulk_engine.models import BadRow
from bulk_engine.progress import fmt_bytes, fmt_duration
from bulk_engine.rules import goes_sync, row_stream, scratch_seen
from bulk_engine.runner import print_error
from bulk_engine.s3.access import STORE_META_KEY, blocking_s3, check_store
from bulk_engine.vocab import ExitCode, RowState

__all__ = ["MAX_EXAMPLES", "Plan", "dry_run", "estimate", "make_plan", "render_plan"]

MAX_EXAMPLES = 10


@dataclass
class Plan:
    """What a run of these settings would do."""

    rows_read: int = 0
    rows_to_submit: int = 0
    rows_to_poll: int = 0  # a live retrieve token from an earlier run: polled, not uploaded
    rows_already_done: int = 0
    rows_rejected: int = 0
    rejected_by_kind: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    largest_folder_bytes: int = 0
    sync_rows: int = 0  # mode=auto: rows small enough to go sync
    journal: str | None = None  # "none", "read", or why it could not be read
    estimate: dict[str, Any] = field(default_factory=dict)
    s3: dict[str, int] = field(default_factory=dict)  # S3 requests made, when a bucket was read

    def to_json(self) -> dict[str, Any]:
        return {
            "rows_read": self.rows_read, "rows_to_submit": self.rows_to_submit,
            "rows_to_poll": self.rows_to_poll,
            "rows_already_done": self.rows_already_done, "rows_rejected": self.rows_rejected,
            "rejected_by_kind": dict(self.rejected_by_kind.most_common()), "files": self.files,
            "bytes": self.bytes, "largest_folder_bytes": self.largest_folder_bytes,
            "sync_rows": self.sync_rows, "journal": self.journal, **self.estimate,
            **{f"s3_{k}": v for k, v in self.s3.items()},
        }


def estimate(s: Settings, async_rows: int, sync_rows: int, poll_rows: int = 0,
             *, learned_rate: float | None = None) -> dict[str, Any]:
    """A lower bound on the run's duration at the configured limits (pure).

    With ``--rate-limit auto`` the rate is the one learned for this key by an earlier run
    (``learned_rate``), else unknown: then only the outstanding window bounds the estimate.

    Async rows cost one submit and (the scheduler aims at it) one poll: 2 calls; sync rows 1;
    rows resumed with a live token at least one poll. A folder stays outstanding at least
    ``poll_min``, so ``max_outstanding`` bounds the pace too; the last folders then wait
    ``poll_min`` for their poll. The API's own processing capacity is not known here: measure it
    with ``python -m bulk_engine bench``.
    """
    calls = 2 * async_rows + sync_rows + poll_rows
    rate = s.rate_limit if s.rate_limit is not None else learned_rate
    by_rate = calls / rate if rate else 0.0
    by_outstanding = async_rows * s.poll_min / s.max_outstanding
    seconds = max(by_rate, by_outstanding) + (s.poll_min if async_rows else 0.0)
    bound = "rate_limit" if by_rate >= by_outstanding else "max_outstanding/poll_min"
    return {"api_calls": calls, "estimated_seconds": math.ceil(seconds), "bound_by": bound,
            "rate_limit": "auto" if s.rate_limit is None else s.rate_limit,
            "rate_assumed": rate, "concurrency": s.concurrency,
            "max_outstanding": s.max_outstanding}


def make_plan(settings: Settings, manifest: Path | None) -> Plan:
    """Read every row as a run would and count; raises BulkEngineError if the source, the
    settings or the journal are unusable (the run would refuse them too)."""
    s = settings
    plan = Plan()
    stats = ProducerStats()
    with ExitStack() as stack:
        reader = _open_journal(s, manifest, plan)
        state: Callable[[str], str | None] | None = None
        seen: Callable[[str], bool]
        is_done: Callable[[str], bool] | None
        if reader is not None:
            stack.callback(reader.close)
            seen, is_done, state = reader.seen, reader.is_done, reader.state
        else:
            seen, is_done = stack.enter_context(scratch_seen()), None
        s3, access = stack.enter_context(
            blocking_s3(s, on_open=check_store(_recorded_store(s) if reader else None)))
        for item in row_stream(s, manifest, seen=seen, is_done=is_done, stats=stats, s3=s3):
            if isinstance(item, BadRow):
                plan.rejected_by_kind[item.kind] += 1
                if len(plan.examples) < MAX_EXAMPLES:
                    plan.examples.append(
                        f"line {item.line} ({item.id or 'no id'}): {item.kind}: {item.message}")
                continue
            if state is not None and state(item.key) == RowState.SUBMITTED:
                # The run resumes its journaled token (polls it) instead of uploading again.
                plan.rows_to_poll += 1
                continue
            plan.rows_to_submit += 1
            plan.files += len(item.files)
            plan.bytes += item.total_bytes
            plan.largest_folder_bytes = max(plan.largest_folder_bytes, item.total_bytes)
            if goes_sync(s, item):
                plan.sync_rows += 1
        s3_stats = access.statistics()
        if s3_stats is not None:
            plan.s3 = {"list_calls": s3_stats.list_calls, "get_calls": s3_stats.get_calls,
                       "retries": s3_stats.retries}
    plan.rows_read = stats.rows_read
    plan.rows_already_done = stats.rows_skipped_done
    plan.rows_rejected = sum(plan.rejected_by_kind.values())
    plan.estimate = estimate(s, plan.rows_to_submit - plan.sync_rows, plan.sync_rows,
                             plan.rows_to_poll, learned_rate=_learned_rate(s))
    return plan


def _learned_rate(s: Settings) -> float | None:
    """The rate an earlier run learned for this base URL and key (``learned.py``), if any."""
    if s.rate_limit is not None or not s.api_key:
        return None
    snap = LearnedLimits(s.base_url, key_fingerprint(s.api_key)).load(None)
    rate = (snap.rate or {}).get("rate") if snap is not None else None
    return float(rate) if isinstance(rate, int | float) and rate > 0 else None


def _open_journal(s: Settings, manifest: Path | None, plan: Plan) -> JournalReader | None:
    """The journal, read-only, after the run's settings check; None if there is none (or it
    cannot be read right now: then done rows are not counted, and ``plan.journal`` says why)."""
    path = s.journal_path
    if not path.exists():
        plan.journal = "none"
        return None
    reader: JournalReader | None = None
    try:
        reader = JournalReader(path)
        reader.is_done("")  # fails here, not mid-way, if it is not a journal
        _check_settings(s, manifest)
    except sqlite3.OperationalError as exc:  # locked, unreadable right now
        if reader is not None:
            reader.close()
        plan.journal = f"unreadable ({exc}): done rows not counted"
        return None
    except sqlite3.DatabaseError as exc:
        if reader is not None:
            reader.close()
        # Journal.open's words: the run would refuse this file.
        raise ConfigError(f"{path} is not a bulk_engine journal ({exc}); "
                          "use another --output or move the file away") from None
    except BaseException:
        if reader is not None:
            reader.close()
        raise
    plan.journal = "read"
    return reader


def _recorded_store(s: Settings) -> str | None:
    """The S3 store the journal was bound to (``s3.access.bind_store``), read-only."""
    conn = sqlite3.connect(f"file:{s.journal_path}?mode=ro", uri=True, isolation_level=None)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key=?", (STORE_META_KEY,)).fetchone()
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    return str(row[0]) if row else None


def _check_settings(s: Settings, manifest: Path | None) -> None:
    """``Journal.check_settings`` as the run calls it, on a read-only connection: raises its
    ConfigError when the journal belongs to another run. A journal that has no fingerprint yet
    would get this run's, which refuses nothing; the dry run writes nothing, so it stops there."""
    source = manifest if manifest is not None else s.root
    assert source is not None
    conn = sqlite3.connect(f"file:{s.journal_path}?mode=ro", uri=True, isolation_level=None)
    journal = Journal(conn, s.journal_path)
    try:
        if journal.get_meta("settings_fingerprint") is None:
            return
        journal.check_settings(settings_fingerprint(s, source),
                               summary=settings_summary(s, source))
    finally:
        journal.close()


def dry_run(settings: Settings, manifest: Path | None, console: Console) -> ExitCode:
    """Print rows, files, bytes, rows already done and an estimated duration; exit 0, 2 or 1."""
    try:
        plan = make_plan(settings, manifest)
    except (BulkEngineError, OSError) as exc:
        print_error(console, str(exc))
        return ExitCode.FATAL
    render_plan(plan, settings, console)
    if settings.stats_json is not None:
        try:
            settings.stats_json.write_text(json.dumps(plan.to_json(), indent=2) + "\n",
                                           encoding="utf-8")
        except OSError as exc:
            print_error(console, f"cannot write --stats-json {settings.stats_json}: {exc}")
            return ExitCode.FATAL
    return ExitCode.SOME_FAILED if plan.rows_rejected else ExitCode.OK


def render_plan(plan: Plan, s: Settings, console: Console) -> None:
    """The plan as a table, then up to ten rejected rows."""
    t = Table(title="Dry run: nothing was sent", show_header=False, title_justify="left")
    t.add_column("what", style="bold", no_wrap=True)
    t.add_column("value")
    t.add_row("rows read", str(plan.rows_read))
    done = f"{plan.rows_already_done}"
    if plan.journal == "read":
        done += " (done by an earlier run of this output: skipped)"
    elif plan.journal != "none":
        done += f" [yellow](journal {escape(str(plan.journal))})[/]"
    t.add_row("already done", done)
    t.add_row("to submit", f"[green]{plan.rows_to_submit}[/]"
              + (f" ({plan.sync_rows} in sync mode)" if s.mode == "auto" else ""))
    if plan.rows_to_poll:
        t.add_row("to poll (resumed token)",
                  f"{plan.rows_to_poll} (submitted by an earlier run: polled, not uploaded)")
    rejected = f"[red]{plan.rows_rejected}[/]" if plan.rows_rejected else "0"
    if plan.rejected_by_kind:
        rejected += " (" + ", ".join(f"{k}: {v}" for k, v in
                                     plan.rejected_by_kind.most_common()) + ")"
    t.add_row("would fail", rejected)
    t.add_row("files", str(plan.files))
    t.add_row("bytes", f"{fmt_bytes(plan.bytes)} (largest folder "
                       f"{fmt_bytes(plan.largest_folder_bytes)})")
    e = plan.estimate
    if plan.s3:
        t.add_row("S3 requests", f"{plan.s3['list_calls']} LIST (listing only: no object "
                                 "was read)" if not plan.s3["get_calls"] else
                  f"{plan.s3['list_calls']} LIST, {plan.s3['get_calls']} GET")
    rate = e.get("rate_assumed")
    at = ("at the rate the API allows (auto: found at run time)" if rate is None else
          f"at {rate:g} calls/s" + (" (learned for this key by an earlier run)"
                                    if s.rate_limit is None else ""))
    t.add_row("API calls", f"≈ {e['api_calls']} {at}")
    t.add_row("estimated duration", f"≥ {fmt_duration(e['estimated_seconds'])} "
                                    f"(bound by {e['bound_by'].replace('_', '-')})")
    console.print(t)
    if plan.rows_to_submit:
        console.print("  the API's own processing capacity can make it longer: measure it with "
                      "`python -m bulk_engine bench`", highlight=False)
    for line in plan.examples:
        console.print(f"  [yellow]{escape(redact(line))}[/]", highlight=False)
    if plan.rows_rejected > len(plan.examples):
        console.print(f"  … and {plan.rows_rejected - len(plan.examples)} more")
