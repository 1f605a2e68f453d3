"""What the engine itself costs: CPU per folder and event-loop lag (issue 7 item 3).

The emulator (its own process) answers as fast as it can: processing 0 s, no rate limit, no cap
on parallel analyses. The engine runs in this process with its limiter effectively off (rate
1e6/s, burst 1e6) and short polls, so the run is bound by the two processes' CPU, not by waiting.
Measured over ``Engine.run()``:

- CPU ms per folder: ``time.process_time()`` of this process (every thread: the event loop, the
  file-reading worker threads, SQLite) ÷ N. Target ≤ 1.5 ms. Split into the event-loop thread
  (``time.thread_time()``) and the worker threads (the rest).
- event-loop lag: a ticker task sleeps 10 ms in a loop and records how late it wakes; p50, p99 and
  max of that oversleep. It shows how long the loop is blocked by any one step. The same ticker
  runs alone for ``--control-seconds`` first: that control is the machine's own scheduling noise.

    python benchmarks/bench_client_cost.py                       # N = 2000
    python benchmarks/bench_client_cost.py --folders 200 --pyinstrument   # with a profile
    python benchmarks/bench_client_cost.py --metrics             # with and without metrics

``--metrics`` measures what ``--metrics-port`` costs: the same run without the admin server and
with it (served on the run's loop, scraped every ``--scrape-interval`` s by a separate process,
so the scraper's own CPU is not counted), ``--repeat`` times each, alternating, side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from common import (
    API_KEY,
    emulator,
    emulator_flags,
    machine,
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

TICK = 0.010


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folders", type=int, default=2000, help="N (default 2000)")
    p.add_argument("--concurrency", type=int, default=16, help="engine --concurrency (16)")
    p.add_argument("--poll-min", type=float, default=0.05, help="engine --poll-min (0.05)")
    p.add_argument("--poll-max", type=float, default=0.5, help="engine --poll-max (0.5)")
    p.add_argument("--target-ms", type=float, default=1.5, help="target CPU ms/folder (1.5)")
    p.add_argument("--control-seconds", type=float, default=2.0,
                   help="seconds of loop-lag measurement with the loop idle, before the run (2)")
    p.add_argument("--uvloop", action="store_true",
                   help="run the engine on uvloop's event loop (pip install uvloop)")
    p.add_argument("--pyinstrument", action="store_true",
                   help="profile the run with pyinstrument and print the tree")
    p.add_argument("--workdir", help="keep archives and outputs here (default: a temp dir)")
    p.add_argument("--json", help="also write the figures as JSON to this path")
    p.add_argument("--metrics", action="store_true",
                   help="compare runs without and with the metrics server (--metrics-port)")
    p.add_argument("--scrape-interval", type=float, default=1.0,
                   help="--metrics: seconds between scrapes of /metrics (1; Prometheus: 15)")
    p.add_argument("--repeat", type=int, default=3,
                   help="--metrics: runs of each variant, alternating (3)")
    return p.parse_args(argv)


# A scraper in its own process: its CPU is not the engine's.
_SCRAPER = """
import sys, time, urllib.request
url, every = sys.argv[1], float(sys.argv[2])
n = 0
while True:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            resp.read()
        n += 1
        print(n, flush=True)
    except OSError:
        pass
    time.sleep(every)
