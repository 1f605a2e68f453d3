"""The engine against the ideal makespan (issue 3's measurement, issue 7 item 1).

The emulator (its own process) limits the key to R calls/s over all endpoints and takes a uniform
MIN..MAX seconds per analysis, with no cap on parallel analyses (so only the rate limit binds).
The engine runs in this process at the same rate limit. One folder needs at least one submit and
one poll, so N folders need 2N calls: the ideal makespan is

    ideal = 2N / R + L,    L = the mean processing time (MIN + MAX) / 2

(the last folder submitted still has to be processed; with L = MAX the ideal is a little looser,
and that ratio is printed too). Reported per N: wall time of ``Engine.run()`` ÷ ideal, polls per
folder (from the output lines), API calls per folder, the share of calls answered 429 (counted by
the emulator), p50/p99 row latency (submit 202 → result written), event-loop lag (a 10 ms
ticker's oversleep, in the JSON) and the poll settings used.

    python benchmarks/bench_ideal.py                        # N = 400 (issue 3) and 2000 (issue 7)
    python benchmarks/bench_ideal.py --folders 100          # a quick look
    python benchmarks/bench_ideal.py --folders 400 --windows adaptive fixed   # the window's cost

The engine runs with its default adaptive outstanding window (``--windows adaptive``);
``--windows adaptive fixed`` runs each N both ways, side by side (``fixed``: ``--fixed-window``,
the engine before self-tuning), which is how the window's cost on a rate-bound run is read.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    API_KEY,
    emulator,
    emulator_flags,
    md_table,
    percentile,
    print_machine,
    read_output,
    sample_archive,
    save_json,
    workdir,
)

from bulk_engine.config import Settings
from bulk_engine.engine import Engine
from bulk_engine.logs import configure_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate-limit", type=float, default=40.0,
                   help="R: calls/s of the key at the emulator, and the engine's --rate-limit")
    p.add_argument("--engine-rate", type=float, default=None,
                   help="the engine's --rate-limit if not R (default: R)")
    p.add_argument("--processing-time", default="0.3:1.5", metavar="MIN:MAX",
                   help="seconds per analysis, uniform (default 0.3:1.5)")
    p.add_argument("--folders", type=int, nargs="+", default=[400, 2000],
                   help="N values, one run each (default: 400 2000)")
    p.add_argument("--concurrency", type=int, default=8, help="engine --concurrency (default 8)")
    p.add_argument("--burst", type=int, default=10,
                   help="the emulator's token bucket size for the key (default 10)")
    p.add_argument("--engine-burst", type=int, default=None,
                   help="the engine's --burst (default: the same as --burst)")
    p.add_argument("--poll-min", type=float, default=None,
                   help="engine --poll-min, s (default: MIN processing time, as in "
                        "`python -m bulk_engine bench`; the documented 10 s floor is for the "
                        "real API's minutes-long analyses)")
    p.add_argument("--poll-max", type=float, default=None,
                   help="engine --poll-max, s (default: MAX processing time)")
    p.add_argument("--windows", nargs="+", choices=("adaptive", "fixed"), default=["adaptive"],
                   help="the outstanding window(s) to run each N with (default: adaptive)")
    p.add_argument("--target", type=float, default=1.10, help="target makespan/ideal (1.10)")
    p.add_argument("--workdir", help="keep archives and outputs here (default: a temp dir)")
    p.add_argument("--json", help="also write the figures as JSON to this path")
    return p.parse_args(argv)


async def run_engine(settings: Settings, manifest: Path) -> tuple[float, Any, Any]:
    """Run the engine; sample its limiter every 0.25 s (rate after AIMD, 429s, calls)."""
    engine = Engine(settings, manifest)
    timeline: list[Any] = []
    lags: list[float] = []

    async def ticker() -> None:  # event-loop lag: how late a 10 ms sleep wakes
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - t - 0.01)

    async def sample() -> None:
        while True:
            c = engine.client.stats if engine.client else None
            timeline.append((round(time.perf_counter() - t0, 2),
                             round(engine.limiter.current_rate, 2),
                             c.calls if c else 0, c.throttled if c else 0))
            await asyncio.sleep(0.25)

    t0 = time.perf_counter()
    sampler, tick = asyncio.create_task(sample()), asyncio.create_task(ticker())
    try:
        result = await engine.run()
    finally:
        sampler.cancel()
        tick.cancel()
    return time.perf_counter() - t0, result, (timeline, lags)


def one_run(ns: argparse.Namespace, n: int, work: Path, window: str) -> dict[str, Any]:
    lo, hi = (float(x) for x in ns.processing_time.split(":"))
    rate = ns.rate_limit
    engine_rate = ns.engine_rate or rate
    manifest = sample_archive(work / f"archive-{n}", n)
    out = work / f"ideal-{n}-{window}.jsonl"
    for stale in (out, Path(f"{out}.journal")):
        stale.unlink(missing_ok=True)
    flags = emulator_flags(rate_limit=rate, burst=ns.burst, processing=(lo, hi))
    with emulator(flags, workdir=work) as emu:
        settings = Settings(
            base_url=emu.base_url, api_key=API_KEY, output=out, concurrency=ns.concurrency,
            rate_limit=engine_rate, burst=ns.engine_burst or ns.burst, poll_min=ns.poll_min,
            poll_max=ns.poll_max,
            max_outstanding=max(2000, ns.concurrency), progress=False, seed=1,
            log_level="warning", adaptive_window=window == "adaptive",
        )
        wall, result, (timeline, lags) = asyncio.run(run_engine(settings, manifest))
        est = emu.stats()
    outs = read_output(out)
    calls = est["submissions"] + est["polls"]
    l_mean, l_max = (lo + hi) / 2, hi
    ideal_mean = 2 * n / rate + l_mean
    ideal_max = 2 * n / rate + l_max
    return {
        "folders": n, "window": window, "window_end": result.summary.to_json().get("window"),
        "rate_limit": rate, "engine_rate": engine_rate,
        "processing_time": [lo, hi], "concurrency": ns.concurrency, "burst": ns.burst,
        "engine_burst": ns.engine_burst or ns.burst,
        "poll_min": ns.poll_min, "poll_max": ns.poll_max, "exit_code": result.exit_code,
        "completed": outs.completed, "failed": outs.failed,
        "wall_s": round(wall, 3), "ideal_s_mean_L": round(ideal_mean, 3),
        "ideal_s_max_L": round(ideal_max, 3),
        "ratio_mean_L": round(wall / ideal_mean, 4), "ratio_max_L": round(wall / ideal_max, 4),
        "polls_per_folder": round(outs.polls_per_folder, 4),
        "calls_per_folder": round(calls / n, 4),
        "emulator_calls": calls, "emulator_429": est["rate_limited"],
        "share_429": round(est["rate_limited"] / calls, 5) if calls else None,
        "client_429": result.summary.extra.get("throttled_429"),
        "final_rate_limit": result.summary.extra.get("final_rate_limit"),
        "latency_p50_s": round(outs.latency(0.50), 3),
        "latency_p99_s": round(outs.latency(0.99), 3),
        "achieved_calls_per_s": round(calls / wall, 2),
        "loop_lag_ms_p50_p99_max": [round(1000 * percentile(lags, 0.5), 2),
                                    round(1000 * percentile(lags, 0.99), 2),
                                    round(1000 * max(lags, default=float("nan")), 1)],
        "seconds_below_rate": round(0.25 * sum(1 for t in timeline if t[1] < engine_rate * 0.99),
                                    2),
        "timeline_t_rate_calls_429": timeline,
    }


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    lo, hi = (float(x) for x in ns.processing_time.split(":"))
    ns.poll_min = ns.poll_min if ns.poll_min is not None else max(0.05, lo)
    ns.poll_max = ns.poll_max if ns.poll_max is not None else max(ns.poll_min, hi)
    configure_logging(level="warning", fmt="console")
    mach = print_machine()
    print(f"emulator: --rate-limit {ns.rate_limit:g} --burst {ns.burst} --processing-time "
          f"{ns.processing_time} (no parallel-analysis cap); engine: --rate-limit "
          f"{(ns.engine_rate or ns.rate_limit):g} --burst {ns.engine_burst or ns.burst} "
          f"--concurrency "
          f"{ns.concurrency} --poll-min {ns.poll_min:g} --poll-max {ns.poll_max:g}")
    print("ideal = 2N/R + L, L = mean processing time (also shown with L = max)\n")
    runs = []
    with workdir(ns.workdir, "bench-ideal-") as work:
        for n in ns.folders:
            for window in ns.windows:
                r = one_run(ns, n, work, window)
                runs.append(r)
                print(f"N={n} ({window} window): wall {r['wall_s']:.1f} s, ideal "
                      f"{r['ideal_s_mean_L']:.1f} s, ratio {r['ratio_mean_L']:.3f}", flush=True)
    print()
    print(md_table(
        ["N", "window", "wall s", "ideal s (L=mean)", "wall/ideal", "wall/ideal (L=max)",
         "polls/folder", "calls/folder", "429 share", "p50 latency s", "p99 latency s",
         "loop lag p99 ms", "completed"],
        [[r["folders"], r["window"], r["wall_s"], r["ideal_s_mean_L"], r["ratio_mean_L"],
          r["ratio_max_L"],
          r["polls_per_folder"], r["calls_per_folder"], f"{100 * (r['share_429'] or 0):.2f} %",
          r["latency_p50_s"], r["latency_p99_s"], r["loop_lag_ms_p50_p99_max"][1],
          f"{r['completed']}/{r['folders']}"]
         for r in runs]))
    ok = True
    for r in runs:
        met = r["ratio_mean_L"] <= ns.target
        ok &= met and r["completed"] == r["folders"]
        print(f"N={r['folders']} ({r['window']} window): wall/ideal {r['ratio_mean_L']:.3f} "
              f"{'<=' if met else '>'} target {ns.target:.2f} -> {'met' if met else 'MISSED'}")
    save_json(ns.json, {"machine": mach, "argv": sys.argv, "runs": runs})
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
