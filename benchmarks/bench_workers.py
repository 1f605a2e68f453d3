"""Many ``--db`` workers on one backfill: do they share the keys' rate, and what does it cost?

Two tables:

1. **workers**: 1, 2 and 4 worker processes (``python -m bulk_engine MANIFEST --db ...``) on
   one key and on two keys, against the emulator in its own process with a per-key rate limit
   and a cap on parallel analyses (the rate binds: the cap is set above what the rate can
   feed). Per cell: rows/s against the ideal (every folder one submit and one poll, all keys'
   calls at their rate: ``keys x R / 2``), the **steady call rate** of all workers together
   against ``keys x R`` (the slope of the emulator's call count between 20 % and 80 % of the
   run's calls, sampled every 0.2 s), the 429 share, calls per folder, p50 latency and the
   wall time (worker start-up included). Target: the steady rate within 3 % of ``keys x R``
   with 4 workers.
2. **backends**: one worker, one key, a fast emulator and no rate limit (CPU-bound, as
   ``bench_client_cost.py``): the SQLite journal (``--output``) against PostgreSQL (``--db``) on
   the same rows: wall time, the worker's CPU per row, the PostgreSQL server's CPU per row and
   database round trips per row; CPU net of start-up (the same run on an empty manifest:
   interpreter, imports, connection, schema check). The difference is the overhead of the
   shared mode per row.

    python benchmarks/bench_workers.py                   # a throwaway cluster, ~5 min
    python benchmarks/bench_workers.py --folders 120 --backend-folders 300   # a quick look
    python benchmarks/bench_workers.py --dsn postgresql://user:pw@host/db    # a real server

Without ``--dsn`` it starts a throwaway cluster (``tests/pg_cluster.py``; run as root it runs
the server as ``postgres``) and gives each cell a fresh database; with ``--dsn`` each cell is a
run of its own (``--run``) with keys of its own. Exit 0 when the 4-worker cells meet the target,
3 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from common import (  # noqa: E402
    md_table,
    print_machine,
    read_output,
    run_child,
    sample_archive,
    save_json,
    workdir,
)

from bulk_engine.emulator.process import EmulatorProcess, emulator_process  # noqa: E402


@dataclass
class Cell:
    """One run of ``workers`` workers sharing ``keys`` keys."""

    keys: int
    workers: int
    rows: int = 0
    completed: int = 0
    wall_s: float = 0.0
    rows_per_s: float = 0.0
    ideal_rows_per_s: float = 0.0
    steady_calls_per_s: float = 0.0
    target_calls_per_s: float = 0.0
    calls: int = 0
    rate_limited: int = 0
    runs_created: int = 0
    p50_latency_s: float = 0.0
    exit_codes: list[int] = field(default_factory=list)

    @property
    def rate_error_pct(self) -> float:
        return 100 * (self.steady_calls_per_s / self.target_calls_per_s - 1)


class Database:
    """Where the cells' runs live: a throwaway cluster (a database per cell) or ``--dsn``."""

    def __init__(self, dsn: str | None) -> None:
        self._dsn = dsn
        self._cluster: Any = None
        self._n = 0
        if dsn is None:
            from pg_cluster import PgCluster

            self._cluster = PgCluster()
            self._cluster.start()
            self._cluster.create_role_and_db()
            print(f"throwaway cluster: {self._cluster.bindir}, port {self._cluster.port} "
                  "(fsync=off, synchronous_commit=on)", flush=True)

    def fresh(self) -> tuple[str, str]:
        """A DSN and a run name nobody used yet."""
        self._n += 1
        name = f"bench-{os.getpid()}-{self._n}"
        if self._cluster is not None:
            return self._cluster.create_database(name.replace("-", "_")), name
        assert self._dsn is not None
        return self._dsn, name

    def server_cpu_s(self) -> float:
        """CPU seconds of the throwaway server's processes so far (NaN with --dsn)."""
        if self._cluster is None:
            return float("nan")
        pid_file = self._cluster.data / "postmaster.pid"
        master = int(pid_file.read_text().split()[0])
        total = _cpu(master, children_reaped=True)
        for entry in os.listdir("/proc"):
            if entry.isdigit() and _ppid(int(entry)) == master:
                total += _cpu(int(entry))
        return total

    def close(self) -> None:
        if self._cluster is not None:
            self._cluster.close()


