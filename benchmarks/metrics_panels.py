"""Draw the Grafana dashboard's panels from real scrapes of a run against the emulator.

The picture in the README (``docs/metrics-panels.png``) comes from here: the emulator in its own
process (processing 1-4 s, a 30 calls/s limit with 429s, 3 % of folders failing), the engine in
this process with ``serve_admin`` beside it (what ``--metrics-port`` starts), ``/metrics``
scraped over HTTP every ``--scrape-interval`` s and parsed with prometheus_client's parser. On
the way, the run is steered as an operator would: the rate lowered live (``apply_settings``, as
SIGHUP or ``POST /control/settings`` do), a pause and a resume, then a drain. Each panel is
computed from the scrapes as the dashboard's PromQL computes it (rates over a window,
``histogram_quantile`` over bucket increases).

    pip install -e '.[plot]'
    python benchmarks/metrics_panels.py                 # ~2 min, writes docs/metrics-panels.png
    python benchmarks/metrics_panels.py --folders 100 --out /tmp/p.png
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import math
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import anyio
from common import API_KEY, emulator, print_machine, sample_archive, save_json, workdir
from prometheus_client.parser import text_string_to_metric_families

from bulk_engine.admin import serve_admin
from bulk_engine.config import Settings
from bulk_engine.engine import Engine
from bulk_engine.logs import configure_logging

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folders", type=int, default=900, help="manifest rows (900)")
    p.add_argument("--scrape-interval", type=float, default=0.5, help="seconds (0.5)")
    p.add_argument("--window", type=float, default=5.0,
                   help="seconds of the rate() / histogram_quantile() window (5)")
    p.add_argument("--out", default="docs/metrics-panels.png", help="the PNG to write")
    p.add_argument("--workdir", help="keep archives and outputs here (default: a temp dir)")
    p.add_argument("--json", help="also write the scrapes as JSON to this path")
    return p.parse_args(argv)


async def scrape(http: aiohttp.ClientSession, url: str) -> Series:
    async with http.get(url) as resp:
        text = await resp.text()
    out: Series = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = float(s.value)
    return out


async def steered_run(settings: Settings, manifest: Path, n: int, every: float
                      ) -> tuple[list[tuple[float, Series]], list[tuple[float, str]], Any]:
    """The run, scraped; steered at fixed shares of the rows done."""
    engine = Engine(settings, manifest)
    scrapes: list[tuple[float, Series]] = []
    events: list[tuple[float, str]] = []
    t0 = time.monotonic()
    results: list[Any] = []

    def done() -> int:
        return engine.statistics().finisher.done

    async def steer() -> None:
        async def at(share: float) -> None:
            while done() < share * n and not results:
                await asyncio.sleep(0.05)

        await at(0.25)
        engine.apply_settings({"rate_limit": 12.0}, source="metrics_panels")
        events.append((time.monotonic() - t0, "rate 30 → 12"))
        await at(0.45)
        engine.pause()
        events.append((time.monotonic() - t0, "pause"))
        await asyncio.sleep(8)
        engine.resume()
        events.append((time.monotonic() - t0, "resume"))
        await at(0.8)
        engine.drain()
        events.append((time.monotonic() - t0, "drain"))

    async with anyio.create_task_group() as tg:
        server = await tg.start(partial(serve_admin, engine, rows_total=lambda: n))

        async def scraper() -> None:
            async with aiohttp.ClientSession() as http:
                while True:
                    scrapes.append((time.monotonic() - t0, await scrape(http, server.url
                                                                        + "/metrics")))
                    await asyncio.sleep(every)

        tg.start_soon(scraper)
        tg.start_soon(steer)
        results.append(await engine.run())
        await asyncio.sleep(2 * every)  # the scrapes after the end
        tg.cancel_scope.cancel()
    return scrapes, events, results[0]


# ---- PromQL, on the scrapes -----------------------------------------------------------------


def series(scrapes: list[tuple[float, Series]], name: str,
           **labels: str) -> list[tuple[float, float]]:
    """The sum over the samples named ``name`` whose labels include ``labels``, per scrape."""
    out = []
    for t, s in scrapes:
        vals = [v for (n, lbl), v in s.items()
                if n == name and all(dict(lbl).get(k) == x for k, x in labels.items())]
        if vals:
            out.append((t, sum(vals)))
    return out


def label_values(scrapes: list[tuple[float, Series]], name: str, label: str) -> list[str]:
    return sorted({dict(lbl)[label] for _, s in scrapes for (n, lbl) in s if n == name})


def rate(points: list[tuple[float, float]], window: float) -> list[tuple[float, float]]:
    """Per-second increase over the last ``window`` seconds (Prometheus' rate, simplified)."""
    out = []
    times = [t for t, _ in points]
    for i, (t, v) in enumerate(points):
        j = bisect.bisect_left(times, t - window)
        if j < i and t > points[j][0]:
            out.append((t, max(0.0, v - points[j][1]) / (t - points[j][0])))
    return out


def quantile(scrapes: list[tuple[float, Series]], name: str, q: float,
             window: float) -> list[tuple[float, float]]:
    """histogram_quantile(q, increase(name_bucket[window])), per scrape."""
    bucket = name + "_bucket"

    def buckets(s: Series) -> list[tuple[float, float]]:
        return sorted((float(dict(lbl)["le"]), v) for (n, lbl), v in s.items() if n == bucket)

    out = []
    times = [t for t, _ in scrapes]
    for i, (t, s) in enumerate(scrapes):
        j = bisect.bisect_left(times, t - window)
        if j >= i:
            continue
        now, then = buckets(s), dict(buckets(scrapes[j][1]))
        inc = [(le, v - then.get(le, 0.0)) for le, v in now]
        total = inc[-1][1] if inc else 0.0
        if total <= 0:
            continue
        rank, prev_le, prev_c = q * total, 0.0, 0.0
        for le, c in inc:
            if c >= rank:
                if math.isinf(le):
                    out.append((t, prev_le))
                else:
                    out.append((t, prev_le + (le - prev_le) * (rank - prev_c) / max(c - prev_c,
                                                                                     1e-9)))
                break
            prev_le, prev_c = le, c
    return out


# ---- drawing --------------------------------------------------------------------------------


def draw(scrapes: list[tuple[float, Series]], events: list[tuple[float, str]], window: float,
         out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(16, 11), constrained_layout=True)
    fig.suptitle("bulk_engine dashboard panels: one run against the emulator, scraped from "
                 "/metrics every "
                 f"{scrapes[1][0] - scrapes[0][0]:.1f} s (rates over {window:g} s)", fontsize=13)

    def panel(ax: Any, title: str, lines: list[tuple[str, list[tuple[float, float]]]],
              unit: str = "") -> None:
        for label, pts in lines:
            if pts:
                ax.plot([t for t, _ in pts], [v for _, v in pts], label=label, linewidth=1.3)
        for t, what in events:
            ax.axvline(t, color="grey", linestyle=":", linewidth=1)
            ax.text(t, 1.0, f" {what}", transform=ax.get_xaxis_transform(), fontsize=7,
                    color="dimgrey", va="top", rotation=90)
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_xlabel("seconds", fontsize=8)
        if unit:
            ax.set_ylabel(unit, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if lines:
            ax.legend(fontsize=7, loc="upper left")

    s = scrapes
    panel(axes[0][0], "Progress", [("bulk_engine_progress_ratio",
                                    series(s, "bulk_engine_progress_ratio"))], "share done")
    panel(axes[0][1], "Rows finished per second, by status", [
        (st, rate(series(s, "bulk_engine_rows_total", status=st), window))
        for st in label_values(s, "bulk_engine_rows_total", "status")], "rows/s")
    calls = [(f"{e} {c}", rate(series(s, "bulk_engine_api_calls_total", endpoint=e, code=c),
                               window))
             for e in ("submit", "retrieve")
             for c in label_values(s, "bulk_engine_api_calls_total", "code")
             if series(s, "bulk_engine_api_calls_total", endpoint=e, code=c)]
    panel(axes[0][2], "API calls per second, by endpoint and status", calls, "calls/s")
    panel(axes[1][0], "Rate limit: ceiling, limiter now, calls made", [
        ("ceiling", series(s, "bulk_engine_rate_limit_configured_calls_per_second")),
        ("limiter now", series(s, "bulk_engine_rate_limit_current_calls_per_second")),
        ("calls made", rate(series(s, "bulk_engine_api_calls_total"), window))], "calls/s")
    panel(axes[1][1], "429s and retries per second", [
        ("429s", rate(series(s, "bulk_engine_api_throttled_total"), window)),
        ("retries", rate(series(s, "bulk_engine_api_retries_total"), window))], "per s")
    panel(axes[1][2], "Outstanding folders and uploads in flight", [
        ("outstanding", series(s, "bulk_engine_outstanding_folders")),
        ("outstanding limit", series(s, "bulk_engine_outstanding_limit")),
        ("uploads in flight", series(s, "bulk_engine_uploads_in_flight")),
        ("upload slots", series(s, "bulk_engine_upload_slots"))], "folders")
    panel(axes[2][0], "Row latency (submission to final answer)", [
        (f"p{round(q * 100)}", quantile(s, "bulk_engine_row_latency_seconds", q, window))
        for q in (0.5, 0.95, 0.99)], "seconds")
    panel(axes[2][1], "Failed rows by error kind (cumulative)", [
        (k, series(s, "bulk_engine_rows_total", status="failed", error_kind=k))
        for k in label_values(s, "bulk_engine_rows_total", "error_kind") if k], "rows")
    panel(axes[2][2], "Oldest outstanding token and poll lateness", [
        ("oldest token age", series(s, "bulk_engine_oldest_outstanding_age_seconds")),
        ("poll lateness", series(s, "bulk_engine_poll_lateness_seconds"))], "seconds")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    configure_logging(level="warning", fmt="console")
    print_machine()
    flags = ["--processing-time", "1:4", "--rate-limit", "30", "--burst", "10",
             "--fail-rate", "0.03", "--max-parallel-analyses", "60", "--seed", "3"]
    print("emulator: " + " ".join(flags))
    with workdir(ns.workdir, "metrics-panels-") as work:
        manifest = sample_archive(work / "archive", ns.folders)
        out = work / "out.jsonl"
        for stale in (out, Path(f"{out}.journal")):
            stale.unlink(missing_ok=True)
        with emulator(flags, workdir=work) as emu:
            settings = Settings(
                base_url=emu.base_url, api_key=API_KEY, output=out, concurrency=8,
                rate_limit=30.0, burst=10, poll_min=0.5, poll_max=3.0, max_outstanding=80,
                max_failure_rate=1.0, progress=False, seed=1, log_level="warning")
            print("engine: --rate-limit 30 --burst 10 --concurrency 8 --poll-min 0.5 "
                  "--poll-max 3 --max-outstanding 80, then: rate 12 at 25 % of rows, a pause "
                  "of 8 s at 45 %, a drain at 80 %")
            scrapes, events, result = asyncio.run(
                steered_run(settings, manifest, ns.folders, ns.scrape_interval))
    summary = result.summary.to_json()
    print(f"exit code {result.exit_code}; {summary['rows']} rows; {len(scrapes)} scrapes; "
          f"events: {', '.join(f'{w} at {t:.0f} s' for t, w in events)}")
    draw(scrapes, events, ns.window, Path(ns.out))
    save_json(ns.json, {"events": events, "summary": summary, "scrapes": [
        {"t": t, "samples": {f"{n}{dict(lbl) or ''}": v for (n, lbl), v in s.items()}}
        for t, s in scrapes]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
