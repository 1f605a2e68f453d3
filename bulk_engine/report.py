"""Summaries: the end-of-run table, and ``python -m bulk_engine report results.jsonl``.

Both read the same ``Summary`` (``stats.py``); ``report`` rebuilds it from an output file,
partial files included (a torn or unreadable line is skipped and counted). From the same pass it
can write a manifest of the failed rows, ready to rerun, and a PNG chart (matplotlib, the
optional ``plot`` extra).

A failed row's ``folder`` is written as in the original manifest, relative to *that* manifest's
directory, so the new manifest gets absolute folders: the line's ``path`` (the folder as the run
resolved it), else ``--base-dir`` joined with ``folder``. With ``--manifest ORIGINAL.csv`` the
failed rows are copied from the original with every column (``use_case``, ``payload``...), only
``folder`` made absolute. Rows that cannot be rerun as they are (duplicate ids, unparseable rows,
empty folders) are left out and counted.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bulk_engine.errors import ConfigError
from bulk_engine.models import row_key
from bulk_engine.progress import fmt_bytes
from bulk_engine.rules import scratch_seen
from bulk_engine.s3.url import is_s3_url
from bulk_engine.stats import BIN_S, Summary
from bulk_engine.vocab import BAD_COLUMN_KINDS, NOT_RERUNNABLE_KINDS, Status

__all__ = [
    "BAD_COLUMNS",
    "MAX_LINE_BYTES",
    "NOT_RERUNNABLE",
    "FailedManifest",
    "FailedRow",
    "FileReport",
    "read_results",
    "render_summary",
    "summarize_file",
    "write_chart",
    "write_failed_manifest",
]

# Rows whose line in the manifest is itself broken: a rerun needs the manifest fixed first.
NOT_RERUNNABLE = NOT_RERUNNABLE_KINDS
# Rows whose own columns were bad: rerunnable only from the original row (--manifest).
BAD_COLUMNS = BAD_COLUMN_KINDS
# A longer "line" is not an output line (a binary file without newlines): skipped, not buffered.
MAX_LINE_BYTES = 64 * 1024 * 1024


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(d.items(), key=lambda kv: (-kv[1], kv[0])))


def render_summary(
    summary: dict[str, Any], console: Console, *, title: str = "Run summary"
) -> None:
    """Print a summary dict (``Summary.to_json()``, plus the engine's extras) as a table."""
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column("what", style="bold", no_wrap=True)
    t.add_column("value")
    status = summary.get("by_status", {})
    t.add_row("rows", str(summary.get("rows", 0)))
    t.add_row("completed", f"[green]{status.get(Status.COMPLETED, 0)}[/]")
    failed = status.get(Status.FAILED, 0)
    t.add_row("failed", f"[red]{failed}[/]" if failed else "0")
    others = {k: v for k, v in status.items() if k not in tuple(Status)}
    if others:
        t.add_row("other status", _counts(others))
    total_c, total_f = summary.get("total_completed"), summary.get("total_failed")
    if total_c is not None and (total_c, total_f) != (status.get(Status.COMPLETED, 0), failed):
        t.add_row("whole output", f"{summary['total_completed']} completed, "
                                  f"{summary.get('total_failed', 0)} failed (earlier runs too)")
    if summary.get("by_decision"):
        t.add_row("decisions", _counts(summary["by_decision"]))
    if summary.get("error_kinds"):
        t.add_row("error kinds", _counts(summary["error_kinds"]))
    lat = summary.get("latency_s") or {}
    if lat.get("p50") is not None:
        t.add_row("latency p50 / p95 / p99",
                  f"{lat['p50']:g} / {lat['p95']:g} / {lat['p99']:g} s (max {lat['max']:g} s)")
    if summary.get("polls_per_folder") is not None:
        t.add_row("polls per folder",
                  f"{summary['polls_per_folder']:g} on average, at most "
                  f"{summary.get('max_polls', '?')}")
    if summary.get("rows_per_s") is not None:
        per_s = summary["rows_per_s"]
        t.add_row("throughput", f"{per_s:g} rows/s ({per_s * 3600:,.0f} rows/h) over "
                                f"{summary['span_s']:g} s")
    if "throttled_429" in summary:  # a live run: the client's counters
        t.add_row("API calls", f"{summary.get('api_calls', 0)} ({summary.get('submits', 0)} "
                               f"submits, {summary.get('polls', 0)} polls)")
        t.add_row("429s · 503s", f"{summary['throttled_429']} · "
                                 f"{summary.get('unavailable_503', 0)}")
        t.add_row("retries", str(summary.get("retries", 0)))
    t.add_row("possible duplicates", str(summary.get("possible_duplicates", 0)))
    if summary.get("bytes_uploaded"):
        t.add_row("uploaded", fmt_bytes(int(summary["bytes_uploaded"])))
    elif summary.get("bytes"):
        t.add_row("folder bytes", f"{fmt_bytes(int(summary['bytes']))} in "
                                  f"{summary.get('files', 0)} files")
    for key in ("rows_skipped_done", "rows_resumed", "rows_redone", "rows_dropped",
                "rows_rejected", "resubmits", "rows_withdrawn", "stuck_analyses",
                "resubmitted_rows", "ambiguous_submits", "torn_lines"):
        if summary.get(key):
            t.add_row(key.replace("_", " "), str(summary[key]))
    if summary.get("duplicate_lines"):
        t.add_row("duplicate lines", f"[yellow]{summary['duplicate_lines']} line(s) repeat a row "
                                     "already in the file (two runs appended to one output?); "
                                     "the counts above include them[/]")
    if summary.get("s3_list_calls") is not None:  # a live run that read folders in buckets
        t.add_row("S3 requests", f"{summary['s3_list_calls']} LIST, "
                                 f"{summary.get('s3_get_calls', 0)} GET "
                                 f"({fmt_bytes(int(summary.get('s3_bytes_read', 0)))} read), "
                                 f"{summary.get('s3_retries', 0)} retries, "
                                 f"{summary.get('s3_changed_objects', 0)} changed objects")
    rate, window = summary.get("rate"), summary.get("window")
    if isinstance(rate, dict):
        est = rate.get("limit_estimate")
        t.add_row("rate", f"{rate.get('calls_per_s')} calls/s at the end ({rate.get('mode')}"
                          + (f", {rate.get('phase')}" if rate.get("phase") else "")
                          + (f"; the key's limit looked like ~{est} calls/s" if est else "") + ")")
    elif summary.get("final_rate_limit") is not None and summary.get("throttled_429"):
        t.add_row("final rate limit", f"{summary['final_rate_limit']:g} calls/s")
    if isinstance(window, dict):
        t.add_row("window", f"{window.get('limit')} folders outstanding at most at the end "
                            f"({window.get('phase')}; queue ~{window.get('queue_estimate')} at "
                            f"the API)")
    console.print(t)


# ---- reading an output file -------------------------------------------------------------------


@dataclass(slots=True)
class FailedRow:
    """What the failed manifest needs of one failed output line."""

    line: int | None
    id: str
    folder: str
    path: str | None
    kind: str


@dataclass
class FileReport:
    """One pass over an output file: the summary, torn and duplicate lines, the failed rows."""

    summary: Summary = field(default_factory=Summary)
    torn_lines: int = 0
    # Lines for a row the file already had a line for (same id; for duplicate_id rows, same
    # manifest line): the outputs of two runs appended to one file, say.
    duplicate_lines: int = 0
    # Last word wins: a row failed in one run and completed in a later one is not failed.
    failed: dict[str, FailedRow] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = self.summary.to_json()
        out["torn_lines"] = self.torn_lines
        out["duplicate_lines"] = self.duplicate_lines
        return out


def read_results(path: Path) -> FileReport:
    """Read an output file line by line (memory: the failed rows only).

    Torn or unreadable lines are skipped and counted. Raises ConfigError when the file holds no
    output line at all but whole lines of something else (a binary file, a CSV, a JSON
    document): that is not a partial output, it is the wrong file.
    """
    rep = FileReport()
    other_lines = 0  # complete, non-blank lines that are not output lines
    with path.open("rb") as fh, scratch_seen() as seen:
        while raw := fh.readline(MAX_LINE_BYTES):
            complete = raw.endswith(b"\n")
            if not complete and len(raw) == MAX_LINE_BYTES:
                while raw and not raw.endswith(b"\n"):  # skip the rest of an endless line
                    raw = fh.readline(MAX_LINE_BYTES)
                rep.torn_lines += 1
                other_lines += 1
                continue
            if not raw.strip():
                continue
            rec = _record(raw)
            if rec is None:
                rep.torn_lines += 1
                # A torn last line is the start of an output line; anything else is not one.
                if complete or not raw.lstrip().startswith(b"{"):
                    other_lines += 1
                continue
            rep.summary.add(rec)
            row_id = str(rec.get("id", ""))
            err = rec.get("error")
            kind = str(err.get("kind")) if isinstance(err, dict) else "unknown"
            line = rec.get("line")
            line_no = line if isinstance(line, int) else None
            if seen(row_key(row_id, line_no or 0, duplicate=kind == "duplicate_id")):
                rep.duplicate_lines += 1
            if rec.get("status") == Status.FAILED:
                path_ = rec.get("path")
                rep.failed[row_id] = FailedRow(
                    line=line_no, id=row_id, folder=str(rec.get("folder") or ""),
                    path=path_ if isinstance(path_, str) and path_ else None, kind=kind)
            else:
                rep.failed.pop(row_id, None)
    if not rep.summary.rows and other_lines:
        raise ConfigError(
            f"{path} is not a bulk_engine output: none of its lines is a JSON object with a "
            f"`status` ({other_lines} line(s) of something else); give the JSONL file a run "
            "wrote (--output)"
        )
    return rep


def _record(raw: bytes) -> dict[str, Any] | None:
    """The output line's object, or None if ``raw`` is not one (torn, garbage, other JSON)."""
    try:
        # surrogateescape: a folder name that is not UTF-8 round-trips to the manifest.
        rec = json.loads(raw.decode("utf-8", "surrogateescape"))
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and "status" in rec else None


def summarize_file(
    path: Path,
    *,
    failed_manifest: Path | None = None,
    manifest: Path | None = None,
    base_dir: Path | None = None,
) -> dict[str, Any]:
    """Rebuild the summary from an output file; optionally write a manifest of failed rows."""
    rep = read_results(path)
    out = rep.to_json()
    if failed_manifest is not None:
        res = write_failed_manifest(rep, failed_manifest, manifest=manifest, base_dir=base_dir)
        out["failed_manifest"] = res.to_json()
    return out


# ---- the failed manifest ----------------------------------------------------------------------


@dataclass
class FailedManifest:
    """What ``write_failed_manifest`` wrote, and what it left out and why."""

    path: Path
    written: int = 0
    left_out: Counter[str] = field(default_factory=Counter)
    not_found: int = 0  # failed rows missing from the original manifest (it changed?)

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "rows": self.written,
                "left_out": dict(self.left_out), "not_found_in_manifest": self.not_found}


