"""``--rate-limit auto`` against keys limited to R calls/s (issue 12: the self-tuning rate).

For each R (default 5, 25 and 80 calls/s), a fresh emulator in its own process limits the key
to R calls/s with a bucket of ``--burst`` (429 + ``Retry-After`` beyond), with no cap on
parallel analyses and short analyses (0.3-1.5 s), so that the rate is what binds. The engine
runs twice in this process on the same N folders (N = R x ``--seconds`` / 2, about that many
seconds of work): **hand** with ``--rate-limit R`` (a user who knows the key's limit), **auto**
with the rate found by ``RateController``.

    python benchmarks/bench_autorate.py                    # R = 5, 25, 80; ~60 s per run
    python benchmarks/bench_autorate.py --rates 25 --seconds 30

Figures per R: wall time of each run, **efficiency** = hand wall ÷ auto wall (1 = as fast as
knowing the limit), the **429 share** of the auto run's calls (counted by the emulator), where
the auto rate ended and what it estimated, polls per folder. Targets: efficiency >= 0.9 and
429s <= 2 % of calls for every R. Exit 0 when met, 3 if not.

The auto run is the engine with ``--rate-limit auto`` (``AUTO_SETTINGS``, the default).
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
    manifest_folders,
    md_table,
    print_machine,
    read_output,
    reuse_manifest,
    sample_archive,
    save_json,
    workdir,
)

from bulk_engine.config import Settings
from bulk_engine.engine import Engine
from bulk_engine.logs import configure_logging

# The auto arm: --rate-limit auto (Settings.rate_limit None), the engine's default.
AUTO_SETTINGS: dict[str, Any] = {"rate_limit": None}  # None: auto


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", type=float, nargs="+", default=[5.0, 25.0, 80.0],
                   help="the keys' limits R, calls/s (default: 5 25 80)")
    p.add_argument("--seconds", type=float, default=60.0,
                   help="work per run at R: N = R x seconds / 2 folders (default 60)")
    p.add_argument("--folders", type=int, default=None, help="N for every R (overrides)")
    p.add_argument("--burst", type=int, default=10, help="the emulator's bucket (10)")
    p.add_argument("--processing-time", default="0.3:1.5", metavar="MIN:MAX")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--target-efficiency", type=float, default=0.9)
    p.add_argument("--target-429-share", type=float, default=0.02)
    p.add_argument("--workdir", help="keep archives and outputs here (default: a temp dir)")
    p.add_argument("--json", help="also write the figures as JSON to this path")
    return p.parse_args(argv)


def auto_engine(settings: Settings, manifest: Path) -> Engine:
    """An engine whose rate is found, not given (``AUTO_SETTINGS``)."""
    return Engine(settings.replace(**AUTO_SETTINGS), manifest)


async def run_engine(engine: Engine) -> tuple[float, Any, list[Any]]:
    """Run the engine; sample its limiter's rate every 0.5 s."""
    timeline: list[Any] = []

    async def sample() -> None:
        while True:
            timeline.append((round(time.perf_counter() - t0, 1),
                             round(engine.limiter.current_rate, 2)))
            await asyncio.sleep(0.5)

    t0 = time.perf_counter()
    sampler = asyncio.create_task(sample())
    try:
        result = await engine.run()
    finally:
        sampler.cancel()
    return time.perf_counter() - t0, result, timeline


def one_rate(ns: argparse.Namespace, rate: float, work: Path, archive: Path) -> dict[str, Any]:
    lo, hi = (float(x) for x in ns.processing_time.split(":"))
    n = ns.folders or max(10, int(rate * ns.seconds / 2))
    folders = [f for _, f in manifest_folders(archive)]
    manifest = reuse_manifest(work / f"manifest-{rate:g}.csv", folders, n)
    flags = emulator_flags(rate_limit=rate, burst=ns.burst, processing=(lo, hi))
    runs: dict[str, Any] = {}
    for arm in ("hand", "auto"):
        out = work / f"rate-{rate:g}-{arm}.jsonl"
        for stale in (out, Path(f"{out}.journal")):
            stale.unlink(missing_ok=True)
        with emulator(flags, workdir=work) as emu:
            settings = Settings(
                base_url=emu.base_url, api_key=API_KEY, output=out, rate_limit=rate,
                burst=ns.burst, concurrency=ns.concurrency, poll_min=max(0.05, lo),
                poll_max=max(0.05, lo, hi),
                progress=False, seed=1, log_level="warning",
            )
            engine = Engine(settings, manifest) if arm == "hand" else auto_engine(settings,
                                                                               manifest)
            wall, result, timeline = asyncio.run(run_engine(engine))
            est = emu.stats()
            stats = engine.limiter.statistics()
        outs = read_output(out)
        calls = est["submissions"] + est["polls"]
        runs[arm] = {
            "wall_s": round(wall, 2), "exit_code": result.exit_code,
            "completed": outs.completed, "polls_per_folder": round(outs.polls_per_folder, 3),
            "calls": calls, "emulator_429": est["rate_limited"],
            "share_429": round(est["rate_limited"] / calls, 5) if calls else 0.0,
            "final_rate": round(stats.rate, 2), "phase": stats.phase,
            "limit_estimate": None if stats.limit_estimate is None
            else round(stats.limit_estimate, 2),
            "timeline_t_rate": timeline,
        }
        print(f"R={rate:g} {arm}: {n} folders in {wall:.1f} s, "
              f"{est['rate_limited']} x 429 of {calls} calls", flush=True)
    hand, auto = runs["hand"], runs["auto"]
    return {"rate": rate, "folders": n, "burst": ns.burst, "hand": hand, "auto": auto,
            "efficiency": round(hand["wall_s"] / auto["wall_s"], 4)}


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    configure_logging(level="warning", fmt="console")
    mach = print_machine()
    print(f"emulator: --rate-limit R --burst {ns.burst} --processing-time {ns.processing_time} "
          f"(no parallel-analysis cap); engine: hand --rate-limit R, auto "
          f"--rate-limit auto; --concurrency "
          f"{ns.concurrency}\n")
    results = []
    with workdir(ns.workdir, "bench-autorate-") as work:
        archive = sample_archive(work / "archive-50", 50)
        for rate in ns.rates:
            results.append(one_rate(ns, rate, work, archive))
    print()
    print(md_table(
        ["R calls/s", "N", "hand wall s", "auto wall s", "efficiency", "auto 429 share",
         "auto final rate", "auto estimate", "polls/folder hand / auto", "completed"],
        [[r["rate"], r["folders"], r["hand"]["wall_s"], r["auto"]["wall_s"], r["efficiency"],
          f"{100 * r['auto']['share_429']:.2f} %", r["auto"]["final_rate"],
          r["auto"]["limit_estimate"],
          f"{r['hand']['polls_per_folder']:.2f} / {r['auto']['polls_per_folder']:.2f}",
          f"{r['auto']['completed']}/{r['folders']}"] for r in results]))
    ok = True
    for r in results:
        eff = r["efficiency"] >= ns.target_efficiency
        share = r["auto"]["share_429"] <= ns.target_429_share
        done = r["auto"]["completed"] == r["folders"] == r["hand"]["completed"]
        ok &= eff and share and done
        print(f"R={r['rate']:g}: efficiency {r['efficiency']:.3f} "
              f"({'met' if eff else 'MISSED'}), 429s {100 * r['auto']['share_429']:.2f} % "
              f"({'met' if share else 'MISSED'})")
    save_json(ns.json, {"machine": mach, "argv": sys.argv, "runs": results})
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
