"""Smoke tests of the benchmarks: each runs at a tiny size and prints its figures.

No timing assertions here (figures come from the benchmarks themselves, see
``benchmarks/RESULTS.md``); these only prove that ``python -m bulk_engine bench`` and every
``benchmarks/bench_*.py`` script start their emulator, run, and print what they promise.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bulk_engine.bench import Cell, recommend

from pg_cluster import pg_cluster_fixture, pg_dsn_fixture  # noqa: F401 - fixtures

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
FAST = ["--processing-time", "0:0.05"]


def run(args: list[str], tmp_path: Path, timeout: float = 100) -> str:
    proc = subprocess.run(
        [sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
    )
    # Exit 3 means "ran, printed, but a target was missed": at tiny sizes that is expected.
    assert proc.returncode in (0, 3), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_recommend_picks_lowest_rate_then_smallest_concurrency_within_tolerance() -> None:
    """Within 5 % of the best: lowest rate first, then smallest concurrency; never above the key."""
    cells = [
        Cell("1:2", 10, 1, folders_per_s=4.0), Cell("1:2", 10, 4, folders_per_s=4.9),
        Cell("1:2", 20, 1, folders_per_s=4.8), Cell("1:2", 20, 4, folders_per_s=5.0),
        Cell("1:2", 30, 1, folders_per_s=6.0),  # above the key's limit of 20: never picked
    ]
    for c in cells:
        c.folders = c.completed = 10
    (rec,) = recommend(cells, key_rate=20, tolerance=0.05)
    assert rec["best"] == {"rate": 30, "concurrency": 1}
    # Within 5 % of 6.0 at or below the key's rate: none, so the best cell is reported as is.
    assert rec["recommended"]["rate"] == 30
    (rec,) = recommend(cells[:4], key_rate=20, tolerance=0.05)
    assert rec["recommended"] == {"rate": 10, "concurrency": 4, "folders_per_s": 4.9}


def test_bench_command_prints_table_plot_and_recommendation(tmp_path: Path) -> None:
    """`python -m bulk_engine bench` at a tiny grid: table, PNG (or a message), recommendation."""
    out = run(["-m", "bulk_engine", "bench", "--rate-limit", "200", "--folders", "6",
               "--concurrency", "1,2", "--rates", "200", *FAST, "--plot", "p.png",
               "--json", "b.json"], tmp_path)
    assert "folders/s" in out and "recommended" in out
    assert (tmp_path / "p.png").exists() or "matplotlib is not installed" in out
    data = json.loads((tmp_path / "b.json").read_text())
    assert len(data["cells"]) == 2 and all(c["completed"] == 6 for c in data["cells"])
    (auto,) = data["auto"]  # beside the grid, what the defaults find on their own
    assert auto["rate"] is None and auto["completed"] == 6 and "defaults" in out


def test_bench_ideal_prints_ratio_polls_and_429_share(tmp_path: Path) -> None:
    out = run([str(BENCH / "bench_ideal.py"), "--folders", "12", "--rate-limit", "200", *FAST,
               "--poll-min", "0.02", "--poll-max", "0.2", "--windows", "adaptive", "fixed",
               "--json", "i.json"], tmp_path)
    assert "wall/ideal" in out and "polls/folder" in out and "429 share" in out
    runs = json.loads((tmp_path / "i.json").read_text())["runs"]
    assert [r["window"] for r in runs] == ["adaptive", "fixed"]
    assert all(r["completed"] == 12 and r["ratio_mean_L"] > 0 for r in runs)
    assert runs[0]["window_end"]["phase"] != "fixed" and runs[1]["window_end"]["phase"] == "fixed"


def test_bench_vs_baselines_runs_all_three_clients(tmp_path: Path) -> None:
    out = run([str(BENCH / "bench_vs_baselines.py"), "--folders", "6", "--sequential-folders",
               "2", "--threads", "2", "--rate-limit", "200", *FAST, "--poll-interval", "0.05",
               "--poll-min", "0.02", "--poll-max", "0.2", "--json", "v.json"], tmp_path)
    for name in ("engine", "threadpool-2", "sequential", "extrapolated", "peak RSS"):
        assert name in out
    results = json.loads((tmp_path / "v.json").read_text())["results"]
    assert [r["completed"] for r in results] == [6, 6, 2]


def test_bench_client_cost_prints_cpu_and_loop_lag(tmp_path: Path) -> None:
    out = run([str(BENCH / "bench_client_cost.py"), "--folders", "20", "--control-seconds", "0.2",
              "--json", "c.json"],
              tmp_path)
    assert "CPU ms/folder" in out and "loop lag p50" in out
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["completed"] == 20 and data["cpu_ms_per_folder"] > 0


def test_bench_client_cost_compares_runs_with_and_without_metrics(tmp_path: Path) -> None:
    out = run([str(BENCH / "bench_client_cost.py"), "--folders", "20", "--metrics",
               "--repeat", "1", "--scrape-interval", "0.05", "--json", "m.json"], tmp_path)
    assert "without --metrics-port" in out and "metrics cost:" in out
    data = json.loads((tmp_path / "m.json").read_text())
    assert [r["completed"] for r in data["runs"]["off"] + data["runs"]["on"]] == [20, 20]
    assert data["runs"]["on"][0]["scrapes"] >= 1 and data["runs"]["off"][0]["scrapes"] == 0


@pytest.mark.timeout(180)
def test_bench_scale_prints_rss_for_rows_and_big_file(tmp_path: Path) -> None:
    out = run([str(BENCH / "bench_scale.py"), "--rows", "20", "40", "--distinct-folders", "5",
               "--file-mib", "4", "--json", "s.json"], tmp_path, timeout=170)
    assert "peak RSS ratio" in out and "RSS growth" in out
    data = json.loads((tmp_path / "s.json").read_text())
    assert [r["completed"] for r in data["rows"]] == [20, 40]
    assert data["big_file"]["completed"] == 1


@pytest.mark.timeout(180)
def test_bench_s3_engine_prints_bucket_against_disk(tmp_path: Path) -> None:
    """`bench_s3.py --engine` at a tiny size: the engine from a bucket (moto) and from disk."""
    out = run([str(BENCH / "bench_s3.py"), "--engine", "--folders", "4", "--json", "e.json"],
              tmp_path, timeout=170)
    assert "client CPU ms/folder" in out and "S3 requests/folder" in out
    results = json.loads((tmp_path / "e.json").read_text())["engine"]["results"]
    assert [(r["source"], r["completed"]) for r in results] == [("local", 4), ("s3", 4)]
    assert results[1]["s3_requests_per_folder"] > 1


@pytest.mark.postgres
@pytest.mark.timeout(180)
def test_bench_workers_prints_shared_rate_and_backend_overhead(tmp_path: Path,
                                                               pg_dsn: str) -> None:
    """`bench_workers.py` at a tiny size on the session's PostgreSQL: both tables."""
    out = run([str(BENCH / "bench_workers.py"), "--dsn", pg_dsn, "--folders", "6",
               "--workers", "1", "--keys", "1", "--backend-folders", "4", "--processing-time",
               "0:0.05", "--poll-min", "0.05", "--poll-max", "0.2", "--json", "w.json"],
              tmp_path, timeout=170)
    assert "steady calls/s" in out and "429 share" in out and "worker CPU ms/row" in out
    data = json.loads((tmp_path / "w.json").read_text())
    assert [c["completed"] for c in data["cells"]] == [6]
    assert [b["completed"] for b in data["backends"]] == [4, 4]


def test_bench_cap_compare_runs_three_windows_side_by_side(tmp_path: Path) -> None:
    """`bench_cap.py --compare`: the defaults, the fixed 2000 and a fixed 12, one table."""
    out = run([str(BENCH / "bench_cap.py"), "--folders", "4", "--processing-time", "0:0.05",
               "--poll-min", "0.05", "--poll-max", "0.2", "--compare", "--json", "c.json"],
              tmp_path, timeout=150)
    assert "throughput / (cap/L)" in out and "polls/folder" in out
    runs = json.loads((tmp_path / "c.json").read_text())["runs"]
    assert [r["label"] for r in runs] == ["defaults", "fixed 2000", "fixed 12"]
    assert [r["settings"]["adaptive_window"] for r in runs] == [True, False, False]
    assert [r["settings"]["max_outstanding"] for r in runs[1:]] == [2000, 12]
    assert all(r["completed"] == 4 for r in runs)