def write_failed_manifest(
    rep: FileReport, dest: Path, *, manifest: Path | None = None, base_dir: Path | None = None
) -> FailedManifest:
    """Write the failed rows as a manifest whose folders are absolute (see the module doc).

    Raises ConfigError, before writing anything, when a relative folder cannot be resolved.
    """
    res = FailedManifest(dest)
    rows: list[FailedRow] = []
    for row in rep.failed.values():
        if row.kind in NOT_RERUNNABLE or not row.folder.strip():
            res.left_out[row.kind] += 1
        elif row.kind in BAD_COLUMNS and manifest is None:
            res.left_out[row.kind] += 1  # its own columns were the problem: fix the original
        else:
            rows.append(row)
    if manifest is not None:
        _copy_failed_rows(manifest, dest, {r.id: r for r in rows}, res)
        return res
    base = os.path.abspath(base_dir) if base_dir is not None else None
    unresolved = [r for r in rows if r.path is None and not _absolute(r.folder)]
    if unresolved and base is None:
        raise ConfigError(
            f"{len(unresolved)} failed row(s) have a relative folder (e.g. "
            f"{unresolved[0].folder!r}) and no resolved `path` in the output; folders are "
            "relative to the original manifest's directory: give --manifest ORIGINAL.csv "
            "(keeps every column) or --base-dir DIR (that directory)"
        )
    with _open_csv(dest) as fh:
        w = csv.writer(fh)
        w.writerow(["id", "folder"])
        for r in rows:
            if r.path is not None:
                folder = r.path
            else:
                assert base is not None or _absolute(r.folder)
                folder = r.folder if _absolute(r.folder) else os.path.join(base or "", r.folder)
            w.writerow([r.id, folder])
            res.written += 1
    return res


