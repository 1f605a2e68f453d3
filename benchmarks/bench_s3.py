"""Reading folders from S3 against reading them from local disk, side by side (issue 15).

The same sample archive (``N`` folders of 1-3 small documents) is put on local disk and in a
bucket of moto's S3 (its own process, ``tests/s3server.py``).

``--engine`` runs the real engine on each: ``python -m bulk_engine`` as a child process, once
with a manifest of the local folders and once with the same ids as ``s3://bucket/prefix/`` rows,
against the emulator in its own process (processing time 0, no rate limit: the client is the
bound). Reported per source: folders/s (the run's span, from its summary), the client's CPU per
folder (the child's user+system time from ``os.wait4``, minus a one-folder run of the same
source: the marginal cost of a folder, imports and start-up excluded), S3 requests per folder,
and the child's peak RSS (its VmHWM, sampled).

Without ``--engine``, a child process reads every folder the way a submitter does, into a sink
instead of the API: list the folder, then stream every file through an aiohttp payload, at most
``--concurrency`` folders at once (the S3 layer alone, no engine).

- ``local``: ``manifest.list_folder`` in a worker thread, files through aiohttp's file payload.
- ``s3``: ``S3Source.list_folder``, objects through ``S3ObjectPayload`` (GET with IfMatch).

Reported per source: folders/s (wall), client CPU ms per folder (the child's user+system time
over the whole read, imports excluded), MiB/s and the child's peak RSS. The S3 figures include
what moto costs the machine only as wall time: it runs in another process, on the same 2 cores.

``--clients`` measures the candidate S3 libraries instead (aiobotocore, obstore, s3fs: the
ones installed), each in its own child: CPU per LIST and per small GET, and CPU and RSS growth
while streaming one large object. That is the comparison behind docs/s3.md.

    python benchmarks/bench_s3.py --engine                # the engine, S3 against local disk
    python benchmarks/bench_s3.py                         # the layer alone, 200 folders
    python benchmarks/bench_s3.py --folders 1000 --json s3.json
    python benchmarks/bench_s3.py --clients               # pip install obstore s3fs first
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    REPO,
    emulator,
    emulator_flags,
    engine_cmd,
    engine_env,
    manifest_folders,
    md_table,
    print_machine,
    read_output,
    run_child,
    sample_archive,
    save_json,
    workdir,
)

sys.path.insert(0, str(REPO / "tests"))

CLIENTS = ("aiobotocore", "obstore", "s3fs")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folders", type=int, default=200, help="folders in the archive (200)")
    p.add_argument("--concurrency", type=int, default=8, help="folders read at once (8)")
    p.add_argument("--repeat", type=int, default=1, help="runs per source; the best is kept")
    p.add_argument("--clients", action="store_true", help="compare the S3 client libraries")
    p.add_argument("--engine", action="store_true",
                   help="the engine end to end (CLI child, emulator): S3 against local disk")
    p.add_argument("--big-mib", type=int, default=256, help="--clients: the large object (256)")
    p.add_argument("--workdir", help="keep the archive here (default: a temporary directory)")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- the children ---------------------------------------------------------------------------


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _Sink:
    """Stands in for aiohttp's StreamWriter: counts what a payload writes."""

    def __init__(self) -> None:
        self.bytes = 0

    async def write(self, chunk: bytes) -> None:
        self.bytes += len(chunk)


async def _read_folders(kind: str, manifest: Path, bucket: str, concurrency: int) -> dict[str, Any]:
    import aiohttp.payload

    from bulk_engine.manifest import list_folder
    from bulk_engine.s3 import S3Options, S3Source, S3Url

    folders = manifest_folders(manifest)
    base = manifest.parent
    sink = _Sink()
    files = 0
    sem = asyncio.Semaphore(concurrency)
    t_cpu, t_wall = time.process_time(), time.perf_counter()

    async def local(path: Path) -> int:
        entries = await asyncio.to_thread(list_folder, path, max_file_size=1 << 30,
                                          follow_symlinks=False)
        for e in entries:
            with open(e.path, "rb") as fh:  # noqa: ASYNC230 - aiohttp reads it in a thread
                await aiohttp.payload.get_payload(fh).write(sink)  # type: ignore[arg-type]
        return len(entries)

    if kind == "local":
        async def one(path: Path) -> int:
            async with sem:
                return await local(path)

        counts = await asyncio.gather(*(one(p) for _, p in folders))
    else:
        async with S3Source(S3Options(max_connections=concurrency)) as s3:
            async def one_s3(path: Path) -> int:
                rel = path.relative_to(base).as_posix()
                async with sem:
                    entries = await s3.list_folder(S3Url(bucket, rel + "/"),
                                                   max_file_size=1 << 30)
                    for e in entries:
                        await s3.payload(e).write(sink)
                    return len(entries)

            counts = await asyncio.gather(*(one_s3(p) for _, p in folders))
    files = sum(counts)
    return {
        "source": kind, "folders": len(folders), "files": files, "bytes": sink.bytes,
        "wall_s": time.perf_counter() - t_wall, "cpu_s": time.process_time() - t_cpu,
        "peak_rss_mib": _peak_rss_mib(),
    }


