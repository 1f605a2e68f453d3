"""Summaries: the end-of-run table, and ``python -m bulk_engine report results.jsonl``.

Both read the same ``Summary`` (``stats.py``); ``report`` rebuilds it from an output file,
partial files included (a torn last line is skipped and counted).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bulk_engine.stats import Summary


def render_summary(
    summary: dict[str, Any], console: Console, *, title: str = "Run summary"
) -> None:
    """Print a summary dict (``Summary.to_json()``) as a table."""
    t = Table(title=title, show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    status = summary.get("by_status", {})
    t.add_row("rows", str(summary.get("rows", 0)))
    t.add_row("completed", f"[green]{status.get('completed', 0)}[/]")
    t.add_row("failed", f"[red]{status.get('failed', 0)}[/]")
    if summary.get("by_decision"):
        t.add_row("decisions", ", ".join(f"{k}: {v}" for k, v in
                                         sorted(summary["by_decision"].items())))
    if summary.get("error_kinds"):
        t.add_row("error kinds", ", ".join(f"{k}: {v}" for k, v in
                                           sorted(summary["error_kinds"].items())))
    lat = summary.get("latency_s") or {}
    if lat.get("p50") is not None:
        t.add_row("latency p50/p95/p99", f"{lat['p50']} / {lat['p95']} / {lat['p99']} s")
    if summary.get("polls_per_folder") is not None:
        t.add_row("polls per folder", str(summary["polls_per_folder"]))
    if summary.get("rows_per_s") is not None:
        t.add_row("throughput", f"{summary['rows_per_s']} rows/s over {summary['span_s']} s")
    for key in ("rows_skipped_done", "rows_resumed", "api_calls", "throttled_429",
                "unavailable_503", "retries", "resubmits", "ambiguous_submits",
                "possible_duplicates", "bytes_uploaded", "torn_lines", "total_completed",
                "total_failed"):
        if summary.get(key):
            t.add_row(key.replace("_", " "), str(summary[key]))
    console.print(t)


def summarize_file(path: Path, *, failed_manifest: Path | None = None) -> dict[str, Any]:
    """Rebuild the summary from an output file; optionally write a manifest of failed rows."""
    summary = Summary()
    torn = 0
    writer = None
    fh_out = None
    try:
        if failed_manifest is not None:
            fh_out = failed_manifest.open("w", newline="", encoding="utf-8")
            writer = csv.writer(fh_out)
            writer.writerow(["id", "folder"])
        with path.open("rb") as fh:
            for raw in fh:
                try:
                    rec = json.loads(raw)
                except ValueError:
                    torn += 1
                    continue
                if not isinstance(rec, dict):
                    torn += 1
                    continue
                summary.add(rec)
                if writer is not None and rec.get("status") == "failed":
                    writer.writerow([rec.get("id", ""), rec.get("folder", "")])
    finally:
        if fh_out is not None:
            fh_out.close()
    out = summary.to_json()
    out["torn_lines"] = torn
    return out
