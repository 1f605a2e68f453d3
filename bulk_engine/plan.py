"""``--dry-run``: read the manifest, check every row and folder, print the plan, send nothing."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bulk_engine.config import Settings
from bulk_engine.errors import BulkEngineError
from bulk_engine.journal import Journal
from bulk_engine.manifest import ProducerStats, RowDefaults, iter_manifest, iter_root
from bulk_engine.models import BadRow


def dry_run(settings: Settings, manifest: Path | None, console: Console) -> int:
    """Print rows, files, bytes, rows already done and an estimated duration; exit 0 or 1."""
    s = settings
    defaults = RowDefaults(use_case=s.use_case, analyse_type=s.analyse_type, payload={})
    stats = ProducerStats()
    try:
        if manifest is None:
            assert s.root is not None
            rows = iter_root(s.root, defaults=defaults, max_file_size=s.max_file_size,
                             follow_symlinks=s.follow_symlinks, stats=stats)
        else:
            rows = iter_manifest(manifest, defaults=defaults, max_file_size=s.max_file_size,
                                 follow_symlinks=s.follow_symlinks, confine_to=s.confine_to,
                                 stats=stats)
        journal = Journal.open(s.journal_path) if s.journal_path.exists() else None
        files = size = done = todo = 0
        bad: Counter[str] = Counter()
        examples: list[str] = []
        try:
            for item in rows:
                if isinstance(item, BadRow):
                    bad[item.kind] += 1
                    if len(examples) < 10:
                        examples.append(f"line {item.line}: {item.kind}: {item.message}")
                    continue
                if journal is not None and journal.is_done(item.key):
                    done += 1
                    continue
                todo += 1
                files += len(item.files)
                size += item.total_bytes
        finally:
            if journal is not None:
                journal.close()
    except BulkEngineError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1
    est = 2 * todo / s.rate_limit if s.mode != "sync" else todo / s.rate_limit
    plan = {
        "rows_read": stats.rows_read, "rows_to_submit": todo, "rows_already_done": done,
        "rows_rejected": sum(bad.values()), "rejected_by_kind": dict(bad), "files": files,
        "bytes": size, "estimated_seconds": round(est, 1), "rate_limit": s.rate_limit,
        "concurrency": s.concurrency,
    }
    t = Table(title="Dry run: nothing was sent", show_header=False)
    for k, v in plan.items():
        t.add_row(k.replace("_", " "), json.dumps(v) if isinstance(v, dict) else str(v))
    console.print(t)
    for line in examples:
        console.print(f"  [yellow]{line}[/]")
    return 0