async def _client_child(name: str, endpoint: str, bucket: str, prefixes: list[str],
                        big_key: str, conc: int) -> dict[str, Any]:
    """One candidate library: LIST each prefix, GET each object, stream the big one."""
    t0 = time.process_time()
    ak, sk = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    chunk = 256 * 1024
    res: dict[str, Any] = {"client": name}
    sem = asyncio.Semaphore(conc)

    async def bounded(items: list[str], fn: Any) -> list[Any]:
        async def one(x: str) -> Any:
            async with sem:
                return await fn(x)
        return await asyncio.gather(*(one(x) for x in items))

    async def measure(list_one: Any, get_one: Any, stream_big: Any) -> None:
        t = time.process_time()
        listed = await bounded(prefixes, list_one)
        res["list_cpu_ms"] = (time.process_time() - t) * 1e3 / len(prefixes)
        keys = [k for ks in listed for k in ks]
        t = time.process_time()
        await bounded(keys, get_one)
        res["get_cpu_ms"] = (time.process_time() - t) * 1e3 / len(keys)
        base = peak = _rss_mib()
        t = time.process_time()
        n = 0
        async for part in stream_big():
            n += len(part)
            peak = max(peak, _rss_mib())
        res["stream_cpu_s_per_gib"] = (time.process_time() - t) / (n / 2**30)
        res["stream_rss_growth_mib"] = peak - base

    if name == "aiobotocore":
        import aiobotocore.session
        from aiobotocore.config import AioConfig

        res["import_cpu_s"] = time.process_time() - t0
        cfg = AioConfig(retries={"total_max_attempts": 1}, max_pool_connections=conc)
        async with aiobotocore.session.get_session().create_client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", config=cfg,
            aws_access_key_id=ak, aws_secret_access_key=sk,
        ) as s3:
            async def list_a(p: str) -> list[str]:
                r = await s3.list_objects_v2(Bucket=bucket, Prefix=p, Delimiter="/")
                return [o["Key"] for o in r.get("Contents", [])]

            async def get_a(k: str) -> int:
                r = await s3.get_object(Bucket=bucket, Key=k)
                async with r["Body"] as body:
                    return len(await body.read())

            async def stream_a() -> Any:
                r = await s3.get_object(Bucket=bucket, Key=big_key)
                async with r["Body"] as body:
                    async for part in body.iter_chunks(chunk):
                        yield part

            await measure(list_a, get_a, stream_a)
    elif name == "obstore":
        from datetime import timedelta

        import obstore
        from obstore.store import S3Store

        res["import_cpu_s"] = time.process_time() - t0
        store = S3Store(bucket, endpoint=endpoint, access_key_id=ak, secret_access_key=sk,
                        region="us-east-1", client_options={"allow_http": True},
                        retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=1),
                                      "backoff": {"init_backoff": timedelta(seconds=0.1),
                                                  "max_backoff": timedelta(seconds=1),
                                                  "base": 2}})

        async def list_o(p: str) -> list[str]:
            r = await obstore.list_with_delimiter_async(store, p)
            return [o["path"] for o in r["objects"]]

        async def get_o(k: str) -> int:
            r = await obstore.get_async(store, k)
            return len(await r.bytes_async())

        async def stream_o() -> Any:
            r = await obstore.get_async(store, big_key)
            async for part in r.stream(min_chunk_size=chunk):
                yield bytes(part)

        await measure(list_o, get_o, stream_o)
    elif name == "s3fs":
        import s3fs

        res["import_cpu_s"] = time.process_time() - t0
        fs = s3fs.S3FileSystem(asynchronous=True, key=ak, secret=sk, endpoint_url=endpoint,
                               client_kwargs={"region_name": "us-east-1"},
                               skip_instance_cache=True, use_listings_cache=False,
                               config_kwargs={"retries": {"total_max_attempts": 1},
                                              "max_pool_connections": conc})
        session = await fs.set_session()

        async def list_f(p: str) -> list[str]:
            r = await fs._ls(f"{bucket}/{p}", detail=True, refresh=True)
            return [o["name"].split("/", 1)[1] for o in r if o["type"] == "file"]

        async def get_f(k: str) -> int:
            return len(await fs._cat_file(f"{bucket}/{k}"))

        async def stream_f() -> Any:
            f = await fs.open_async(f"{bucket}/{big_key}", "rb")
            while part := await f.read(chunk):
                yield part
            await f.close()

        await measure(list_f, get_f, stream_f)
        await session.close()
    res["peak_rss_mib"] = _peak_rss_mib()
    return res


