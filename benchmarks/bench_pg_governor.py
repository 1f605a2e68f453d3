"""What the PostgreSQL building blocks cost and how exact the shared governor is (issue 13).

Four parts, each printed as a markdown table:

1. driver: asyncpg vs psycopg 3 (if installed) on the statement shape the governor uses (one
   row, ``UPDATE … RETURNING``, autocommit): latency p50/p99, client CPU per call, calls/s on
   one connection and on 8 connections of one process. This is what chose the driver.
2. reserve: ``RESERVE_SQL`` (one GCRA reservation) on one row: reservations/s from one
   connection, from 8 connections of one process, and from 4 processes x 2 connections.
3. governor: ``Governor.acquire`` from 4 processes sharing one key at several rates for a few
   seconds each: the rate they got together (database clock and wall clock) against the
   target, the most calls in any 1-s window against burst + rate, the smallest and largest
   share of one process, and round trips per grant.
4. rows: loading a manifest of ``--rows`` rows (rows/s), claiming them all in batches of 100
   (rows/s) and the latency of one fenced transition (``finish``).

    python benchmarks/bench_pg_governor.py                 # a throwaway cluster (~1 min)
    python benchmarks/bench_pg_governor.py --dsn postgresql://user:pw@host/db   # a real server

Without ``--dsn`` it starts a throwaway cluster with ``tests/pg_cluster.py`` (PostgreSQL server
binaries needed; run as root it runs the server as ``postgres``). Exit 0 when the governor is
within 3 % of every rate and a reservation round trip sustains 1,000/s, else 3.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from common import print_machine  # noqa: E402

KEY = "bench-key-0123456789"
SQL_ONE_ROW = "UPDATE bench_g SET n = n + 1, t = clock_timestamp() WHERE k = 1 RETURNING n, t"


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * (len(xs) - 1) + 0.5))]


def table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------- 1. driver


async def _asyncpg_driver(dsn: str, n: int, seconds: float) -> dict[str, float]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    for _ in range(200):
        await conn.fetchrow(SQL_ONE_ROW)
    lat = []
    cpu0 = time.process_time()
    for _ in range(n):
        t = time.perf_counter()
        await conn.fetchrow(SQL_ONE_ROW)
        lat.append(time.perf_counter() - t)
    cpu = (time.process_time() - cpu0) / n
    await conn.close()

    async def loop(stop: float) -> int:
        c = await asyncpg.connect(dsn)
        k = 0
        while time.perf_counter() < stop:
            await c.fetchrow(SQL_ONE_ROW)
            k += 1
        await c.close()
        return k

    one = await loop(time.perf_counter() + seconds) / seconds
    stop = time.perf_counter() + seconds
    eight = sum(await asyncio.gather(*(loop(stop) for _ in range(8)))) / seconds
    return {"p50_ms": pct(lat, 0.5) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3,
            "cpu_us": cpu * 1e6, "per_s_1": one, "per_s_8": eight}


async def _psycopg_driver(dsn: str, n: int, seconds: float) -> dict[str, float]:
    import psycopg

    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    for _ in range(200):
        await (await conn.execute(SQL_ONE_ROW)).fetchone()
    lat = []
    cpu0 = time.process_time()
    for _ in range(n):
        t = time.perf_counter()
        await (await conn.execute(SQL_ONE_ROW)).fetchone()
        lat.append(time.perf_counter() - t)
    cpu = (time.process_time() - cpu0) / n
    await conn.close()

    async def loop(stop: float) -> int:
        c = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        k = 0
        while time.perf_counter() < stop:
            await (await c.execute(SQL_ONE_ROW)).fetchone()
            k += 1
        await c.close()
        return k

    one = await loop(time.perf_counter() + seconds) / seconds
    stop = time.perf_counter() + seconds
    eight = sum(await asyncio.gather(*(loop(stop) for _ in range(8)))) / seconds
    return {"p50_ms": pct(lat, 0.5) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3,
            "cpu_us": cpu * 1e6, "per_s_1": one, "per_s_8": eight}


async def bench_driver(dsn: str, n: int, seconds: float) -> dict[str, Any]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    await conn.execute("DROP TABLE IF EXISTS bench_g; "
                       "CREATE TABLE bench_g (k int PRIMARY KEY, n bigint, t timestamptz); "
                       "INSERT INTO bench_g VALUES (1, 0, now())")
    await conn.close()
    out: dict[str, Any] = {"asyncpg": await _asyncpg_driver(dsn, n, seconds)}
    try:
        out["psycopg"] = await _psycopg_driver(dsn, n, seconds)
    except ImportError:
        out["psycopg"] = None
    return out


# ---------------------------------------------------------------------- 2. reserve


async def _reserve_loop(dsn: str, key_fp: str, seconds: float, conns: int) -> int:
    import asyncpg

    from bulk_engine.pg.governor import RESERVE_SQL

    pool = await asyncpg.create_pool(dsn, min_size=conns, max_size=conns)
    stop = time.perf_counter() + seconds

    async def one() -> int:
        k = 0
        async with pool.acquire() as c:
            while time.perf_counter() < stop:
                await c.fetchrow(RESERVE_SQL, key_fp, 1e9, None)
                k += 1
        return k

    total = sum(await asyncio.gather(*(one() for _ in range(conns))))
    await pool.close()
    return total


async def bench_reserve(dsn: str, seconds: float) -> dict[str, Any]:
    from bulk_engine.pg.connect import Database
    from bulk_engine.pg.governor import Governor

    async with await Database.connect(dsn) as db:
        # A rate far above what one row can serve: every call is granted, so this measures
        # the reservation itself (lock, arithmetic, update, round trip).
        gov = await Governor.open(db, KEY + "-reserve", rate=1e9, burst=1)
        key_fp = gov.key_fp
    one = await _reserve_loop(dsn, key_fp, seconds, 1) / seconds
    eight = await _reserve_loop(dsn, key_fp, seconds, 8) / seconds
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--child-reserve", dsn, key_fp, str(seconds), "2",
        stdout=asyncio.subprocess.PIPE) for _ in range(4)]
    counts = [int((await asyncio.wait_for(p.communicate(), seconds + 60))[0]) for p in procs]
    return {"per_s_1conn": one, "per_s_8conn": eight, "per_s_4proc_x2": sum(counts) / seconds}


# ---------------------------------------------------------------------- 3. governor


def _max_in_window(times: list[float], width: float) -> int:
    times = sorted(times)
    return max(bisect.bisect_left(times, t + width) - i for i, t in enumerate(times))


async def bench_governor(dsn: str, rates: list[float], seconds: float, procs: int,
                         burst: int) -> list[dict[str, Any]]:
    from bulk_engine.pg.connect import Database
    from bulk_engine.pg.governor import Governor

    from pg_cluster import children

    out = []
    for rate in rates:
        key = f"{KEY}-{rate}"
        async with await Database.connect(dsn) as db:
            await Governor.open(db, key, rate=rate, burst=burst)
        argv = [["governor-child", dsn, key, str(rate), str(burst), str(seconds)]] * procs
        with children(argv, timeout=seconds + 120) as results:
            per = [r["grants"] for r in results]
            reservations = sum(r["stats"]["reservations"] for r in results)
        ats = sorted(g[0] for p in per for g in p)
        walls = sorted(g[1] for p in per for g in p)
        n = len(ats)
        db_rate = (n - burst) / (ats[-1] - ats[0])
        wall_rate = (n - burst) / (walls[-1] - walls[0])
        out.append({
            "rate": rate, "burst": burst, "processes": procs, "seconds": seconds, "grants": n,
            "db_rate": db_rate, "db_error_pct": 100 * (db_rate - rate) / rate,
            "wall_rate": wall_rate, "wall_error_pct": 100 * (wall_rate - rate) / rate,
            "max_in_1s": _max_in_window(ats, 1.0), "limit_1s": burst + rate,
            "share_min": min(len(p) for p in per) / n, "share_max": max(len(p) for p in per) / n,
            "round_trips_per_grant": reservations / n,
        })
    return out


# ---------------------------------------------------------------------- 4. rows


async def bench_rows(dsn: str, rows: int) -> dict[str, Any]:
    from bulk_engine.pg.connect import Database
    from bulk_engine.pg.rows import RowSpec, RunStore

    async with await Database.connect(dsn) as db:
        store = await RunStore.open(db, f"bench-{time.time()}", settings_fingerprint="b",
                                    settings_summary="{}")
        specs = (RowSpec(key=f"r{i:08d}", id=f"r{i:08d}", folder=f"archive/{i}", line=i + 2,
                         options={"use_case": "rental"}) for i in range(rows))
        t = time.perf_counter()
        await store.load(specs)
        load_s = time.perf_counter() - t
        t = time.perf_counter()
        claimed: list[Any] = []
        while batch := await store.claim("w1", 100, 600):
            claimed += batch
        claim_s = time.perf_counter() - t
        lat = []
        for row in claimed[:2000]:
            t = time.perf_counter()
            ok = await store.finish(row.lease, outcome="completed", line='{"id":"x"}')
            lat.append(time.perf_counter() - t)
            assert ok
        t = time.perf_counter()
        exported = sum([1 async for _ in store.export()])
        export_s = time.perf_counter() - t
    return {"rows": rows, "load_rows_per_s": rows / load_s, "claim_rows_per_s": rows / claim_s,
            "claim_batch_ms": claim_s / max(1, rows / 100) * 1e3,
            "finish_p50_ms": pct(lat, 0.5) * 1e3, "finish_p99_ms": pct(lat, 0.99) * 1e3,
            "export_rows_per_s": exported / export_s}


# ---------------------------------------------------------------------- main


async def run(args: argparse.Namespace, dsn: str) -> tuple[int, dict[str, Any]]:
    report: dict[str, Any] = {"machine": print_machine()}
    drv = report["driver"] = await bench_driver(dsn, args.calls, args.seconds)
    print("\n### 1. driver: UPDATE ... RETURNING on one row, autocommit\n")
    print(table(["driver", "p50 ms", "p99 ms", "client CPU µs/call", "calls/s 1 conn",
                 "calls/s 8 conns"],
                [[name, f"{d['p50_ms']:.3f}", f"{d['p99_ms']:.3f}", f"{d['cpu_us']:.0f}",
                  f"{d['per_s_1']:.0f}", f"{d['per_s_8']:.0f}"]
                 for name, d in drv.items() if d is not None]))
    res = report["reserve"] = await bench_reserve(dsn, args.seconds)
    print("\n### 2. one reservation (UPDATE ... RETURNING) on one row, every call granted\n")
    print(table(["1 connection", "8 connections, 1 process", "4 processes x 2 connections"],
                [[f"{res['per_s_1conn']:.0f}/s", f"{res['per_s_8conn']:.0f}/s",
                  f"{res['per_s_4proc_x2']:.0f}/s"]]))
    gov = report["governor"] = await bench_governor(dsn, args.rates, args.gov_seconds,
                                                    args.processes, args.burst)
    print(f"\n### 3. Governor.acquire, {args.processes} processes, burst {args.burst}, "
          f"{args.gov_seconds:g} s each\n")
    print(table(["rate", "grants", "db-clock rate (err)", "wall-clock rate (err)",
                 "max in 1 s / limit", "share min-max", "round trips/grant"],
                [[f"{g['rate']:g}", g["grants"], f"{g['db_rate']:.2f} ({g['db_error_pct']:+.2f} %)",
                  f"{g['wall_rate']:.2f} ({g['wall_error_pct']:+.2f} %)",
                  f"{g['max_in_1s']} / {g['limit_1s']:g}",
                  f"{g['share_min']:.2f}-{g['share_max']:.2f}",
                  f"{g['round_trips_per_grant']:.2f}"] for g in gov]))
    rows = report["rows"] = await bench_rows(dsn, args.rows)
    print(f"\n### 4. rows: {rows['rows']} rows\n")
    print(table(["load rows/s", "claim rows/s (batches of 100)", "ms per claim", "finish p50 ms",
                 "finish p99 ms", "export rows/s"],
                [[f"{rows['load_rows_per_s']:.0f}", f"{rows['claim_rows_per_s']:.0f}",
                  f"{rows['claim_batch_ms']:.1f}", f"{rows['finish_p50_ms']:.3f}",
                  f"{rows['finish_p99_ms']:.3f}", f"{rows['export_rows_per_s']:.0f}"]]))
    ok = all(abs(g["db_error_pct"]) <= 3 and abs(g["wall_error_pct"]) <= 3
             and g["max_in_1s"] <= g["limit_1s"] for g in gov)
    ok = ok and res["per_s_1conn"] >= 1000
    print(f"\ntargets {'met' if ok else 'MISSED'}: governor within 3 % at every rate, "
          "never above burst + rate in 1 s; >= 1,000 reservations/s on one connection")
    return (0 if ok else 3), report


def measure(args: argparse.Namespace, dsn: str) -> int:
    code, report = asyncio.run(run(args, dsn))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return code


def main() -> int:
    if sys.argv[1:2] == ["--child-reserve"]:
        dsn, key_fp, seconds, conns = sys.argv[2:6]
        print(asyncio.run(_reserve_loop(dsn, key_fp, float(seconds), int(conns))))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", help="a PostgreSQL to measure (default: a throwaway cluster)")
    p.add_argument("--calls", type=int, default=3000, help="calls for the latency figures")
    p.add_argument("--seconds", type=float, default=2.0, help="seconds per throughput figure")
    p.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")],
                   default=[10.0, 50.0, 200.0], help="governor rates to check (calls/s)")
    p.add_argument("--gov-seconds", type=float, default=4.0)
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--burst", type=int, default=5)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--json", help="save every figure here")
    args = p.parse_args()
    if args.dsn:
        return measure(args, args.dsn)
    from pg_cluster import PgCluster

    # A timeout's SIGTERM must still stop the cluster (the finally below), not orphan it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cluster = PgCluster()
    try:
        cluster.start()
        cluster.create_role_and_db()
        print(f"throwaway cluster: {cluster.bindir}, port {cluster.port} "
              f"(fsync=off, synchronous_commit=on)", flush=True)
        return measure(args, cluster.dsn)
    finally:
        cluster.close()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
