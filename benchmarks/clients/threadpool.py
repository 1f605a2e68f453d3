"""Baseline (b): a hand-written ``requests`` + ``ThreadPoolExecutor`` client.

What a user would write next: ``--threads`` workers, each taking one folder end to end (submit,
then poll every fixed ``--poll-interval`` until 200). Every 429/503 answer is honoured: the
worker sleeps ``Retry-After`` (default 1 s) and repeats the call (a repeated submit reopens
the files: the first attempt consumed them). One ``requests.Session`` per
thread (connection reuse), no client-side rate limiter, no learning. A failed folder is written
as ``failed``; results are written by the main thread as futures complete.

    BULK_ENGINE_API_KEY=... python benchmarks/clients/threadpool.py MANIFEST --base-url URL \\
        --output out.jsonl --threads 32 --poll-interval 0.5
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import requests

_local = threading.local()


def session() -> requests.Session:
    s = getattr(_local, "session", None)
    if s is None:
        s = _local.session = requests.Session()
    return s


def call(method: str, url: str, **kw: Any) -> requests.Response:
    """One request without a file body; 429/503 sleep Retry-After and go again."""
    while True:
        resp = session().request(method, url, **kw)
        if resp.status_code in (429, 503):
            time.sleep(float(resp.headers.get("Retry-After", "1")))
            continue
        return resp


def process(base_url: str, headers: dict[str, str], row: dict[str, str], folder: Path,
            interval: float) -> dict[str, Any]:
    payload = {"analyse_type": ["decision"], "use_case": "rental", "asynchronous": True}
    t0 = time.time()
    paths = [f for f in sorted(folder.iterdir()) if f.is_file()]
    while True:  # a multipart body is consumed by its attempt: reopen the files for each one
        handles = [f.open("rb") for f in paths]
        try:
            files = [("documents", (f.name, h)) for f, h in zip(paths, handles, strict=True)]
            submit = session().post(f"{base_url}/case", headers=headers, files=files,
                                    data={"payload": json.dumps(payload)}, timeout=120)
        finally:
            for h in handles:
                h.close()
        if submit.status_code not in (429, 503):
            break
        time.sleep(float(submit.headers.get("Retry-After", "1")))
    if submit.status_code != 202:
        return {"id": row["id"], "status": "failed", "error": submit.text[:200], "polls": 0}
    token = submit.json()["retrieve_token"]
    polls = 0
    while True:
        time.sleep(interval)
        r = call("POST", f"{base_url}/case/retrieve", headers=headers,
                 json={"retrieve_token": token}, timeout=120)
        polls += 1
        if r.status_code == 200:
            return {"id": row["id"], "status": "completed", "result": r.json(), "polls": polls,
                    "latency_s": round(time.time() - t0, 3)}
        if r.status_code != 202:
            return {"id": row["id"], "status": "failed", "error": r.text[:200], "polls": polls}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("manifest", type=Path)
    p.add_argument("--base-url", required=True)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--poll-interval", type=float, default=10.0)
    ns = p.parse_args()
    headers = {"api-key": os.environ["BULK_ENGINE_API_KEY"]}
    with ns.manifest.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    with ThreadPoolExecutor(ns.threads) as pool, ns.output.open("w") as out:
        futures = [pool.submit(process, ns.base_url, headers, row,
                               ns.manifest.parent / row["folder"], ns.poll_interval)
                   for row in rows]
        for fut in as_completed(futures):
            out.write(json.dumps(fut.result()) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
