"""``python -m bulk_engine bench``: sweep concurrency × rate limit × processing time, recommend.

For engineers choosing ``--concurrency`` and ``--rate-limit`` for their key. The emulator is
started in a subprocess (``python -m bulk_engine.emulator``), configured like the key's limits
(``--rate-limit`` calls/s, ``--max-parallel-analyses``), once per grid cell so that every cell
starts from fresh server state. The engine runs in this process on a generated sample archive.
For each cell the sweep records throughput (folders/s over the whole run), polls per folder,
429 answers and the median row latency; it prints a table, saves a PNG plot (if matplotlib is
installed) and recommends settings: at each processing time, the engine rate limit and the
smallest concurrency whose throughput is within ``--tolerance`` (5 %) of the best cell.

    python -m bulk_engine bench --rate-limit 20 --max-parallel-analyses 10 \\
        --processing-time 1:4 --folders 100 --concurrency 1,2,4,8 --rates 10,15,20,25

Poll settings follow the processing time unless given: ``--poll-min`` = MIN, ``--poll-max`` =
MAX (the documented 10–30 s is for the real API's minutes-long analyses; the sweep scales time
down so that it finishes in minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from bulk_engine.errors import BulkEngineError, ConfigError
from bulk_engine.report import read_results
from bulk_engine.runner import check_file_target, print_error
from bulk_engine.stats import Summary
from bulk_engine.vocab import ExitCode, Status

__all__ = ["BENCH_KEY", "Cell", "add_arguments", "plot", "recommend", "run", "run_cell"]

BENCH_KEY = "bench-key-0123456789"


# ---- one cell -----------------------------------------------------------------------------------


@dataclass
class Cell:
    """One grid point and what it measured."""

    processing: str
    rate: float | None  # None: --rate-limit auto (the engine's default), beside the grid
    concurrency: int
    wall_s: float = 0.0
    folders_per_s: float = 0.0
    polls_per_folder: float = 0.0
    throttled_429: int = 0
    p50_latency_s: float = 0.0
    completed: int = 0
    folders: int = 0
    found: str = ""  # auto cells: the rate and window the engine found

    @property
    def rate_text(self) -> str:
        return "auto" if self.rate is None else f"{self.rate:g}"


def _processing(text: str) -> tuple[float, float]:
    low, _, high = text.partition(":")
    pair = (float(low), float(high or low))
    if not 0 <= pair[0] <= pair[1]:
        raise argparse.ArgumentTypeError(f"need 0 <= MIN <= MAX, got {text!r}")
    return pair


def _poll_bounds(ns: argparse.Namespace, processing: str) -> tuple[float, float]:
    low, high = _processing(processing)
    poll_min = ns.poll_min if ns.poll_min is not None else max(0.05, low)
    poll_max = ns.poll_max if ns.poll_max is not None else max(poll_min, high)
    return poll_min, poll_max


async def _run_engine(ns: argparse.Namespace, cell: Cell, base_url: str, manifest: Path,
                      out: Path, console: Console) -> tuple[float, ExitCode]:
    from bulk_engine.config import Settings
    from bulk_engine.runner import run_engine

    poll_min, poll_max = _poll_bounds(ns, cell.processing)
    settings = Settings(
        base_url=base_url, api_key=BENCH_KEY, output=out, concurrency=cell.concurrency,
        rate_limit=cell.rate, burst=ns.burst, poll_min=poll_min, poll_max=poll_max,
        progress=False, seed=1, log_level="warning", max_failure_rate=1.0,
        stats_json=Path(f"{out}.stats.json"),
        **({"max_outstanding": ns.max_outstanding} if ns.max_outstanding else {}),
    )
    t0 = time.perf_counter()
    code = await run_engine(settings, manifest, console, total_rows=ns.folders,
                            summary=False)
    return time.perf_counter() - t0, code


def run_cell(ns: argparse.Namespace, cell: Cell, manifest: Path, work: Path,
             console: Console | None = None) -> ExitCode:
    """Fresh emulator, one engine run (through the CLI's runner), the cell's figures.

    Returns the run's exit code: 130/143 when it was interrupted (the sweep stops there).
    """
    from bulk_engine.emulator.process import emulator_process

    console = console or Console(stderr=True)
    low, high = _processing(cell.processing)
    flags = ["--processing-time", f"{low:g}:{high:g}",
             "--max-parallel-analyses", str(ns.max_parallel_analyses),
             "--rate-limit", f"{ns.rate_limit:g}", "--burst", str(ns.server_burst),
             "--seed", "1"]
    out = work / f"cell-{cell.processing}-{cell.rate_text}-{cell.concurrency}.jsonl"
    for stale in (out, Path(f"{out}.journal"), Path(f"{out}.stats.json")):
        stale.unlink(missing_ok=True)
    with emulator_process(flags, api_keys=BENCH_KEY, log_path=work / "emulator.log") as emu:
        wall, code = asyncio.run(_run_engine(ns, cell, emu.base_url, manifest, out, console))
        stats = emu.stats()
    summary = read_results(out).summary if out.exists() else Summary()
    cell.folders = summary.rows
    cell.completed = summary.by_status.get(Status.COMPLETED, 0)
    cell.wall_s = round(wall, 2)
    cell.folders_per_s = round(cell.folders / wall, 3) if wall > 0 else 0.0
    cell.polls_per_folder = round(summary.polls / max(cell.folders, 1), 3)
    cell.throttled_429 = int(stats.get("rate_limited", 0))
    cell.p50_latency_s = round(summary.latency.quantile(0.5) or 0.0, 2)
    if cell.rate is None:
        cell.found = _found(Path(f"{out}.stats.json"))
    return code


def _found(stats_json: Path) -> str:
    """What an auto cell's engine found: its final rate and window (from --stats-json)."""
    try:
        live = json.loads(stats_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    rate, window = live.get("rate") or {}, live.get("window") or {}
    est = rate.get("limit_estimate")
    return (f"rate {rate.get('calls_per_s')}/s ({rate.get('phase')}"
            + (f", limit ~{est}/s" if est else "") + f"), window {window.get('limit')} "
            f"({window.get('phase')})")


# ---- the sweep, its table, plot and recommendation ----------------------------------------------


def _positive(kind: type[int] | type[float], text: str) -> int | float:
    value = kind(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def _floats(text: str) -> list[float]:
    return [float(_positive(float, x)) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(_positive(int, x)) for x in text.split(",") if x.strip()]


def _positive_int(text: str) -> int:
    return int(_positive(int, text))


def _positive_float(text: str) -> float:
    return float(_positive(float, text))


def _processings(text: str) -> list[str]:
    """``MIN:MAX[,MIN:MAX...]``, each checked (a usage error, not a traceback)."""
    values = [p.strip() for p in text.split(",") if p.strip()]
    if not values:
        raise argparse.ArgumentTypeError("give at least one MIN:MAX")
    for value in values:
        _processing(value)
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The sweep's options, on the ``bench`` subcommand's parser."""
    p.description = __doc__
    a = p.add_argument
    a("--rate-limit", type=_positive_float, default=20.0,
      help="your key's rate limit, calls/s over all endpoints (emulator; default 20)")
    a("--max-parallel-analyses", type=_positive_int, default=10,
      help="analyses running at once per key (emulator; default 10, as documented)")
    a("--server-burst", type=_positive_int, default=10,
      help="the emulator's token bucket (default 10)")
    a("--processing-time", type=_processings, default=["1:4"],
      help="comma-separated MIN:MAX values, seconds per analysis (default 1:4)")
    a("--folders", type=_positive_int, default=100, help="sample folders per cell (default 100)")
    a("--concurrency", type=_ints, default=[1, 2, 4, 8],
      help="comma-separated engine --concurrency values (default 1,2,4,8)")
    a("--rates", type=_floats, default=None,
      help="comma-separated engine --rate-limit values (default: 0.5, 0.75, 1 and 1.25 × the "
           "key's rate)")
    a("--burst", type=_positive_int, default=10, help="engine --burst (default 10)")
    a("--max-outstanding", type=_positive_int, default=None,
      help="engine --max-outstanding (default: the engine's default)")
    a("--poll-min", type=_positive_float, default=None,
      help="engine --poll-min (default: MIN processing)")
    a("--poll-max", type=_positive_float, default=None,
      help="engine --poll-max (default: MAX processing)")
    a("--tolerance", type=float, default=0.05,
      help="a setting is 'as good' within this fraction of the best throughput (0.05)")
    a("--plot", type=Path, default=Path("bulk-engine-bench.png"), help="PNG path")
    a("--no-plot", action="store_true", help="do not draw the plot")
    a("--json", type=Path, help="also write every cell and the recommendation as JSON")
    a("--dir", type=Path, help="working directory (default: a temporary one)")


def recommend(cells: list[Cell], key_rate: float, tolerance: float) -> list[dict[str, Any]]:
    """Per processing time: the best throughput, then the cheapest settings within tolerance.

    Cheapest = the lowest engine rate limit (most headroom under the key's limit, fewest 429s),
    then the smallest concurrency, among cells whose throughput is within ``tolerance`` of the
    best. Rates above the key's limit are never recommended.
    """
    out = []
    for processing in dict.fromkeys(c.processing for c in cells):
        group = [c for c in cells if c.processing == processing and c.completed == c.folders
                 and c.rate is not None]
        if not group:
            continue
        best = max(group, key=lambda c: c.folders_per_s)
        good = [c for c in group if c.folders_per_s >= (1 - tolerance) * best.folders_per_s
                and (c.rate or 0.0) <= key_rate * (1 + 1e-9)]
        pick = min(good, key=lambda c: (c.rate or 0.0, c.concurrency)) if good else best
        out.append({"processing_time": processing, "best_folders_per_s": best.folders_per_s,
                    "best": {"rate": best.rate, "concurrency": best.concurrency},
                    "recommended": {"rate": pick.rate, "concurrency": pick.concurrency,
                                    "folders_per_s": pick.folders_per_s}})
    return out


def plot(cells: list[Cell], path: Path, key_rate: float) -> str:
    """Throughput against concurrency, one line per rate, one panel per processing time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install 'bulk-engine[plot]')"
    groups = list(dict.fromkeys(c.processing for c in cells))
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    for ax, processing in zip(axes[0], groups, strict=True):
        for rate in sorted({c.rate for c in cells if c.rate is not None}):
            pts = sorted((c.concurrency, c.folders_per_s) for c in cells
                         if c.processing == processing and c.rate == rate)
            style = "-" if rate <= key_rate else ":"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o",
                    label=f"--rate-limit {rate:g}")
        ax.set_xscale("log", base=2)
        ticks = sorted({c.concurrency for c in cells})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("--concurrency")
        ax.set_ylabel("folders / s")
        ax.set_title(f"processing {processing} s, key limit {key_rate:g}/s")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"plot saved to {path}"


def run(ns: argparse.Namespace) -> ExitCode:
    """Run the sweep for the parsed ``bench`` options: 0, 2 if a cell did not complete every
    folder, 1 on bad paths, 130/143 when interrupted (the cells done so far are reported)."""
    from rich.table import Table

    from bulk_engine.logs import configure_logging
    from bulk_engine.sample import make_sample_archive

    console = Console()
    if not console.is_terminal:
        console = Console(width=150)  # a file or a pipe: keep the table's columns whole
    errors = Console(stderr=True)
    try:
        if not ns.no_plot:
            check_file_target("--plot", ns.plot)
        check_file_target("--json", ns.json)
        if ns.dir is not None and ns.dir.exists() and not ns.dir.is_dir():
            raise ConfigError(f"--dir {ns.dir} exists and is not a directory")
    except BulkEngineError as exc:
        print_error(errors, str(exc))
        return ExitCode.FATAL
    configure_logging(level="error", fmt="console")
    processings: list[str] = ns.processing_time
    rates = ns.rates or [round(ns.rate_limit * f, 3) for f in (0.5, 0.75, 1.0, 1.25)]
    grid: list[Cell] = [Cell(p, r, c) for p in processings for r in rates
                        for c in ns.concurrency]
    # Beside the grid, what the defaults find on their own (--rate-limit auto, the adaptive
    # window), at the largest concurrency of the sweep.
    auto = [Cell(p, None, max(ns.concurrency)) for p in processings]
    console.print(
        f"emulator: --rate-limit {ns.rate_limit:g} --burst {ns.server_burst} "
        f"--max-parallel-analyses {ns.max_parallel_analyses}; {len(grid)} cells of "
        f"{ns.folders} folders (processing {', '.join(processings)} s; engine rates "
        f"{', '.join(f'{r:g}' for r in rates)}; concurrency "
        f"{', '.join(map(str, ns.concurrency))})"
    )
    stopped: ExitCode | None = None
    total = len(grid) + len(auto)
    with contextlib.ExitStack() as stack:
        work = ns.dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        work.mkdir(parents=True, exist_ok=True)
        manifest = make_sample_archive(work / "archive", ns.folders, seed=1)
        cells = grid + auto
        for i, cell in enumerate(cells, 1):
            code = run_cell(ns, cell, manifest, work, errors)
            if code in (ExitCode.INTERRUPTED, ExitCode.TERMINATED):
                stopped = code
                measured = cells[:i - 1]  # the interrupted cell measured nothing
                grid = [c for c in grid if c in measured]
                auto = [c for c in auto if c in measured]
                console.print(f"interrupted: {len(measured)} of {total} cells measured")
                break
            console.print(
                f"[{i}/{total}] processing {cell.processing} rate {cell.rate_text} "
                f"concurrency {cell.concurrency}: {cell.folders_per_s:.2f} folders/s, "
                f"{cell.polls_per_folder:.2f} polls/folder, {cell.throttled_429} × 429"
            )
    recs = recommend(grid, ns.rate_limit, ns.tolerance)
    table = Table(title=f"bench: key limit {ns.rate_limit:g} calls/s, "
                        f"{ns.max_parallel_analyses} parallel analyses, {ns.folders} folders")
    for col in ("processing s", "rate", "concurrency", "wall s", "folders/s", "% of best",
                "polls/folder", "429s", "p50 latency s", "done"):
        table.add_column(col, justify="right")
    best_by = {r["processing_time"]: r["best_folders_per_s"] for r in recs}
    picked = {(r["processing_time"], r["recommended"]["rate"], r["recommended"]["concurrency"])
              for r in recs}
    for c in grid:
        best = best_by.get(c.processing) or 0
        mark = " ◀" if (c.processing, c.rate, c.concurrency) in picked else ""
        table.add_row(c.processing, c.rate_text, str(c.concurrency), f"{c.wall_s:.1f}",
                      f"{c.folders_per_s:.2f}{mark}",
                      f"{100 * c.folders_per_s / best:.0f} %" if best else "—",
                      f"{c.polls_per_folder:.2f}", str(c.throttled_429), f"{c.p50_latency_s:.2f}",
                      f"{c.completed}/{c.folders}")
    console.print(table)
    if not ns.no_plot and grid:
        console.print(plot(grid, ns.plot, ns.rate_limit))
    for c in auto:
        console.print(f"processing {c.processing} s, defaults (--rate-limit auto, adaptive "
                      f"window), concurrency {c.concurrency}: {c.folders_per_s:.2f} folders/s, "
                      f"{c.polls_per_folder:.2f} polls/folder, {c.throttled_429} × 429; found "
                      f"{c.found or '—'}")
    for r in recs:
        rec = r["recommended"]
        poll_min, poll_max = _poll_bounds(ns, r["processing_time"])
        console.print(
            f"processing {r['processing_time']} s: best {r['best_folders_per_s']:.2f} folders/s; "
            f"recommended [bold]--concurrency {rec['concurrency']} --rate-limit "
            f"{rec['rate']:g}[/] ({rec['folders_per_s']:.2f} folders/s, within "
            f"{100 * ns.tolerance:g} % of the best; polls here used --poll-min {poll_min:g} "
            f"--poll-max {poll_max:g})"
        )
    if ns.json is not None:
        ns.json.write_text(json.dumps({"cells": [asdict(c) for c in grid],
                                       "auto": [asdict(c) for c in auto],
                                       "recommendations": recs}, indent=2) + "\n")
        console.print(f"saved {ns.json}")
    if stopped is not None:
        return stopped
    return (ExitCode.OK if all(c.completed == c.folders for c in grid + auto)
            else ExitCode.SOME_FAILED)