"""


async def measure(settings: Settings, manifest: Path, control_s: float,
                  scrape_interval: float | None = None) -> dict[str, Any]:
    """One ``Engine.run()`` with CPU and loop-lag figures; with ``scrape_interval``, the admin
    server runs beside it (as ``--metrics-port`` does) and a child process scrapes it."""
    lags: list[float] = []

    async def ticker() -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(TICK)
            lags.append(time.perf_counter() - t - TICK)

    # Control: the same ticker with nothing else on the loop shows the machine's own
    # scheduling noise (other processes), to tell it apart from the engine blocking the loop.
    tick = asyncio.create_task(ticker())
    await asyncio.sleep(control_s)
    control = list(lags)
    lags.clear()
    engine = Engine(settings, manifest)
    scraper: subprocess.Popen[str] | None = None
    scrapes = 0
    async with anyio.create_task_group() as tg:
        if scrape_interval is not None:
            from bulk_engine.admin import serve_admin

            server = await tg.start(partial(serve_admin, engine))
            scraper = subprocess.Popen(  # noqa: ASYNC220 - returns at once; lives for the run
                [sys.executable, "-c", _SCRAPER, server.url + "/metrics", str(scrape_interval)],
                stdout=subprocess.PIPE, text=True)
            assert scraper.stdout is not None
            # The first scrape before the run starts: the scraper is up (and the run measured
            # is a scraped one however short it is).
            scrapes = int(bool(await anyio.to_thread.run_sync(scraper.stdout.readline)))
        cpu0, loop0, t0 = time.process_time(), time.thread_time(), time.perf_counter()
        try:
            result = await engine.run()
        finally:
            wall = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
            loop_cpu = time.thread_time() - loop0  # this thread runs the event loop
            tick.cancel()
            if scraper is not None:
                scraper.terminate()
                out, _ = scraper.communicate(timeout=10)
                scrapes += len(out.split())
            tg.cancel_scope.cancel()
    scrape_ms = None
    if scrape_interval is not None:
        # One scrape's own cost, on the loop thread: render the exposition 50 times.
        from bulk_engine.metrics import EngineCollector, render

        collector = EngineCollector(engine, rows_total=lambda: None)
        c0 = time.thread_time()
        for _ in range(50):
            render(collector)
        scrape_ms = 1000 * (time.thread_time() - c0) / 50
    return {"wall": wall, "cpu": cpu, "loop_cpu": loop_cpu, "lags": lags, "control": control,
            "result": result, "scrapes": scrapes, "scrape_ms": scrape_ms}


def compare_metrics(ns: argparse.Namespace, emu_flags: list[str], manifest: Path,
                    work: Path) -> int:
    """``--metrics``: the same run without and with the metrics server, alternating."""
    n = ns.folders
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    with emulator(emu_flags, workdir=work) as emu:
        for i in range(ns.repeat):
            for variant in ("off", "on"):
                out = work / f"cost-{variant}-{i}.jsonl"
                for stale in (out, Path(f"{out}.journal")):
                    stale.unlink(missing_ok=True)
                settings = Settings(
                    base_url=emu.base_url, api_key=API_KEY, output=out,
                    concurrency=ns.concurrency, rate_limit=1e6, burst=1_000_000,
                    poll_min=ns.poll_min, poll_max=ns.poll_max, progress=False, seed=1,
                    log_level="warning")
                m = asyncio.run(measure(settings, manifest, 0.0,
                                        ns.scrape_interval if variant == "on" else None))
                done = read_output(out).completed
                runs[variant].append({
                    "cpu_ms_per_folder": 1000 * m["cpu"] / n,
                    "loop_thread_cpu_ms_per_folder": 1000 * m["loop_cpu"] / n,
                    "wall_s": m["wall"], "scrapes": m["scrapes"], "completed": done,
                    "render_ms_per_scrape": m["scrape_ms"]})
                print(f"  run {i + 1}/{ns.repeat} metrics {variant:>3}: "
                      f"{runs[variant][-1]['cpu_ms_per_folder']:.3f} CPU ms/folder, "
                      f"{m['wall']:.2f} s, {m['scrapes']} scrapes, {done}/{n} completed",
                      flush=True)

    def med(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[variant])

    rows = []
    for variant, label in (("off", "without --metrics-port"),
                           ("on", f"with it, scraped every {ns.scrape_interval:g} s")):
        rows.append([label, n, round(med(variant, "cpu_ms_per_folder"), 3),
                     " / ".join(f"{r['cpu_ms_per_folder']:.3f}" for r in runs[variant]),
                     round(med(variant, "loop_thread_cpu_ms_per_folder"), 3),
                     round(med(variant, "wall_s"), 2),
                     sum(r["scrapes"] for r in runs[variant])])
    print()
    print(md_table(["engine", "N", "CPU ms/folder (median)", "each run", "loop thread ms/folder",
                    "wall s (median)", "scrapes"], rows))
    delta = med("on", "cpu_ms_per_folder") - med("off", "cpu_ms_per_folder")
    render_ms = statistics.median(r["render_ms_per_scrape"] for r in runs["on"])
    print(f"metrics cost: {delta:+.3f} CPU ms/folder (median of {ns.repeat} runs each; the "
          "spread between runs of one variant is the machine's noise)")
    print(f"one scrape: {render_ms:.2f} CPU ms to render the exposition after a run of {n} "
          f"folders; at Prometheus' 15 s interval that is {render_ms / 15:.3f} ms per second "
          "of run")
    save_json(ns.json, {"machine": machine(), "argv": sys.argv, "emulator_flags": emu_flags,
                        "scrape_interval_s": ns.scrape_interval, "runs": runs,
                        "render_ms_per_scrape": round(render_ms, 3),
                        "delta_cpu_ms_per_folder": round(delta, 4)})
    ok = all(r["completed"] == n for rs in runs.values() for r in rs)
    return 0 if ok else 3


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    configure_logging(level="warning", fmt="console")
    mach = print_machine()
    n = ns.folders
    flags = emulator_flags(rate_limit=None, processing=(0.0, 0.0))
    print("emulator: " + " ".join(flags))
    where = "in this process, on uvloop" if ns.uvloop else "in this process"
    print(f"engine ({where}): --rate-limit 1e6 --burst 1000000 --concurrency "
          f"{ns.concurrency} --poll-min {ns.poll_min:g} --poll-max {ns.poll_max:g}")
    with workdir(ns.workdir, "bench-cost-") as work:
        manifest = sample_archive(work / f"archive-{n}", n)
        if ns.metrics:
            return compare_metrics(ns, flags, manifest, work)
        out = work / "cost.jsonl"
        for stale in (out, Path(f"{out}.journal")):
            stale.unlink(missing_ok=True)
        with emulator(flags, workdir=work) as emu:
            settings = Settings(
                base_url=emu.base_url, api_key=API_KEY, output=out, concurrency=ns.concurrency,
                rate_limit=1e6, burst=1_000_000, poll_min=ns.poll_min, poll_max=ns.poll_max,
                progress=False, seed=1, log_level="warning",
            )
            emu_cpu0 = emu.cpu_seconds()
            profiler = None
            if ns.pyinstrument:
                from pyinstrument import Profiler

                profiler = Profiler(async_mode="disabled")
                profiler.start()
            coro = measure(settings, manifest, ns.control_seconds)
            if ns.uvloop:
                import uvloop

                m = uvloop.run(coro)
            else:
                m = asyncio.run(coro)
            if profiler is not None:
                profiler.stop()
            emu_cpu = emu.cpu_seconds() - emu_cpu0
            est = emu.stats()
        outs = read_output(out)
    lags, control = m["lags"], m["control"]
    cpu_ms = 1000 * m["cpu"] / n
    res = {
        "folders": n, "completed": outs.completed, "wall_s": round(m["wall"], 3),
        "folders_per_s": round(n / m["wall"], 1),
        "cpu_s": round(m["cpu"], 3), "cpu_ms_per_folder": round(cpu_ms, 3),
        "loop_thread_cpu_ms_per_folder": round(1000 * m["loop_cpu"] / n, 3),
        "other_threads_cpu_ms_per_folder": round(1000 * (m["cpu"] - m["loop_cpu"]) / n, 3),
        "emulator_cpu_ms_per_folder": round(1000 * emu_cpu / n, 3),
        "polls_per_folder": round(outs.polls_per_folder, 3),
        "api_calls": est["submissions"] + est["polls"],
        "loop_lag_ms": {"p50": round(1000 * percentile(lags, 0.5), 3),
                        "p99": round(1000 * percentile(lags, 0.99), 3),
                        "max": round(1000 * max(lags, default=float("nan")), 3),
                        "ticks": len(lags)},
        "idle_loop_lag_ms": {"p50": round(1000 * percentile(control, 0.5), 3),
                             "p99": round(1000 * percentile(control, 0.99), 3),
                             "max": round(1000 * max(control, default=float("nan")), 3)},
        "target_ms": ns.target_ms, "event_loop": "uvloop" if ns.uvloop else "asyncio",
    }
    print()
    print(md_table(
        ["N", "wall s", "folders/s", "engine CPU ms/folder", "of which loop thread",
         "worker threads", "emulator CPU ms/folder",
         "polls/folder", "loop lag p50 / p99 / max ms", "idle-loop control", "completed"],
        [[n, res["wall_s"], res["folders_per_s"], res["cpu_ms_per_folder"],
          res["loop_thread_cpu_ms_per_folder"], res["other_threads_cpu_ms_per_folder"],
          res["emulator_cpu_ms_per_folder"], res["polls_per_folder"],
          "{p50:.2f} / {p99:.1f} / {max:.0f}".format(**res["loop_lag_ms"]),
          "{p50:.2f} / {p99:.1f} / {max:.0f}".format(**res["idle_loop_lag_ms"]),
          f"{outs.completed}/{n}"]]))
    met = cpu_ms <= ns.target_ms
    print(f"CPU {cpu_ms:.2f} ms/folder {'<=' if met else '>'} target {ns.target_ms} ms -> "
          f"{'met' if met else 'MISSED'}")
    if profiler is not None:
        print(profiler.output_text(unicode=True, color=False, show_all=False))
    save_json(ns.json, {"machine": mach, "argv": sys.argv, "emulator_flags": flags, **res})
    return 0 if met and outs.completed == n else 3


if __name__ == "__main__":
    sys.exit(main())
