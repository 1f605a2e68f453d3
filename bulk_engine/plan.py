"""``--dry-run``: read the manifest, check every row and folder, print the plan, send nothing.

Runs the producer exactly as a real run would (same checks, same ``BadRow`` kinds), against the
journal read-only when one exists, so "already done" is what a rerun would skip. No network, no
API key, no writes (the duplicate-id check uses a throw-away SQLite file, not memory).

Exit code: 0 every row can be submitted; 2 some rows would fail (listed); 1 the manifest or
settings are unusable.
"""

from __future__ import annotations

import math
import sqlite3
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bulk_engine.config import Settings
from bulk_engine.errors import BulkEngineError
from bulk_engine.journal import JournalReader
from bulk_engine.logs import redact
from bulk_engine.manifest import ProducerStats, RowDefaults, iter_manifest, iter_root
from bulk_engine.models import BadRow, Job
from bulk_engine.progress import fmt_bytes, fmt_duration

MAX_EXAMPLES = 10


@dataclass
class Plan:
    """What a run of these settings would do."""

    rows_read: int = 0
    rows_to_submit: int = 0
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

    def to_json(self) -> dict[str, Any]:
        return {
            "rows_read": self.rows_read, "rows_to_submit": self.rows_to_submit,
            "rows_already_done": self.rows_already_done, "rows_rejected": self.rows_rejected,
            "rejected_by_kind": dict(self.rejected_by_kind.most_common()), "files": self.files,
            "bytes": self.bytes, "largest_folder_bytes": self.largest_folder_bytes,
            "sync_rows": self.sync_rows, "journal": self.journal, **self.estimate,
        }


def estimate(s: Settings, async_rows: int, sync_rows: int) -> dict[str, Any]:
    """A lower bound on the run's duration at the configured limits (pure).

    Async rows cost one submit and (the scheduler aims at it) one poll: 2 calls; sync rows 1.
    A folder stays outstanding at least ``poll_min``, so ``max_outstanding`` bounds the pace too;
    the last folders then wait ``poll_min`` for their poll. The API's own processing capacity is
    not known here: measure it with ``python -m bulk_engine bench``.
    """
    calls = 2 * async_rows + sync_rows
    by_rate = calls / s.rate_limit
    by_outstanding = async_rows * s.poll_min / s.max_outstanding
    seconds = max(by_rate, by_outstanding) + (s.poll_min if async_rows else 0.0)
    bound = "rate_limit" if by_rate >= by_outstanding else "max_outstanding/poll_min"
    return {"api_calls": calls, "estimated_seconds": math.ceil(seconds), "bound_by": bound,
            "rate_limit": s.rate_limit, "concurrency": s.concurrency,
            "max_outstanding": s.max_outstanding}


def make_plan(settings: Settings, manifest: Path | None) -> Plan:
    """Read every row as a run would and count; raises BulkEngineError if the source is unusable."""
    s = settings
    plan = Plan()
    reader: JournalReader | None = None
    if s.journal_path.exists():
        try:
            reader = JournalReader(s.journal_path)
            reader.is_done("")  # fails here, not mid-way, if it is not a journal
            plan.journal = "read"
        except sqlite3.Error as exc:
            if reader is not None:
                reader.close()
            reader = None
            plan.journal = f"unreadable ({exc}): done rows not counted"
    else:
        plan.journal = "none"
    scratch = _Seen() if reader is None else None
    seen = reader.seen if reader is not None else scratch.seen if scratch is not None else None
    try:
        for item in _rows(s, manifest, seen, reader.is_done if reader else None, plan):
            if isinstance(item, BadRow):
                plan.rejected_by_kind[item.kind] += 1
                if len(plan.examples) < MAX_EXAMPLES:
                    plan.examples.append(
                        f"line {item.line} ({item.id or 'no id'}): {item.kind}: {item.message}")
                continue
            plan.rows_to_submit += 1
            plan.files += len(item.files)
            plan.bytes += item.total_bytes
            plan.largest_folder_bytes = max(plan.largest_folder_bytes, item.total_bytes)
            if _goes_sync(s, item):
                plan.sync_rows += 1
    finally:
        if reader is not None:
            reader.close()
        if scratch is not None:
            scratch.close()
    plan.rows_rejected = sum(plan.rejected_by_kind.values())
    plan.estimate = estimate(s, plan.rows_to_submit - plan.sync_rows, plan.sync_rows)
    return plan


def _rows(s: Settings, manifest: Path | None, seen: Any, is_done: Any,
          plan: Plan) -> Iterator[Job | BadRow]:
    stats = ProducerStats()
    defaults = RowDefaults(use_case=s.use_case, analyse_type=s.analyse_type, payload={})
    common: dict[str, Any] = dict(defaults=defaults, max_file_size=s.max_file_size,
                                  follow_symlinks=s.follow_symlinks, stats=stats, seen=seen,
                                  is_done=is_done)
    if manifest is None:
        assert s.root is not None
        yield from iter_root(s.root, **common)
    else:
        yield from iter_manifest(manifest, confine_to=s.confine_to, **common)
    plan.rows_read = stats.rows_read
    plan.rows_already_done = stats.rows_skipped_done


def _goes_sync(s: Settings, job: Job) -> bool:
    """The engine's ``mode=auto`` rule (``Engine._mode_for``)."""
    if s.mode != "auto":
        return s.mode == "sync"
    return (tuple(job.analyse_type or s.analyse_type) == ("decision",)
            and job.total_bytes <= s.auto_sync_max_bytes
            and len(job.files) <= s.auto_sync_max_files)


class _Seen:
    """Ids seen so far, in a temporary SQLite file (flat memory for a million ids)."""

    def __init__(self) -> None:
        self._conn = sqlite3.connect("", isolation_level=None)  # "": a private temp file
        self._conn.execute("CREATE TABLE seen (key TEXT PRIMARY KEY)")

    def seen(self, key: str) -> bool:
        cur = self._conn.execute("INSERT OR IGNORE INTO seen(key) VALUES (?)", (key,))
        return cur.rowcount == 0

    def close(self) -> None:
        self._conn.close()


def dry_run(settings: Settings, manifest: Path | None, console: Console) -> int:
    """Print rows, files, bytes, rows already done and an estimated duration; exit 0, 2 or 1."""
    try:
        plan = make_plan(settings, manifest)
    except BulkEngineError as exc:
        console.print(f"[red]error:[/] {redact(str(exc))}")
        return 1
    except OSError as exc:
        console.print(f"[red]error:[/] {redact(str(exc))}")
        return 1
    render_plan(plan, settings, console)
    if settings.stats_json is not None:
        import json

        settings.stats_json.write_text(json.dumps(plan.to_json(), indent=2) + "\n",
                                       encoding="utf-8")
    return 2 if plan.rows_rejected else 0


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
    rejected = f"[red]{plan.rows_rejected}[/]" if plan.rows_rejected else "0"
    if plan.rejected_by_kind:
        rejected += " (" + ", ".join(f"{k}: {v}" for k, v in
                                     plan.rejected_by_kind.most_common()) + ")"
    t.add_row("would fail", rejected)
    t.add_row("files", str(plan.files))
    t.add_row("bytes", f"{fmt_bytes(plan.bytes)} (largest folder "
                       f"{fmt_bytes(plan.largest_folder_bytes)})")
    e = plan.estimate
    t.add_row("API calls", f"≈ {e['api_calls']} at {s.rate_limit:g} calls/s")
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
