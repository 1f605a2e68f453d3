"""Prometheus metrics: scraped during a run against the emulator, parsed with
prometheus_client's own parser, equal to the end-of-run summary once the run is over."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bulk_engine.admin import AdminServer
from bulk_engine.client import ClientStats
from bulk_engine.config import Settings
from bulk_engine.emulator import EmulatorConfig, run_emulator
from bulk_engine.engine import Engine
from bulk_engine.metrics import EngineCollector, render
from bulk_engine.stats import Summary

from archive_factory import make_archive
from conftest import API_KEY, engine_settings, read_lines
from live import run_with_admin, samples, scrape, until, value

pytestmark = pytest.mark.timeout(90)

async def test_metrics_during_a_run_parse_and_agree_with_the_summary_at_the_end(
        tmp_path: Path) -> None:
    """Scraped mid-run the exposition parses, with the documented types and bounded labels;
    scraped after the run, every figure equals the end-of-run summary's."""
    n = 60
    root = tmp_path / "a"
    manifest = make_archive(root, n - 1, seed=21)
    with manifest.open("a", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerow(["gone", "no/such/folder"])  # a bad row: folder_missing
    cfg = EmulatorConfig(api_keys=(API_KEY,), processing_time=(0.05, 0.15), fail_rate=0.2,
                         rate_limit=60, burst=4, seed=5)
    seen: dict[str, Any] = {}

    async with run_emulator(cfg) as emu:
        engine = Engine(engine_settings(emu.base_url, tmp_path / "out.jsonl", rate_limit=100,
                                        burst=10, max_failure_rate=1.0), manifest)

        async def body(server: AdminServer, finished: anyio.Event) -> None:
            await until(lambda: engine.statistics().finisher.done >= 5, what="5 rows done")
            seen["during"] = await scrape(server)
            await finished.wait()
            seen["after"] = await scrape(server)

        result = await run_with_admin(engine, body, rows_total=n)

    # During the run: the families and their types; rows not all done yet.
    _, during = seen["during"]
    types = {name: fam["type"] for name, fam in during.items()}
    for name in ("bulk_engine_rows", "bulk_engine_api_calls", "bulk_engine_api_throttled",
                 "bulk_engine_api_retries", "bulk_engine_uploaded_bytes",
                 "bulk_engine_stuck_analyses", "bulk_engine_rows_skipped"):
        assert types[name] == "counter", name
    for name in ("bulk_engine_uploads_in_flight", "bulk_engine_outstanding_folders",
                 "bulk_engine_outstanding_limit", "bulk_engine_upload_slots",
                 "bulk_engine_rate_limit_configured_calls_per_second",
                 "bulk_engine_rate_limit_current_calls_per_second",
                 "bulk_engine_oldest_outstanding_age_seconds", "bulk_engine_start_time_seconds",
                 "bulk_engine_manifest_rows", "bulk_engine_progress_ratio"):
        assert types[name] == "gauge", name
    assert types["bulk_engine_row_latency_seconds"] == "histogram"
    assert types["bulk_engine_row_polls"] == "histogram"
    assert types["process_cpu_seconds"] == "counter"
    assert 0 < sum(s.value for s in samples(during, "bulk_engine_rows_total")) < n
    assert value(during, "bulk_engine_outstanding_limit") == 2000
    assert value(during, "bulk_engine_manifest_rows") == n
    assert abs(value(during, "bulk_engine_start_time_seconds") - time.time()) < 60
    labels = {k for name in during for s in during[name]["samples"] for k in s.labels}
    assert labels <= {"status", "error_kind", "endpoint", "code", "le"}

    # After the run: the summary's figures.
    text, after = seen["after"]
    summary = result.summary.to_json()
    assert result.exit_code == 2
    rows = {(s.labels["status"], s.labels["error_kind"]): s.value
            for s in samples(after, "bulk_engine_rows_total")}
    assert sum(v for (st, _), v in rows.items() if st == "completed") == \
        summary["by_status"]["completed"]
    assert {k: v for (st, k), v in rows.items() if st == "failed"} == summary["error_kinds"]
    assert summary["error_kinds"]["folder_missing"] == 1 and "analysis_failed" in summary[
        "error_kinds"]
    assert sum(rows.values()) == summary["rows"] == n == len(read_lines(tmp_path / "out.jsonl"))
    assert value(after, "bulk_engine_progress_ratio") == 1.0
    calls = {(s.labels["endpoint"], s.labels["code"]): s.value
             for s in samples(after, "bulk_engine_api_calls_total")}
    assert sum(v for (e, _), v in calls.items() if e == "submit") == summary["submits"]
    assert sum(v for (e, _), v in calls.items() if e == "retrieve") == summary["polls"]
    assert sum(v for (_, c), v in calls.items() if c == "429") == summary["throttled_429"] > 0
    assert value(after, "bulk_engine_api_throttled_total") == summary["throttled_429"]
    assert value(after, "bulk_engine_api_retries_total") == summary["retries"] > 0
    assert value(after, "bulk_engine_uploaded_bytes_total") == summary["bytes_uploaded"] > 0
    assert value(after, "bulk_engine_rows_read_total") == summary["rows_read"] == n
    assert value(after, "bulk_engine_stuck_analyses_total") == summary["stuck_analyses"]
    assert value(after, "bulk_engine_resubmits_total") == summary["resubmits"]
    assert round(value(after, "bulk_engine_rate_limit_current_calls_per_second"), 3) == \
        summary["final_rate_limit"]
    assert value(after, "bulk_engine_outstanding_folders") == 0
    assert value(after, "bulk_engine_uploads_in_flight") == 0
    # Histograms: counts and sums are the summary's; buckets are cumulative.
    lat = result.summary.latency
    assert value(after, "bulk_engine_row_latency_seconds_count") == lat.count == n - 1
    assert value(after, "bulk_engine_row_latency_seconds_sum") == pytest.approx(lat.total)
    assert value(after, "bulk_engine_row_latency_seconds_sum") / lat.count == pytest.approx(
        summary["latency_s"]["mean"], abs=1e-3)
    assert value(after, "bulk_engine_row_polls_count") == result.summary.polled_rows
    assert value(after, "bulk_engine_row_polls_sum") == summary["polls_total"]
    assert round(value(after, "bulk_engine_row_polls_sum")
                 / value(after, "bulk_engine_row_polls_count"), 3) == summary["polls_per_folder"]
    for hist in ("bulk_engine_row_latency_seconds_bucket", "bulk_engine_row_polls_bucket"):
        counts = [s.value for s in samples(after, hist)]
        assert counts == sorted(counts) and counts[-1] == samples(after, hist)[-1].value
    # No secret, no token, no row id in the exposition.
    assert API_KEY not in text and "gAAAA" not in text and "case-0" not in text


def test_latency_buckets_read_the_summary_s_log_buckets() -> None:
    """le buckets count a row when the middle of its 2 % bucket is at most le: the summary's
    own reading; +Inf is every row, the sum is the summary's total."""
    summary = Summary()
    for lat in (0.05, 0.3, 0.3, 0.9, 0.97, 7.0, 4000.0):
        summary.add({"status": "completed", "latency_s": lat, "polls": 2})

    engine = Engine(Settings(api_key="k", root=Path(".")), None)  # never run: zeros
    engine.summary = summary
    text = render(EngineCollector(engine), process=False).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    buckets = {s.labels["le"]: s.value for s in fams["bulk_engine_row_latency_seconds"].samples
               if s.name.endswith("_bucket")}
    assert buckets["0.1"] == 1 and buckets["0.5"] == 3 and buckets["1.0"] == 5
    assert buckets["10.0"] == 6 and buckets["3600.0"] == 6 and buckets["+Inf"] == 7
    polls = {s.labels["le"]: s.value for s in fams["bulk_engine_row_polls"].samples
             if s.name.endswith("_bucket")}
    assert polls["1.0"] == 0 and polls["2.0"] == 7
    assert "bulk_engine_manifest_rows" not in fams  # unknown total: no gauge, not a zero


def test_the_grafana_dashboard_reads_only_metrics_the_engine_serves() -> None:
    """Every bulk_engine_* series a panel of docs/grafana-dashboard.json queries is one the
    exposition holds (the ones shown once known included)."""
    import json
    import re

    dash = json.loads((Path(__file__).resolve().parents[1] / "docs" / "grafana-dashboard.json")
                      .read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(bulk_engine_[a-z0-9_]+|process_[a-z_]+)",
                                                   e)}
    engine = Engine(Settings(api_key="k", root=Path(".")), None)
    engine.summary.add({"status": "completed", "latency_s": 1.0, "polls": 1})
    engine.client = type("C", (), {"stats": ClientStats()})()  # type: ignore[assignment]
    engine.client.stats.answers["submit", "202"] += 1
    text = render(EngineCollector(engine, rows_total=lambda: 10)).decode()
    served = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    served.add("bulk_engine_stuck_threshold_seconds")  # served once the policy has learned
    assert len(dash["panels"]) >= 12 and used
    assert sorted(used - served) == []