def child_main(argv: list[str]) -> None:
    if argv[0] == "folders":
        kind, manifest, bucket, conc = argv[1], Path(argv[2]), argv[3], int(argv[4])
        print(json.dumps(asyncio.run(_read_folders(kind, manifest, bucket, conc))))
    else:
        name, endpoint, bucket, nprefixes, big_key, conc = argv[1:7]
        prefixes = [f"f{i:05d}/" for i in range(int(nprefixes))]
        print(json.dumps(asyncio.run(
            _client_child(name, endpoint, bucket, prefixes, big_key, int(conc)))))


# ---- the parent -----------------------------------------------------------------------------


def _run(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    import subprocess

    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False,
                          timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _upload(server: Any, bucket: str, items: list[tuple[str, bytes]]) -> None:
    s3 = server.client()
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda kv: s3.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), items))


def bench_folders(args: argparse.Namespace, server: Any, work: Path) -> dict[str, Any]:
    manifest = sample_archive(work / "archive", args.folders)
    base = manifest.parent
    bucket = server.new_bucket()
    items = [(p.relative_to(base).as_posix(), p.read_bytes())
             for _, folder in manifest_folders(manifest)
             for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    _upload(server, bucket, items)
    env = {**os.environ, **server.env(), "PYTHONPATH": str(REPO)}
    results = []
    for kind in ("local", "s3"):
        runs = [_run([sys.executable, __file__, "--child", "folders", kind, str(manifest),
                      bucket, str(args.concurrency)], env) for _ in range(args.repeat)]
        results.append(min(runs, key=lambda r: r["cpu_s"]))
    rows = [[r["source"], r["folders"], r["files"], r["folders"] / r["wall_s"],
             r["cpu_s"] * 1e3 / r["folders"], r["bytes"] / 2**20 / r["wall_s"],
             r["peak_rss_mib"]] for r in results]
    print(md_table(["source", "folders", "files", "folders/s", "client CPU ms/folder",
                    "MiB/s", "peak RSS MiB"], rows))
    return {"concurrency": args.concurrency, "results": results}


def _write_manifest(path: Path, rows: list[tuple[str, str]]) -> Path:
    import csv

    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "folder"])
        w.writerows(rows)
    return path


class _HighWater:
    """The child's peak RSS, from its own VmHWM (sampled every 50 ms by ``run_child``).

    Not ``ru_maxrss`` from ``wait4``: on Linux that keeps the forking parent's peak across the
    exec, so every child would report at least this script's RSS."""

    def __init__(self) -> None:
        self.mib = 0.0

    def __call__(self, pid: int) -> None:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.mib = max(self.mib, int(line.split()[1]) / 1024)
        except OSError:
            pass


