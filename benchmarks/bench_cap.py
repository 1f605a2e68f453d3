"""The engine against a key whose parallel analyses are capped (issue 12: the outstanding window).

The emulator (its own process) runs at most ``--cap`` analyses at once for the key (10, as the
API documents) and queues the rest, each analysis lasting a uniform MIN..MAX seconds (3-12 s:
the real API's 30-120 s scaled down ten times, like the polls, 1-3 s for 10-30 s). No rate
limit at the emulator. The engine runs in this process with its defaults (``--rate-limit
auto``, the adaptive outstanding window under ``--max-outstanding`` 2000) and polls scaled the
same way. Optionally the cap changes
mid-run (``--cap-schedule``: another job on the same key taking slots), through the
emulator's ``POST /_emulator/limits``.

    python benchmarks/bench_cap.py                          # N = 500, cap 10
    python benchmarks/bench_cap.py --compare                # defaults, fixed 2000, fixed 12
    python benchmarks/bench_cap.py --setting adaptive_window=false  # the fixed 2000, for the record
    python benchmarks/bench_cap.py --setting adaptive_window=false --setting max_outstanding=12
    python benchmarks/bench_cap.py --cap-schedule 120:5,240:10     # cap 10 -> 5 -> 10

Figures: **throughput** (completed rows ÷ wall time of ``Engine.run()``) against cap/L, the
most a cap of C with mean processing time L allows; **polls per folder** (from the output
lines); **p50/p95 latency** (``latency_s`` of the output: from the start of the submit to the
result) against L; the most analyses the emulator saw running at once; 429s. Targets:
throughput >= 0.95 cap/L, <= 1.5 polls per folder, p50 <= 1.5 L. Exit 0 when met, 3 if not.

The defaults include the adaptive window (``bulk_engine.tuning.OutstandingWindow``);
``--setting adaptive_window=false`` gives the fixed ``--max-outstanding`` window.
``--compare`` runs, side by side in one run (a fresh emulator each), the defaults, the fixed
window of 2000 (the engine before the adaptive window) and a hand-set fixed window of 12; the
targets are checked on the first (defaults plus any ``--setting``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
import urllib.request
from dataclasses import fields
from pathlib import Path
from typing import Any

from common import (
    API_KEY,
    emulator,
    emulator_flags,
    md_table,
    print_machine,
    read_output,
    sample_archive,
    save_json,
    workdir,
)

from bulk_engine.config import Settings, load_settings
from bulk_engine.engine import Engine
from bulk_engine.logs import configure_logging

# Settings every run passes after the script's own and before --setting: none, the engine's
# defaults (adaptive window, auto rate) are what this benchmark measures.
WIRED_SETTINGS: dict[str, Any] = {}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folders", type=int, default=500, help="N (default 500)")
    p.add_argument("--cap", type=int, default=10,
                   help="the emulator's --max-parallel-analyses (default 10)")
    p.add_argument("--processing-time", default="3:12", metavar="MIN:MAX",
                   help="seconds per analysis, uniform (default 3:12)")
    p.add_argument("--poll-min", type=float, default=1.0, help="engine --poll-min (1)")
    p.add_argument("--poll-max", type=float, default=3.0, help="engine --poll-max (3)")
    p.add_argument("--cap-schedule", default="", metavar="T:CAP,...",
                   help="change the cap T seconds after the start, e.g. 120:5,240:10")
    p.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE",
                   help="an engine setting, as the CLI would take it (repeatable), e.g. "
                        "max_outstanding=12")
    p.add_argument("--compare", action="store_true",
                   help="also run the fixed window of 2000 and a hand-set fixed 12, side by side")
    p.add_argument("--target-throughput", type=float, default=0.95)
    p.add_argument("--target-polls", type=float, default=1.5)
    p.add_argument("--target-p50", type=float, default=1.5, help="p50 latency ÷ L (1.5)")
    p.add_argument("--workdir", help="keep archives and outputs here (default: a temp dir)")
    p.add_argument("--json", help="also write the figures as JSON to this path")
    return p.parse_args(argv)


def engine_settings(ns: argparse.Namespace, base_url: str, output: Path,
                    overrides: list[str] | None = None) -> Settings:
    """The engine's defaults, the scaled polls, then ``WIRED_SETTINGS``, then ``--setting``
    (or ``overrides``, when given: the variants of ``--compare``)."""
    cli: dict[str, Any] = {
        "base_url": base_url, "api_key": API_KEY, "output": str(output),
        "poll_min": ns.poll_min, "poll_max": ns.poll_max, "progress": False, "seed": 1,
        "log_level": "warning",
    }
    cli.update(WIRED_SETTINGS)
    for item in ns.setting if overrides is None else overrides:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--setting takes NAME=VALUE, got {item!r}")
        cli[name.strip().replace("-", "_")] = value.strip()
    known = {f.name for f in fields(Settings)}
    unknown = sorted(set(cli) - known)
    if unknown:  # load_settings would skip them silently
        raise SystemExit(f"not an engine setting (yet?): {', '.join(unknown)}")
    return load_settings(cli=cli, environ={})


def change_cap_later(base_url: str, schedule: list[tuple[float, int]], t0: float,
                     log: list[tuple[float, int]]) -> threading.Thread:
    """POST /_emulator/limits at the scheduled times (a daemon thread)."""

    def run() -> None:
        for at, cap in schedule:
            time.sleep(max(0.0, t0 + at - time.perf_counter()))
            req = urllib.request.Request(
                base_url + "/_emulator/limits", method="POST",
                data=f'{{"max_parallel_analyses": {cap}}}'.encode(),
                headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as resp:
                resp.read()
            log.append((round(time.perf_counter() - t0, 1), cap))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


async def run_engine(settings: Settings, manifest: Path) -> tuple[float, Any, list[Any]]:
    """Run the engine; sample how many folders it has out every 0.5 s."""
    engine = Engine(settings, manifest)
    timeline: list[Any] = []

    async def sample() -> None:
        while True:
            c = engine.counters
            timeline.append((round(time.perf_counter() - t0, 1), c.processing))
            await asyncio.sleep(0.5)

    t0 = time.perf_counter()
    sampler = asyncio.create_task(sample())
    try:
        result = await engine.run()
    finally:
        sampler.cancel()
    return time.perf_counter() - t0, result, timeline


# --compare: (label, settings) beside the defaults.
FIXED_VARIANTS: list[tuple[str, list[str]]] = [
    ("fixed 2000", ["adaptive_window=false", "max_outstanding=2000"]),
    ("fixed 12", ["adaptive_window=false", "max_outstanding=12"]),
]


def run_variant(ns: argparse.Namespace, work: Path, manifest: Path, label: str,
                overrides: list[str], schedule: list[tuple[float, int]]) -> dict[str, Any]:
    """One engine run against a fresh emulator; its figures."""
    lo, hi = (float(x) for x in ns.processing_time.split(":"))
    mean_l = (lo + hi) / 2
    out = work / f"cap-{label.replace(' ', '-')}.jsonl"
    for stale in (out, Path(f"{out}.journal")):
        stale.unlink(missing_ok=True)
    flags = emulator_flags(processing=(lo, hi), max_parallel=ns.cap)
    with emulator(flags, workdir=work) as emu:
        settings = engine_settings(ns, emu.base_url, out, overrides)
        rate = "auto" if settings.rate_limit is None else f"{settings.rate_limit:g}"
        window = "adaptive" if settings.adaptive_window else "fixed"
        print(f"[{label}] engine: --rate-limit {rate} --max-outstanding "
              f"{settings.max_outstanding} ({window} window) --concurrency "
              f"{settings.concurrency} --poll-min {settings.poll_min:g} --poll-max "
              f"{settings.poll_max:g}"
              + (f"; wired settings {WIRED_SETTINGS}" if WIRED_SETTINGS else "")
              + (f"; settings {' '.join(overrides)}" if overrides else ""), flush=True)
        changes: list[tuple[float, int]] = []
        if schedule:
            change_cap_later(emu.base_url, schedule, time.perf_counter(), changes)
        wall, result, timeline = asyncio.run(run_engine(settings, manifest))
        est = emu.stats()
    outs = read_output(out)
    cap_rate = ns.cap / mean_l
    throughput = outs.completed / wall
    p50, p95 = outs.latency(0.5), outs.latency(0.95)
    return {
        "label": label, "folders": ns.folders, "cap": ns.cap, "processing_time": [lo, hi],
        "mean_L": mean_l, "cap_schedule": schedule, "cap_changes_done": changes,
        "settings": {"rate_limit": settings.rate_limit,
                     "adaptive_window": settings.adaptive_window,
                     "max_outstanding": settings.max_outstanding,
                     "concurrency": settings.concurrency, "poll_min": settings.poll_min,
                     "poll_max": settings.poll_max, "wired": WIRED_SETTINGS,
                     "overrides": overrides},
        "exit_code": result.exit_code, "completed": outs.completed, "failed": outs.failed,
        "wall_s": round(wall, 2), "throughput_per_s": round(throughput, 4),
        "cap_over_L_per_s": round(cap_rate, 4),
        "throughput_over_cap_rate": round(throughput / cap_rate, 4),
        "polls_per_folder": round(outs.polls_per_folder, 3),
        "latency_p50_s": round(p50, 2), "latency_p95_s": round(p95, 2),
        "p50_over_L": round(p50 / mean_l, 3), "p95_over_L": round(p95 / mean_l, 3),
        "max_parallel_observed": est["max_parallel_observed"],
        "emulator_calls": est["submissions"] + est["polls"], "emulator_429": est["rate_limited"],
        "timeline_t_processing": timeline,
    }


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    schedule = [(float(t), int(c)) for t, c in
                (item.split(":") for item in ns.cap_schedule.split(",") if item)]
    configure_logging(level="warning", fmt="console")
    mach = print_machine()
    print(f"emulator: --max-parallel-analyses {ns.cap} --processing-time "
          f"{ns.processing_time} (no rate limit)"
          + (f", cap schedule {ns.cap_schedule}" if schedule else ""))
    variants = [("defaults" if not ns.setting else "defaults + settings", list(ns.setting))]
    if ns.compare:
        variants += FIXED_VARIANTS
    runs: list[dict[str, Any]] = []
    with workdir(ns.workdir, "bench-cap-") as work:
        manifest = sample_archive(work / f"archive-{ns.folders}", ns.folders)
        for label, overrides in variants:
            runs.append(run_variant(ns, work, manifest, label, overrides, schedule))
    print()
    print(md_table(
        ["engine", "N", "wall s", "throughput / (cap/L)", "polls/folder", "p50 latency s",
         "p95 latency s", "max parallel", "429s", "completed"],
        [[r["label"], r["folders"], r["wall_s"], r["throughput_over_cap_rate"],
          r["polls_per_folder"],
          f"{r['latency_p50_s']:.1f} ({r['p50_over_L']:.2f} L)",
          f"{r['latency_p95_s']:.1f} ({r['p95_over_L']:.2f} L)",
          r["max_parallel_observed"], r["emulator_429"], f"{r['completed']}/{r['folders']}"]
         for r in runs]))
    r = runs[0]
    timeline = r["timeline_t_processing"]
    step = max(1, len(timeline) // 20)
    print(f"\n[{r['label']}] folders processing (t s: n): "
          + ", ".join(f"{t:g}: {n}" for t, n in timeline[::step]))
    checks = [
        (f"throughput >= {ns.target_throughput:.2f} cap/L",
         r["throughput_over_cap_rate"] >= ns.target_throughput),
        (f"polls/folder <= {ns.target_polls:.2f}", r["polls_per_folder"] <= ns.target_polls),
        (f"p50 latency <= {ns.target_p50:.2f} L", r["p50_over_L"] <= ns.target_p50),
        ("every row completed", r["completed"] == ns.folders),
    ]
    for name, ok in checks:
        print(f"[{r['label']}] {name}: {'met' if ok else 'MISSED'}")
    save_json(ns.json, {"machine": mach, "argv": sys.argv, "run": r, "runs": runs})
    return 0 if all(ok for _, ok in checks) else 3


if __name__ == "__main__":
    sys.exit(main())