def _stat(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _ppid(pid: int) -> int:
    fields = _stat(pid)
    return int(fields[1]) if fields else -1


def _cpu(pid: int, *, children_reaped: bool = False) -> float:
    f = _stat(pid)
    if not f:
        return 0.0
    ticks = int(f[11]) + int(f[12]) + (int(f[13]) + int(f[14]) if children_reaped else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def _emulator(args: argparse.Namespace, keys: list[str], work: Path, *,
              rate: float | None) -> Any:
    flags = ["--processing-time", args.processing_time, "--seed", "1",
             "--max-parallel-analyses", str(args.max_parallel),
             "--rate-limit", "none" if rate is None else f"{rate:g}",
             "--burst", str(args.key_burst)]
    return emulator_process(flags, api_keys=",".join(keys), log_path=work / "emulator.log")


def _calls(stats: dict[str, Any]) -> int:
    return int(stats["submissions"] + stats["polls"])


def _steady_rate(samples: list[tuple[float, int]], total: int) -> float:
    """calls/s between the moments the count crossed 20 % and 80 % of ``total``."""
    lo = next(((t, n) for t, n in samples if n >= 0.2 * total), None)
    hi = next(((t, n) for t, n in samples if n >= 0.8 * total), None)
    if lo is None or hi is None or hi[0] <= lo[0]:
        return float("nan")
    return (hi[1] - lo[1]) / (hi[0] - lo[0])


def _worker_cmd(manifest: Path, emu: EmulatorProcess, args: argparse.Namespace, i: int,
                work: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bulk_engine", str(manifest), "--base-url", emu.base_url,
            "--rate-limit", f"{args.rate:g}", "--burst", str(args.worker_burst),
            "--concurrency", str(args.concurrency), "--poll-min", f"{args.poll_min:g}",
            "--poll-max", f"{args.poll_max:g}", "--max-outstanding", str(args.max_parallel),
            "--no-progress", "--log-level", "warning", "--seed", str(i),
            "--stats-json", str(work / f"worker-{i}.json"), *extra]


def run_cell(args: argparse.Namespace, db: Database, manifest: Path, keys: int, workers: int,
             base: Path) -> Cell:
    work = base / f"k{keys}-w{workers}"
    work.mkdir(parents=True, exist_ok=True)
    dsn, run = db.fresh()
    key_list = [f"bench-{run}-key{i}" for i in range(keys)]
    cell = Cell(keys, workers, target_calls_per_s=keys * args.rate,
                ideal_rows_per_s=keys * args.rate / 2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BULK_ENGINE_")}
    env.update(BULK_ENGINE_DB=dsn, BULK_ENGINE_API_KEY=",".join(key_list),
               BULK_ENGINE_RUN=run, PYTHONUNBUFFERED="1")
    with _emulator(args, key_list, work, rate=args.rate) as emu:
        logs = [(work / f"worker-{i}.log").open("wb") for i in range(workers)]
        t0 = time.monotonic()
        procs = [subprocess.Popen(_worker_cmd(manifest, emu, args, i, work), env=env,
                                  stdout=subprocess.DEVNULL, stderr=log)
                 for i, log in enumerate(logs)]
        samples: list[tuple[float, int]] = []
        try:
            while any(p.poll() is None for p in procs):
                samples.append((time.monotonic(), _calls(emu.stats())))
                time.sleep(0.2)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
            for log in logs:
                log.close()
        cell.wall_s = time.monotonic() - t0
        stats = emu.stats()
    cell.exit_codes = [p.returncode for p in procs]
    out = work / "results.jsonl"
    subprocess.run([sys.executable, "-m", "bulk_engine", "export", "--output", str(out)],
                   env=env, check=True, capture_output=True)
    o = read_output(out)
    cell.rows, cell.completed, cell.p50_latency_s = o.rows, o.completed, o.latency(0.5)
    span = (o.summary.last_complete or 0) - (o.summary.first_submit or 0)
    cell.rows_per_s = o.completed / span if span > 0 else float("nan")
    cell.calls, cell.rate_limited = _calls(stats), int(stats["rate_limited"])
    cell.runs_created = int(stats["runs_created"])
    cell.steady_calls_per_s = _steady_rate(samples, cell.calls)
    return cell


@dataclass
class BackendRun:
    backend: str
    rows: int
    completed: int
    wall_s: float
    startup_wall_s: float  # the same run on an empty manifest
    worker_cpu_ms_per_row: float  # net of start-up
    server_cpu_ms_per_row: float  # net of start-up
    db_ops_per_row: float


def _backend_run(backend: str, db: Database, manifest: Path, work: Path,
                 ) -> tuple[float, float, float, dict[str, Any]]:
    """(wall s, worker CPU s, server CPU s, stats) of one worker run on ``manifest``."""
    work.mkdir(parents=True, exist_ok=True)
    dsn, run = db.fresh()
    key = f"bench-{run}-key"
    env = {"BULK_ENGINE_API_KEY": key}
    if backend == "postgres":
        env.update(BULK_ENGINE_DB=dsn, BULK_ENGINE_RUN=run)
    with emulator_process(["--processing-time", "0:0.02", "--rate-limit", "none",
                           "--max-parallel-analyses", "100000"], api_keys=key,
                          log_path=work / "emulator.log") as emu:
        cmd = [sys.executable, "-m", "bulk_engine", str(manifest), "--base-url",
               emu.base_url, "--rate-limit", "100000", "--burst", "1000",
               "--concurrency", "8", "--poll-min", "0.05", "--poll-max", "0.2",
               "--no-progress", "--log-level", "warning", "--seed", "1",
               "--output", str(work / "out.jsonl"), "--stats-json", str(work / "stats.json")]
        server0 = db.server_cpu_s()
        child = run_child(cmd, env=env, workdir=work, name="worker", timeout=600)
        server = db.server_cpu_s() - server0
    if child.returncode != 0:
        raise RuntimeError(f"{backend} worker exited {child.returncode}: {child.stderr[-2000:]}")
    if backend == "postgres":
        subprocess.run([sys.executable, "-m", "bulk_engine", "export", "--output",
                        str(work / "out.jsonl")], env={**os.environ, **env}, check=True,
                       capture_output=True)
    return child.wall_s, child.cpu_s, server, json.loads((work / "stats.json").read_text())


def run_backends(db: Database, manifest: Path, base: Path) -> list[BackendRun]:
    """The SQLite journal against PostgreSQL, one worker, CPU-bound (fast emulator)."""
    empty = base / "empty.csv"
    empty.write_text("id,folder\n", encoding="utf-8")
    out: list[BackendRun] = []
    for backend in ("sqlite", "postgres"):
        wall0, cpu0, server0, _ = _backend_run(backend, db, empty, base / f"{backend}-empty")
        wall, cpu, server, stats = _backend_run(backend, db, manifest, base / backend)
        o = read_output(base / backend / "out.jsonl")
        rows = max(o.rows, 1)
        out.append(BackendRun(
            backend, o.rows, o.completed, wall, wall0, 1000 * (cpu - cpu0) / rows,
            1000 * (server - server0) / rows if backend == "postgres" else float("nan"),
            stats.get("db_operations", float("nan")) / rows))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", help="a PostgreSQL to use (default: a throwaway cluster)")
    p.add_argument("--folders", type=int, default=400, help="rows per cell")
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--keys", default="1,2")
    p.add_argument("--rate", type=float, default=20.0, help="each key's rate, calls/s")
    p.add_argument("--key-burst", type=int, default=10, help="the emulator's burst per key")
    p.add_argument("--worker-burst", type=int, default=2,
                   help="the workers' --burst: below the key's, for network jitter")
    p.add_argument("--max-parallel", type=int, default=30,
                   help="the emulator's cap per key (and the workers' shared window)")
    p.add_argument("--processing-time", default="0.5:1.0")
    p.add_argument("--poll-min", type=float, default=0.6)
    p.add_argument("--poll-max", type=float, default=1.5)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--backend-folders", type=int, default=1000,
                   help="rows of the SQLite-vs-PostgreSQL run (0: skip it)")
    p.add_argument("--json", help="save every figure here")
    p.add_argument("--workdir", help="keep archives, outputs and logs here")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stops the cluster
    report: dict[str, Any] = {"machine": print_machine(), "args": vars(args)}
    db = Database(args.dsn)
    try:
        with workdir(args.workdir, "bench-workers-") as base:
            manifest = sample_archive(base / "archive", args.folders, seed=1)
            print(f"emulator per key: --rate-limit {args.rate:g} --burst {args.key_burst} "
                  f"--max-parallel-analyses {args.max_parallel} --processing-time "
                  f"{args.processing_time}; workers: --rate-limit {args.rate:g} --burst "
                  f"{args.worker_burst} --concurrency {args.concurrency} --poll-min "
                  f"{args.poll_min:g} --poll-max {args.poll_max:g} --max-outstanding "
                  f"{args.max_parallel}; {args.folders} rows per cell\n", flush=True)
            cells = []
            for keys in (int(k) for k in args.keys.split(",")):
                for workers in (int(w) for w in args.workers.split(",")):
                    cell = run_cell(args, db, manifest, keys, workers, base)
                    cells.append(cell)
                    print(f"  {keys} key(s), {workers} worker(s): {cell.rows_per_s:.2f} rows/s, "
                          f"steady {cell.steady_calls_per_s:.2f} calls/s of "
                          f"{cell.target_calls_per_s:g}, 429s {cell.rate_limited}", flush=True)
            report["cells"] = [asdict(c) for c in cells]
            print("\n### workers sharing keys\n")
            print(md_table(
                ["keys", "workers", "rows/s", "ideal rows/s", "% of ideal", "steady calls/s",
                 "of keys x R", "429 share", "calls/folder", "p50 latency s", "wall s",
                 "analyses/rows"],
                [[c.keys, c.workers, c.rows_per_s, c.ideal_rows_per_s,
                  f"{100 * c.rows_per_s / c.ideal_rows_per_s:.1f} %",
                  c.steady_calls_per_s, f"{c.rate_error_pct:+.2f} %",
                  f"{100 * c.rate_limited / max(c.calls, 1):.2f} %",
                  c.calls / max(c.rows, 1), c.p50_latency_s, c.wall_s,
                  f"{c.runs_created}/{c.rows}"] for c in cells]))
            if args.backend_folders:
                backend_manifest = sample_archive(base / "archive-backends",
                                                  args.backend_folders, seed=2)
                runs = run_backends(db, backend_manifest, base)
                report["backends"] = [asdict(r) for r in runs]
                print("\n### SQLite journal against PostgreSQL, one worker\n")
                print(md_table(["backend", "rows", "wall s", "start-up wall s",
                                "worker CPU ms/row (net)", "server CPU ms/row (net)",
                                "db round trips/row"],
                               [[r.backend, r.completed, r.wall_s, r.startup_wall_s,
                                 r.worker_cpu_ms_per_row, r.server_cpu_ms_per_row,
                                 r.db_ops_per_row] for r in runs]))
                if len(runs) == 2:
                    sq, pg = runs
                    print(f"\noverhead of --db per row: worker CPU "
                          f"{pg.worker_cpu_ms_per_row - sq.worker_cpu_ms_per_row:+.2f} ms, "
                          f"PostgreSQL server CPU {pg.server_cpu_ms_per_row:.2f} ms, "
                          f"{pg.db_ops_per_row:.1f} round trips")
    finally:
        db.close()
    four = [c for c in cells if c.workers == 4]
    ok = bool(four) and all(abs(c.rate_error_pct) <= 3 and c.completed == c.rows
                            and c.runs_created == c.rows for c in four)
    print(f"\ntarget {'met' if ok else 'MISSED'}: with 4 workers the steady call rate within "
          "3 % of keys x R, every row completed, one analysis per row")
    save_json(args.json, report)
    return 0 if ok else 3


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
