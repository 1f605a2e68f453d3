"""The engine side by side with what a user would otherwise write (issue 7 item 2).

One run, three clients, each a subprocess against its own fresh emulator process started with the
same flags (rate limit R per key, uniform processing MIN..MAX, no parallel-analysis cap unless
``--max-parallel-analyses``):

- ``engine``: ``python -m bulk_engine MANIFEST`` at ``--rate-limit R``.
- ``threadpool``: ``benchmarks/clients/threadpool.py``: requests + ThreadPoolExecutor, one folder
  per worker end to end, fixed-interval polling, honours Retry-After (one run per ``--threads``).
- ``sequential``: ``benchmarks/clients/sequential.py``: the documented example loop, one folder
  at a time. It is slow by design, so it runs on the first ``--sequential-folders`` rows only and
  its wall time is extrapolated linearly to N (marked "extrapolated" in the table).

Per client: wall time, client CPU (user + system of that child, from ``os.wait4``) per folder, both
gross and net of the client's start-up cost (the same client run on an empty manifest), and peak
RSS (``ru_maxrss`` of the child); then each as a ratio to the engine. Also polls per folder, the
429 share (counted by the emulator) and row latency.

    python benchmarks/bench_vs_baselines.py                  # N = 400, sequential on 40 rows
    python benchmarks/bench_vs_baselines.py --folders 100 --sequential-folders 10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from common import (
    API_KEY,
    ChildRun,
    emulator,
    emulator_flags,
    engine_cmd,
    md_table,
    print_machine,
    read_output,
    sample_archive,
    save_json,
    subset_manifest,
    workdir,
)

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate-limit", type=float, default=40.0, help="R, calls/s per key (40)")
    p.add_argument("--processing-time", default="0.3:1.5", metavar="MIN:MAX")
    p.add_argument("--max-parallel-analyses", type=int, default=100_000,
                   help="the emulator's per-key cap (default: effectively none)")
    p.add_argument("--folders", type=int, default=400, help="N for engine and threadpool (400)")
    p.add_argument("--sequential-folders", type=int, default=40,
                   help="rows the sequential loop runs; its time is extrapolated to N (40)")
    p.add_argument("--threads", type=int, nargs="+", default=[8, 32],
                   help="threadpool sizes, one run each (default: 8 32)")
    p.add_argument("--poll-interval", type=float, default=0.5,
                   help="baselines' fixed poll interval, s (default 0.5; the docs' 10 s is for "
                        "minutes-long analyses)")
    p.add_argument("--concurrency", type=int, default=8, help="engine --concurrency (8)")
    p.add_argument("--burst", type=int, default=10, help="emulator and engine --burst (10)")
    p.add_argument("--poll-min", type=float, default=None,
                   help="engine --poll-min (default: MIN processing time)")
    p.add_argument("--poll-max", type=float, default=None,
                   help="engine --poll-max (default: MAX processing time)")
    p.add_argument("--workdir", help="keep archives and outputs here (default: a temp dir)")
    p.add_argument("--json", help="also write the figures as JSON to this path")
    return p.parse_args(argv)


def client_cmd(ns: argparse.Namespace, kind: str, manifest: Path, url: str, out: Path,
               threads: int = 0) -> list[str]:
    if kind == "engine":
        return engine_cmd(manifest, base_url=url, output=out, rate_limit=ns.rate_limit,
                          concurrency=ns.concurrency, poll_min=ns.poll_min,
                          poll_max=ns.poll_max, burst=ns.burst)
    script = HERE / "clients" / f"{kind}.py"
    cmd = [sys.executable, str(script), str(manifest), "--base-url", url, "--output", str(out),
           "--poll-interval", f"{ns.poll_interval:g}"]
    if kind == "threadpool":
        cmd += ["--threads", str(threads)]
    return cmd


def run_client(ns: argparse.Namespace, work: Path, flags: list[str], name: str, kind: str,
               manifest: Path, empty: Path, threads: int = 0) -> dict[str, Any]:
    from common import run_child

    env = {"BULK_ENGINE_API_KEY": API_KEY}
    rows = sum(1 for _ in manifest.open()) - 1
    with emulator(flags, workdir=work) as emu:
        # Start-up cost: the same client, same emulator, on a manifest with no rows.
        idle_out = work / f"{name}-empty.jsonl"
        for stale in (idle_out, Path(f"{idle_out}.journal")):
            stale.unlink(missing_ok=True)
        idle = run_child(client_cmd(ns, kind, empty, emu.base_url, idle_out, threads), env=env,
                         workdir=work, name=f"{name}-empty")
        out = work / f"{name}.jsonl"
        for stale in (out, Path(f"{out}.journal")):
            stale.unlink(missing_ok=True)
        run: ChildRun = run_child(client_cmd(ns, kind, manifest, emu.base_url, out, threads),
                                  env=env, workdir=work, name=name)
        est = emu.stats()
    if run.returncode not in (0,):
        print(f"{name}: exit {run.returncode}\n{run.stderr[-2000:]}", file=sys.stderr)
    outs = read_output(out)
    calls = est["submissions"] + est["polls"]
    n = ns.folders
    return {
        "client": name, "rows_run": rows, "exit_code": run.returncode,
        "completed": outs.completed, "failed": outs.failed,
        "wall_s": round(run.wall_s, 3),
        "wall_s_for_N": round(run.wall_s * n / rows, 3),
        "extrapolated": rows != n,
        "cpu_s": round(run.cpu_s, 3), "startup_cpu_s": round(idle.cpu_s, 3),
        "cpu_ms_per_folder": round(1000 * run.cpu_s / rows, 3),
        "cpu_ms_per_folder_net": round(1000 * max(0.0, run.cpu_s - idle.cpu_s) / rows, 3),
        "peak_rss_mib": round(run.maxrss_mib, 1), "startup_rss_mib": round(idle.maxrss_mib, 1),
        "polls_per_folder": round(outs.polls_per_folder, 3),
        "share_429": round(est["rate_limited"] / calls, 4) if calls else None,
        "calls": calls,
        "latency_p50_s": round(outs.latency(0.5), 3),
        "latency_p99_s": round(outs.latency(0.99), 3),
    }


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    mach = print_machine()
    lo, hi = (float(x) for x in ns.processing_time.split(":"))
    ns.poll_min = ns.poll_min if ns.poll_min is not None else max(0.05, lo)
    ns.poll_max = ns.poll_max if ns.poll_max is not None else max(ns.poll_min, hi)
    flags = emulator_flags(rate_limit=ns.rate_limit, burst=ns.burst, processing=(lo, hi),
                           max_parallel=ns.max_parallel_analyses)
    print("emulator (one fresh process per client): " + " ".join(flags))
    print(f"engine: --rate-limit {ns.rate_limit:g} --burst {ns.burst} --concurrency "
          f"{ns.concurrency} --poll-min {ns.poll_min:g} --poll-max {ns.poll_max:g}; baselines: "
          f"poll every {ns.poll_interval:g} s, honour Retry-After")
    results: list[dict[str, Any]] = []
    with workdir(ns.workdir, "bench-vs-") as work:
        manifest = sample_archive(work / f"archive-{ns.folders}", ns.folders)
        empty = work / "empty.csv"
        empty.write_text("id,folder\n")
        k = min(ns.sequential_folders, ns.folders)
        seq_manifest = subset_manifest(manifest, k, work / f"subset-{k}.csv")
        plan = [("engine", "engine", manifest, 0)]
        plan += [(f"threadpool-{t}", "threadpool", manifest, t) for t in ns.threads]
        plan += [("sequential", "sequential", seq_manifest, 0)]
        for name, kind, man, threads in plan:
            r = run_client(ns, work, flags, name, kind, man, empty, threads)
            results.append(r)
            print(f"{name}: {r['completed']}/{r['rows_run']} completed in {r['wall_s']:.1f} s",
                  flush=True)
    eng = results[0]

    def ratio(r: dict[str, Any], key: str) -> float:
        return r[key] / eng[key] if eng[key] else float("nan")

    for r in results:
        r["wall_ratio"] = round(ratio(r, "wall_s_for_N"), 3)
        r["cpu_ratio"] = round(ratio(r, "cpu_ms_per_folder"), 3)
        r["cpu_net_ratio"] = round(ratio(r, "cpu_ms_per_folder_net"), 3)
        r["rss_ratio"] = round(ratio(r, "peak_rss_mib"), 3)
    print()
    print(md_table(
        ["client", "rows run", f"wall s for N={ns.folders}", "÷ engine", "CPU ms/folder",
         "net of start-up", "÷ engine (net)", "peak RSS MiB", "÷ engine", "polls/folder",
         "429 share", "p50 / p99 latency s"],
        [[r["client"], r["rows_run"],
          f"{r['wall_s_for_N']:.1f}" + (" (extrapolated)" if r["extrapolated"] else ""),
          r["wall_ratio"], r["cpu_ms_per_folder"], r["cpu_ms_per_folder_net"],
          r["cpu_net_ratio"], r["peak_rss_mib"], r["rss_ratio"], r["polls_per_folder"],
          f"{100 * (r['share_429'] or 0):.2f} %",
          f"{r['latency_p50_s']:.2f} / {r['latency_p99_s']:.2f}"] for r in results]))
    print("\nCPU is user + system time of the client process; 'net of start-up' subtracts the "
          "same client's run on an empty manifest (interpreter, imports, session).")
    save_json(ns.json, {"machine": mach, "argv": sys.argv, "emulator_flags": flags,
                        "results": results})
    ok = all(r["exit_code"] == 0 and r["completed"] == r["rows_run"] for r in results)
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
