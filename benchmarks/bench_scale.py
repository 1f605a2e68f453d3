"""Memory at scale: peak RSS against manifest length and against file size (issue 7 item 4).

1. Manifest length. The engine runs as a subprocess (``python -m bulk_engine``) on manifests of
   20,000 and 200,000 rows; the rows have unique ids but cycle over a few sample folders, so the
   disk stays small. Peak RSS is the child's ``ru_maxrss`` (from ``os.wait4``); RSS is also
   sampled every 50 ms to show it is flat over the run. Target: ratio 200k/20k ≤ 1.10 and peak
   under 150 MB. To keep 200k rows practical the emulator is made fast (processing 0 s, no rate
   limit) and the engine's limiter is effectively off (``--rate-limit 100000``): this measures
   the engine's memory, not the API's pace.
2. File size. One folder holding one 1 GiB file (sparse: ``truncate``, so all zeros, no disk
   used) is uploaded; RSS growth = peak RSS of that run − peak RSS of the same run with a 1 KiB
   file. Target ≤ 20 MB. The emulator's ``--max-upload-bytes`` and the engine's
   ``--max-file-size`` are raised to 2 GiB.

    python benchmarks/bench_scale.py                               # 20k, 200k rows, 1 GiB file
    python benchmarks/bench_scale.py --rows 2000 20000 --file-mib 128    # a quick look
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    emulator,
    emulator_flags,
    engine_cmd,
    engine_env,
    md_table,
    print_machine,
    read_output,
    reuse_manifest,
    rss_mib,
    run_child,
    sample_archive,
    save_json,
    workdir,
)

GIB = 1 << 30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000],
                   help="manifest lengths, one run each; the ratio is last/first (20000 200000)")
    p.add_argument("--distinct-folders", type=int, default=50,
                   help="sample folders the rows cycle over (50)")
    p.add_argument("--concurrency", type=int, default=16, help="engine --concurrency (16)")
    p.add_argument("--file-mib", type=int, default=1024,
                   help="size of the single large file, MiB (1024 = 1 GiB; 0 skips part 2)")
    p.add_argument("--max-rss-mib", type=float, default=150.0, help="peak RSS target (150)")
    p.add_argument("--max-ratio", type=float, default=1.10, help="RSS ratio target (1.10)")
    p.add_argument("--max-growth-mib", type=float, default=20.0,
                   help="RSS growth target for the large file (20)")
    p.add_argument("--workdir", help="keep archives and outputs here (default: a temp dir)")
    p.add_argument("--json", help="also write the figures as JSON to this path")
    return p.parse_args(argv)


class RssSampler:
    """Called by ``run_child`` every 50 ms: keeps (elapsed s, RSS MiB) samples."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.samples: list[tuple[float, float]] = []

    def __call__(self, pid: int) -> None:
        self.samples.append((time.perf_counter() - self.t0, rss_mib(pid)))

    def at_fraction(self, q: float) -> float:
        """RSS at the sample closest to fraction ``q`` of the run."""
        if not self.samples:
            return float("nan")
        return self.samples[min(len(self.samples) - 1, int(q * len(self.samples)))][1]


def run_engine(work: Path, manifest: Path, name: str, *, concurrency: int,
               extra: list[str], emu_flags: list[str]) -> tuple[Any, RssSampler, Any]:
    out = work / f"{name}.jsonl"
    for stale in (out, Path(f"{out}.journal")):
        stale.unlink(missing_ok=True)
    with emulator(emu_flags, workdir=work) as emu:
        cmd = engine_cmd(manifest, base_url=emu.base_url, output=out, rate_limit=100_000,
                         burst=1000, concurrency=concurrency, poll_min=0.05, poll_max=0.5,
                         extra=extra)
        sampler = RssSampler()
        run = run_child(cmd, env=engine_env(), workdir=work, name=name, sampler=sampler)
    if run.returncode != 0:
        print(f"{name}: exit {run.returncode}\n{run.stderr[-3000:]}", file=sys.stderr)
    return run, sampler, read_output(out)