def _absolute(folder: str) -> bool:
    """An absolute path, or a folder in a bucket (``s3://...``, never joined to a directory)."""
    return os.path.isabs(folder) or is_s3_url(folder.lstrip())


def _open_csv(path: Path) -> Any:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("w", newline="", encoding="utf-8", errors="surrogateescape")


def _copy_failed_rows(src: Path, dest: Path, wanted: dict[str, FailedRow],
                      res: FailedManifest) -> None:
    """Copy the original rows of ``wanted`` ids, every column kept, ``folder`` made absolute."""
    base = os.path.dirname(os.path.abspath(src))
    try:
        fh_in = src.open(encoding="utf-8-sig", errors="surrogateescape", newline="")
    except OSError as exc:
        raise ConfigError(f"cannot read manifest {src} ({exc.strerror})") from None
    with fh_in, _open_csv(dest) as fh_out:
        reader = csv.reader(fh_in)
        header = next((r for r in reader if any(c.strip() for c in r)), None)
        cols = [c.strip().lower() for c in header or []]
        if header is None or "folder" not in cols:
            raise ConfigError(f"manifest {src} has no 'folder' column: is it the original?")
        i_folder = cols.index("folder")
        i_id = cols.index("id") if "id" in cols else None
        w = csv.writer(fh_out)
        w.writerow(header)
        remaining = dict(wanted)
        try:
            for row in reader:
                if i_folder >= len(row) or not remaining:
                    continue
                folder = row[i_folder]
                row_id = (row[i_id].strip() if i_id is not None and i_id < len(row) else "")
                row_id = row_id or folder.strip()
                if row_id in remaining:
                    del remaining[row_id]
                    row = list(row)
                    if not _absolute(folder):
                        row[i_folder] = os.path.join(base, folder)
                    w.writerow(row)
                    res.written += 1
        except csv.Error as exc:
            raise ConfigError(f"manifest {src} cannot be parsed ({exc})") from None
        res.not_found = len(remaining)


