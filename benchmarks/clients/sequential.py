"""Baseline (a): the documented example loop, one folder after another.

This is ``reference/seed-async-api.txt``'s example wrapped in a loop over a manifest: submit the
folder (``requests``, multipart, ``asynchronous: true``), then retrieve, and while the answer is
202 sleep a fixed ``--poll-interval`` and retrieve again. Two additions, both needed to finish a
run: a 429/503 answer sleeps ``Retry-After`` and repeats the call (the example would raise; a
repeated submit reopens the files, since the first attempt consumed them), and each outcome is
written as a JSON line (``id``, ``status``, ``polls``, ``latency_s``).

    BULK_ENGINE_API_KEY=... python benchmarks/clients/sequential.py MANIFEST --base-url URL \\
        --output out.jsonl --poll-interval 0.5
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import requests


def call(fn, *args, **kw):  # type: ignore[no-untyped-def]
    """One request without a file body; 429/503 sleep Retry-After (default 1 s), go again."""
    while True:
        resp = fn(*args, **kw)
        if resp.status_code in (429, 503):
            time.sleep(float(resp.headers.get("Retry-After", "1")))
            continue
        return resp


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("manifest", type=Path)
    p.add_argument("--base-url", required=True)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--poll-interval", type=float, default=10.0)
    ns = p.parse_args()
    base_url = ns.base_url
    headers = {"api-key": os.environ["BULK_ENGINE_API_KEY"]}
    payload = {"analyse_type": ["decision"], "use_case": "rental", "asynchronous": True}
    with ns.manifest.open(newline="", encoding="utf-8") as fh, ns.output.open("w") as out:
        for row in csv.DictReader(fh):
            folder = ns.manifest.parent / row["folder"]
            paths = [f for f in sorted(folder.iterdir()) if f.is_file()]
            data = {"payload": json.dumps(payload)}
            t0 = time.time()
            while True:  # a multipart body is consumed by its attempt: reopen files each time
                handles = [f.open("rb") for f in paths]
                files = [("documents", (f.name, h)) for f, h in zip(paths, handles, strict=True)]
                submit = requests.post(f"{base_url}/case", headers=headers, files=files,
                                       data=data, timeout=120)
                for h in handles:
                    h.close()
                if submit.status_code not in (429, 503):
                    break
                time.sleep(float(submit.headers.get("Retry-After", "1")))
            submit.raise_for_status()
            retrieve_token = submit.json()["retrieve_token"]
            polls = 0
            while True:
                retrieve = call(requests.post, f"{base_url}/case/retrieve", headers=headers,
                                json={"retrieve_token": retrieve_token}, timeout=120)
                polls += 1
                if retrieve.status_code == 200:
                    result = retrieve.json()
                    break
                if retrieve.status_code != 202:
                    raise RuntimeError(retrieve.text)
                time.sleep(ns.poll_interval)
            out.write(json.dumps({"id": row["id"], "status": "completed", "result": result,
                                  "polls": polls, "latency_s": round(time.time() - t0, 3)})
                      + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