def manifest_length(ns: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    archive = sample_archive(work / "archive-scale", ns.distinct_folders)
    folders = [archive.parent / "folders" / f"folder_{i:05d}" for i in range(ns.distinct_folders)]
    flags = emulator_flags(rate_limit=None, processing=(0.0, 0.0))
    results = []
    for rows in ns.rows:
        manifest = reuse_manifest(work / f"rows-{rows}.csv", folders, rows)
        run, sampler, outs = run_engine(work, manifest, f"scale-{rows}",
                                        concurrency=ns.concurrency, extra=[], emu_flags=flags)
        r = {"rows": rows, "exit_code": run.returncode, "completed": outs.completed,
             "wall_s": round(run.wall_s, 1), "rows_per_s": round(rows / run.wall_s, 1),
             "peak_rss_mib": round(run.maxrss_mib, 1),
             "rss_at_10pct_mib": round(sampler.at_fraction(0.1), 1),
             "rss_at_50pct_mib": round(sampler.at_fraction(0.5), 1),
             "rss_at_90pct_mib": round(sampler.at_fraction(0.9), 1),
             "cpu_ms_per_row": round(1000 * run.cpu_s / rows, 3)}
        results.append(r)
        print(f"{rows} rows: peak RSS {r['peak_rss_mib']} MiB, {r['wall_s']} s", flush=True)
    return results


def big_file(ns: argparse.Namespace, work: Path) -> dict[str, Any]:
    flags = emulator_flags(rate_limit=None, processing=(0.0, 0.0), max_upload_bytes=2 * GIB)
    extra = ["--max-file-size", str(2 * GIB)]
    runs = {}
    for label, size in (("small", 1024), ("big", ns.file_mib << 20)):
        folder = work / f"bigfile-{label}" / "folder"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "scan.pdf"
        if not path.exists() or path.stat().st_size != size:
            with path.open("wb") as fh:
                fh.truncate(size)  # sparse: no disk blocks, reads as zeros
        manifest = folder.parent / "manifest.csv"
        manifest.write_text(f"id,folder\n{label},{folder}\n")
        run, _, outs = run_engine(work, manifest, f"bigfile-{label}", concurrency=1,
                                        extra=extra, emu_flags=flags)
        runs[label] = (run, outs, size)
    small, big = runs["small"][0], runs["big"][0]
    growth = big.maxrss_mib - small.maxrss_mib
    size = runs["big"][2]
    return {"file_bytes": size, "completed": runs["big"][1].completed,
            "exit_code": big.returncode, "wall_s": round(big.wall_s, 1),
            "upload_mib_per_s": round(size / (1 << 20) / max(big.wall_s, 1e-9), 1),
            "peak_rss_small_mib": round(small.maxrss_mib, 1),
            "peak_rss_big_mib": round(big.maxrss_mib, 1), "rss_growth_mib": round(growth, 1)}


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    mach = print_machine()
    print("emulator: processing 0 s, no rate limit; engine (subprocess): --rate-limit 100000 "
          f"--burst 1000 --concurrency {ns.concurrency} --poll-min 0.05 --poll-max 0.5")
    ok = True
    data: dict[str, Any] = {"machine": mach, "argv": sys.argv}
    with workdir(ns.workdir, "bench-scale-") as work:
        rows = manifest_length(ns, work)
        data["rows"] = rows
        print()
        print(md_table(["rows", "peak RSS MiB", "RSS at 10 % / 50 % / 90 % of the run",
                        "wall s", "rows/s", "CPU ms/row", "completed"],
                       [[r["rows"], r["peak_rss_mib"],
                         f"{r['rss_at_10pct_mib']} / {r['rss_at_50pct_mib']} / "
                         f"{r['rss_at_90pct_mib']}", r["wall_s"], r["rows_per_s"],
                         r["cpu_ms_per_row"], f"{r['completed']}/{r['rows']}"] for r in rows]))
        ratio = rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]
        peak = max(r["peak_rss_mib"] for r in rows)
        data["rss_ratio"] = round(ratio, 3)
        met = ratio <= ns.max_ratio and peak < ns.max_rss_mib
        ok &= met and all(r["completed"] == r["rows"] for r in rows)
        print(f"peak RSS ratio {rows[-1]['rows']}/{rows[0]['rows']} rows = {ratio:.3f} (target "
              f"<= {ns.max_ratio}), max peak {peak:.1f} MiB (target < {ns.max_rss_mib}) -> "
              f"{'met' if met else 'MISSED'}")
        if ns.file_mib > 0:
            b = big_file(ns, work)
            data["big_file"] = b
            print()
            print(md_table(["file", "peak RSS, 1 KiB file", "peak RSS, big file", "growth MiB",
                            "upload MiB/s", "completed"],
                           [[f"{b['file_bytes'] >> 20} MiB", b["peak_rss_small_mib"],
                             b["peak_rss_big_mib"], b["rss_growth_mib"], b["upload_mib_per_s"],
                             f"{b['completed']}/1"]]))
            met = b["rss_growth_mib"] <= ns.max_growth_mib and b["completed"] == 1
            ok &= met
            print(f"RSS growth {b['rss_growth_mib']} MiB (target <= {ns.max_growth_mib}) -> "
                  f"{'met' if met else 'MISSED'}")
    save_json(ns.json, data)
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