# ---- the chart --------------------------------------------------------------------------------


def write_chart(summary: Summary, dest: Path, *, title: str = "bulk_engine run") -> None:
    """A PNG: rows finished per minute over time, and the row latency histogram.

    Raises ConfigError when matplotlib is not installed (the optional ``plot`` extra).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError(
            "--chart needs matplotlib, which is not installed: "
            "pip install 'bulk-engine[plot]' (or pip install matplotlib)"
        ) from None
    fig = Figure(figsize=(10, 7), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title)
    ax1, ax2 = fig.subplots(2, 1)
    _plot_throughput(ax1, summary)
    _plot_latency(ax2, summary)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest, dpi=100, format="png")


def _plot_throughput(ax: Any, summary: Summary) -> None:
    bins = summary.done_bins
    ax.set_title("Throughput: rows finished per minute")
    ax.set_ylabel("rows / min")
    if not bins:
        ax.text(0.5, 0.5, "no completion times in the output", ha="center",
                transform=ax.transAxes)
        return
    first, last = min(bins), max(bins)
    # At most ~150 points: merge the 10 s bins into wider ones for long runs.
    merge = max(1, math.ceil((last - first + 1) / 150))
    width_s = BIN_S * merge
    xs: list[float] = []
    ys: list[float] = []
    for start in range(first, last + 1, merge):
        n = sum(bins.get(b, 0) for b in range(start, start + merge))
        xs.append((start - first) * BIN_S / 60)
        ys.append(n * 60 / width_s)
    xs.append(xs[-1] + width_s / 60)  # the right edge of the last bin, so it has a width
    ys.append(ys[-1])
    minutes = (last - first + 1) * BIN_S / 60
    if minutes > 180:
        xs = [x / 60 for x in xs]
        ax.set_xlabel("hours since the first completion")
    else:
        ax.set_xlabel("minutes since the first completion")
    ax.step(xs, ys, where="post", color="tab:blue")
    ax.fill_between(xs, ys, step="post", alpha=0.25, color="tab:blue")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)


def _plot_latency(ax: Any, summary: Summary) -> None:
    h = summary.latency
    ax.set_title("Row latency (submission to final answer)")
    ax.set_xlabel("seconds (log scale)")
    ax.set_ylabel("rows")
    if not h.count:
        ax.text(0.5, 0.5, "no latencies in the output", ha="center", transform=ax.transAxes)
        return
    buckets = h.buckets()
    # ~40 bars across the observed range, on a log axis.
    lo, hi = buckets[0][0], buckets[-1][1]
    n_bars = 40
    ratio = (hi / lo) ** (1 / n_bars) if hi > lo else 1.02
    edges = [lo * ratio**i for i in range(n_bars + 1)]
    counts = [0] * n_bars
    for b_lo, b_hi, n in buckets:
        mid = math.sqrt(b_lo * b_hi)
        i = min(int(math.log(mid / lo) / math.log(ratio)) if ratio > 1 else 0, n_bars - 1)
        counts[max(i, 0)] += n
    ax.bar(edges[:-1], counts, width=[b - a for a, b in pairwise(edges)],
           align="edge", color="tab:green", alpha=0.7, edgecolor="white")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for q, style in ((0.5, "-"), (0.95, "--"), (0.99, ":")):
        v = h.quantile(q)
        if v is not None:
            ax.axvline(v, color="black", linestyle=style, linewidth=1,
                       label=f"p{round(q * 100)} = {v:.3g} s")
    ax.legend(loc="best")
    ax.grid(alpha=0.3, which="both")