def bench_engine(args: argparse.Namespace, server: Any, work: Path) -> dict[str, Any]:
    """The engine from a bucket and from local disk: folders/s, client CPU per folder."""
    manifest = sample_archive(work / "archive", args.folders)
    base = manifest.parent
    bucket = server.new_bucket()
    folders = manifest_folders(manifest)
    items = [(p.relative_to(base).as_posix(), p.read_bytes())
             for _, folder in folders
             for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    _upload(server, bucket, items)
    rows = {
        "local": [(i, str(p)) for i, p in folders],
        "s3": [(i, f"s3://{bucket}/{p.relative_to(base).as_posix()}/") for i, p in folders],
    }
    env = {**server.env(), **engine_env(), "PYTHONPATH": str(REPO)}
    flags = emulator_flags(processing=(0.0, 0.0), max_upload_bytes=1 << 30)
    results = []
    with emulator(flags, workdir=work) as emu:
        for kind, all_rows in rows.items():
            best: dict[str, Any] | None = None
            for rep in range(args.repeat):
                runs = {}
                for n in (1, len(all_rows)):
                    m = _write_manifest(work / f"{kind}-{n}.csv", all_rows[:n])
                    out = work / f"{kind}-{n}-{rep}.jsonl"
                    cmd = engine_cmd(m, base_url=emu.base_url, output=out, rate_limit=100_000,
                                     concurrency=args.concurrency, poll_min=0.05, poll_max=0.2,
                                     extra=["--max-outstanding", "2000"])
                    hwm = _HighWater()
                    run = run_child(cmd, env=env, workdir=work, name=f"{kind}-{n}",
                                    timeout=1800, sampler=hwm)
                    if run.returncode != 0:
                        raise SystemExit(f"engine failed ({run.returncode}):\n"
                                         f"{run.stderr[-3000:]}")
                    stats = json.loads(out.with_suffix(".stats.json").read_text())
                    runs[n] = (run, stats, read_output(out), hwm.mib)
                (one, _, _, _), (run, stats, output, peak) = runs[1], runs[len(all_rows)]
                n = len(all_rows)
                r = {
                    "source": kind, "folders": n, "completed": output.completed,
                    "folders_per_s": stats["rows_per_s"], "wall_s": run.wall_s,
                    "cpu_s": run.cpu_s,
                    "cpu_ms_per_folder": (run.cpu_s - one.cpu_s) * 1e3 / (n - 1),
                    "startup_cpu_s": one.cpu_s, "peak_rss_mib": peak,
                    "s3_requests_per_folder": (stats.get("s3_list_calls", 0)
                                               + stats.get("s3_get_calls", 0)) / n,
                    "bytes": stats["bytes_uploaded"],
                }
                if best is None or r["cpu_ms_per_folder"] < best["cpu_ms_per_folder"]:
                    best = r
            assert best is not None
            results.append(best)
    table = [[r["source"], r["folders"], r["completed"], r["folders_per_s"],
              r["cpu_ms_per_folder"], r["s3_requests_per_folder"], r["startup_cpu_s"],
              r["peak_rss_mib"]] for r in results]
    print(md_table(["source", "folders", "completed", "folders/s", "client CPU ms/folder",
                    "S3 requests/folder", "start-up CPU s", "peak RSS MiB"], table))
    return {"concurrency": args.concurrency, "results": results}


def bench_clients(args: argparse.Namespace, server: Any) -> dict[str, Any]:
    import importlib.util

    bucket = server.new_bucket()
    rnd = random.Random(1)
    nprefixes = 200
    _upload(server, bucket, [(f"f{i:05d}/doc{j}.pdf", rnd.randbytes(8192))
                             for i in range(nprefixes) for j in range(3)])
    server.put_big(bucket, "big.bin", part=rnd.randbytes(1 << 20) * 8, parts=args.big_mib // 8)
    env = {**os.environ, **server.env(), "PYTHONPATH": str(REPO)}
    results = []
    for name in CLIENTS:
        if importlib.util.find_spec(name) is None:
            print(f"({name} is not installed: skipped)")
            continue
        results.append(_run([sys.executable, __file__, "--child", "client", name,
                             server.endpoint, bucket, str(nprefixes), "big.bin",
                             str(args.concurrency)], env))
    rows = [[r["client"], r["list_cpu_ms"], r["get_cpu_ms"], r["stream_cpu_s_per_gib"],
             r["stream_rss_growth_mib"], r["import_cpu_s"], r["peak_rss_mib"]] for r in results]
    print(md_table(["client", "CPU ms/LIST", "CPU ms/GET 8 KiB", "CPU s/GiB streamed",
                    "RSS growth streaming MiB", "import CPU s", "peak RSS MiB"], rows))
    return {"concurrency": args.concurrency, "big_mib": args.big_mib, "results": results}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args.child)
        return
    from s3server import running_server

    data: dict[str, Any] = {"machine": print_machine()}
    with running_server() as server, workdir(args.workdir, "bench-s3-") as work:
        if args.clients:
            data["clients"] = bench_clients(args, server)
        elif args.engine:
            data["engine"] = bench_engine(args, server, work)
        else:
            data["folders"] = bench_folders(args, server, work)
    save_json(args.json, data)


if __name__ == "__main__":
    main()
