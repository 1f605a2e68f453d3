"""Summaries and `report`: the math, partial files, the failed manifest that reruns, the chart."""

from __future__ import annotations

import csv
import io
import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from bulk_engine import report, vocab
from bulk_engine.cli import main
from bulk_engine.errors import ConfigError
from bulk_engine.manifest import RowDefaults, iter_manifest
from bulk_engine.models import BadRow, Job
from bulk_engine.report import read_results, render_summary, summarize_file, write_chart
from bulk_engine.stats import LatencyHistogram, Summary

pytestmark = pytest.mark.timeout(30)


def _line(i: int, status: str = "completed", **kw: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "id": f"r{i}", "folder": f"folders/f{i}", "status": status,
        "result": {"decision": {"status": "approved" if i % 3 else "rejected"}}
        if status == "completed" else None,
        "error": None if status == "completed" else {"kind": "analysis_failed",
                                                     "message": "x", "http_status": 500},
        "run_id": None, "attempts": 1, "polls": 1,
        "submitted_at": "2026-01-02T03:00:00.000Z", "completed_at": "2026-01-02T03:00:10.000Z",
        "line": i + 2, "files": 2, "bytes": 100, "latency_s": 10.0,
    }
    rec.update(kw)
    return rec


def _write(path: Path, recs: list[dict[str, Any]], tail: bytes = b"") -> Path:
    with path.open("wb") as fh:
        for r in recs:
            fh.write(json.dumps(r).encode() + b"\n")
        fh.write(tail)
    return path


# ---- the histogram --------------------------------------------------------------------------


def _exact(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[int(q * (len(s) - 1))]


@pytest.mark.parametrize("dist", ["lognormal", "uniform", "bimodal"])
def test_latency_quantiles_within_two_percent(dist: str) -> None:
    """p50/p95/p99 from the histogram are within 2 % of the exact quantiles."""
    rng = random.Random(5)
    gen = {
        "lognormal": lambda: rng.lognormvariate(2.0, 1.0),
        "uniform": lambda: rng.uniform(0.5, 40.0),
        "bimodal": lambda: rng.choice((rng.gauss(3, 0.3), rng.gauss(600, 50))),
    }[dist]
    values = [max(gen(), 0.01) for _ in range(20_000)]
    h = LatencyHistogram()
    for v in values:
        h.add(v)
    for q in (0.5, 0.95, 0.99):
        got = h.quantile(q)
        assert got is not None
        assert got == pytest.approx(_exact(values, q), rel=0.02), q
    assert h.max == max(values) and h.count == len(values)
    assert h.mean == pytest.approx(sum(values) / len(values))


def test_latency_histogram_edges() -> None:
    """Empty → None; one value → that value; zero/negative/NaN durations do not break it."""
    h = LatencyHistogram()
    assert h.quantile(0.5) is None and h.mean is None
    h.add(7.25)
    assert h.quantile(0.0) == h.quantile(0.99) == 7.25  # clamped to the observed min/max
    h.add(0.0)
    h.add(-3.0)
    h.add(float("nan"))
    assert h.count == 3
    assert h.quantile(0.0) == pytest.approx(1e-4)
    assert sum(n for _, _, n in h.buckets()) == 3


# ---- the summary ----------------------------------------------------------------------------


def test_summary_math() -> None:
    """Counts by status, decision and error kind; polls per folder; throughput; resubmits."""
    s = Summary()
    for i in range(6):
        s.add(_line(i, polls=i % 3, latency_s=float(i + 1),
                    completed_at=f"2026-01-02T03:00:{10 + 2 * i:02d}.000Z"))
    s.add(_line(6, "failed", attempts=3, polls=4, possible_duplicate=True))
    s.add({"id": "bad", "status": "failed", "error": {"kind": "folder_missing"},
           "completed_at": "2026-01-02T03:00:30.000Z", "polls": True, "attempts": None})
    j = s.to_json()
    assert j["rows"] == 8
    assert j["by_status"] == {"completed": 6, "failed": 2}
    assert j["by_decision"] == {"approved": 4, "rejected": 2}
    assert j["error_kinds"] == {"analysis_failed": 1, "folder_missing": 1}
    # polls: rows with polls > 0 only: 1, 2, 1, 2 (i=1,2,4,5) and 4 → 10 / 5
    assert j["polls_per_folder"] == 2.0 and j["polls_total"] == 10 and j["max_polls"] == 4
    assert j["resubmitted_rows"] == 1 and j["possible_duplicates"] == 1
    assert j["files"] == 14 and j["bytes"] == 700
    assert j["span_s"] == 30.0  # first submit 03:00:00 to last completion 03:00:30
    assert j["rows_per_s"] == pytest.approx(8 / 30, abs=1e-3)
    assert j["latency_s"]["max"] == 10.0
    assert j["latency_s"]["p50"] == pytest.approx(4.0, rel=0.02)


def test_summary_extra_from_the_engine_wins() -> None:
    """The engine's counters (429s, retries, duplicates) override or complete the file's."""
    s = Summary()
    s.add(_line(1))
    s.extra.update({"throttled_429": 4, "retries": 9, "possible_duplicates": 2})
    j = s.to_json()
    assert (j["throttled_429"], j["retries"], j["possible_duplicates"]) == (4, 9, 2)
    buf = io.StringIO()
    render_summary(j, Console(file=buf, width=120, color_system=None))
    text = buf.getvalue()
    for want in ("429s · 503s", "retries", "possible duplicates", "latency p50 / p95 / p99"):
        assert want in text


# ---- reading files --------------------------------------------------------------------------


def test_partial_file_with_torn_lines(tmp_path: Path) -> None:
    """A torn last line and a garbage line are skipped and counted; blank lines ignored."""
    recs = [_line(i) for i in range(5)]
    path = _write(tmp_path / "r.jsonl", recs, tail=b'\n[1, 2]\n\x00\x00\x00{"id": "r9", "sta')
    out = summarize_file(path)
    assert out["rows"] == 5
    assert out["torn_lines"] == 2


def test_report_matches_the_live_summary(tmp_path: Path) -> None:
    """Reading the lines back gives the summary the engine built from the same lines."""
    recs = [_line(i, polls=1 + i % 4, latency_s=1.0 + i) for i in range(40)]
    recs += [_line(40 + i, "failed") for i in range(3)]
    live = Summary()
    for r in recs:
        live.add(r)
    from_file = summarize_file(_write(tmp_path / "r.jsonl", recs))
    assert from_file.pop("torn_lines") == 0
    assert from_file.pop("duplicate_lines") == 0
    assert from_file == live.to_json()


# ---- the failed manifest --------------------------------------------------------------------


def _archive(root: Path, n: int) -> Path:
    """A manifest with relative folders and per-row columns; folders with one file each."""
    (root / "folders").mkdir(parents=True)
    with (root / "manifest.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "folder", "use_case", "payload"])
        for i in range(n):
            (root / "folders" / f"f{i}").mkdir()
            (root / "folders" / f"f{i}" / "doc.pdf").write_bytes(b"%PDF-1.4 " + bytes([i]))
            w.writerow([f"r{i}", f"folders/f{i}", "credit" if i % 2 else "", json.dumps({"n": i})])
    return root / "manifest.csv"


def _rows(manifest: Path) -> list[Job | BadRow]:
    return list(iter_manifest(manifest, defaults=RowDefaults(use_case="rental"),
                              max_file_size=1 << 20))


def test_failed_manifest_from_paths_reruns_from_anywhere(tmp_path: Path) -> None:
    """Lines with `path`: the new manifest has absolute folders that list the same files."""
    original = _archive(tmp_path / "orig", 4)
    results = [_line(0), _line(1, "failed", path=str(tmp_path / "orig/folders/f1")),
               _line(2, "failed", path=str(tmp_path / "orig/folders/f2")), _line(3)]
    path = _write(tmp_path / "r.jsonl", results)
    dest = tmp_path / "elsewhere" / "failed.csv"
    out = summarize_file(path, failed_manifest=dest)
    assert out["failed_manifest"]["rows"] == 2
    jobs = _rows(dest)
    assert [j.id for j in jobs] == ["r1", "r2"]
    for j in jobs:
        assert isinstance(j, Job)
        assert j.path == original.parent / "folders" / f"f{j.id[1:]}"
        assert [f.name for f in j.files] == ["doc.pdf"]


def test_failed_manifest_with_relative_folders_needs_a_base(tmp_path: Path) -> None:
    """Relative folders without `path`: a clear error, then --base-dir resolves them."""
    original = _archive(tmp_path / "orig", 3)
    path = _write(tmp_path / "r.jsonl", [_line(0), _line(1, "failed"), _line(2, "failed")])
    dest = tmp_path / "x" / "failed.csv"
    with pytest.raises(ConfigError, match=r"relative folder \(e\.g\. 'folders/f1'\).*--base-dir"):
        summarize_file(path, failed_manifest=dest)
    assert not dest.exists()
    summarize_file(path, failed_manifest=dest, base_dir=original.parent)
    jobs = _rows(dest)
    assert [(j.id, j.path) for j in jobs] == [
        (f"r{i}", original.parent / "folders" / f"f{i}") for i in (1, 2)]


def test_failed_manifest_copies_every_column_from_the_original(tmp_path: Path) -> None:
    """With --manifest, failed rows keep use_case and payload; only folder becomes absolute."""
    original = _archive(tmp_path / "orig", 5)
    recs = [_line(i, "failed" if i in (1, 2, 4) else "completed") for i in range(5)]
    recs[4]["error"] = {"kind": "bad_payload", "message": "m", "http_status": None}
    path = _write(tmp_path / "r.jsonl", recs)
    dest = tmp_path / "failed.csv"
    out = summarize_file(path, failed_manifest=dest, manifest=original)
    assert out["failed_manifest"] == {"path": str(dest), "rows": 3, "left_out": {},
                                      "not_found_in_manifest": 0}
    with dest.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["id"] for r in rows] == ["r1", "r2", "r4"]
    assert rows[0]["use_case"] == "credit" and rows[0]["payload"] == '{"n": 1}'
    jobs = _rows(dest)
    assert all(isinstance(j, Job) for j in jobs)
    assert [j.use_case for j in jobs] == ["credit", "rental", "rental"]
    assert [j.payload for j in jobs] == [{"n": 1}, {"n": 2}, {"n": 4}]


def test_failed_manifest_leaves_out_rows_that_cannot_rerun_and_last_word_wins(
    tmp_path: Path,
) -> None:
    """Duplicate ids and unparseable rows are left out and counted; a later success clears."""
    recs = [
        _line(1, "failed", path="/a/f1"),
        _line(1, "completed"),  # a later run completed r1
        _line(2, "failed", path="/a/f2"),
        {"id": "r2", "folder": "folders/f2", "status": "failed", "line": 9,
         "error": {"kind": "duplicate_id", "message": "dup"}},
        {"id": "<line 12>", "folder": "", "status": "failed", "line": 12,
         "error": {"kind": "manifest_parse_error", "message": "quote"}},
        _line(3, "failed", folder="/abs/f3", error={"kind": "bad_analyse_type"}),
    ]
    dest = tmp_path / "failed.csv"
    rep = read_results(_write(tmp_path / "r.jsonl", recs))
    assert set(rep.failed) == {"r2", "<line 12>", "r3"}
    out = summarize_file(tmp_path / "r.jsonl", failed_manifest=dest)
    # r2's last line is the duplicate: the dup row is left out, not rerun under r2's id.
    assert out["failed_manifest"]["left_out"] == {
        "duplicate_id": 1, "manifest_parse_error": 1, "bad_analyse_type": 1}
    assert dest.read_bytes() == b"id,folder\r\n"


# ---- the chart ------------------------------------------------------------------------------


def _chart_lines(n: int) -> list[dict[str, Any]]:
    rng = random.Random(2)
    out = []
    for i in range(n):
        t = 3600 * i / n
        out.append(_line(i, latency_s=round(rng.lognormvariate(1.5, 0.6), 3),
                         completed_at=f"2026-01-02T{3 + int(t // 3600):02d}:"
                                      f"{int(t % 3600 // 60):02d}:{int(t % 60):02d}.000Z"))
    return out


def test_chart_png_is_written(tmp_path: Path) -> None:
    """--chart writes a PNG with throughput over time and the latency histogram."""
    pytest.importorskip("matplotlib")
    path = _write(tmp_path / "r.jsonl", _chart_lines(2000))
    dest = tmp_path / "charts" / "run.png"
    write_chart(read_results(path).summary, dest, title="test run")
    data = dest.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    empty = tmp_path / "empty.png"
    write_chart(Summary(), empty)  # no data: a chart saying so, not a crash
    assert empty.read_bytes()[:4] == b"\x89PNG"


def test_chart_without_matplotlib_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without matplotlib: exit 1 and how to install it, no traceback."""
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)
    path = _write(tmp_path / "r.jsonl", [_line(0)])
    assert main(["report", str(path), "--chart", str(tmp_path / "c.png")]) == 1
    err = capsys.readouterr().err
    assert "pip install 'bulk-engine[plot]'" in err and "Traceback" not in err


# ---- the report command ---------------------------------------------------------------------


def test_report_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`report FILE --json --stats-json` prints and writes the same summary; exit 0."""
    path = _write(tmp_path / "r.jsonl", [_line(0), _line(1, "failed", path="/x/f1")],
                  tail=b'{"torn')
    stats = tmp_path / "s.json"
    fm = tmp_path / "f.csv"
    assert main(["report", str(path), "--json", "--stats-json", str(stats),
                 "--failed-manifest", str(fm)]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert printed == json.loads(stats.read_text())
    assert printed["rows"] == 2 and printed["torn_lines"] == 1
    assert printed["failed_manifest"]["rows"] == 1
    assert "failed manifest: 1 row(s)" in captured.err
    assert fm.read_text().splitlines() == ["id,folder", "r1,/x/f1"]


def test_report_command_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing file or a bad flag is exit 1 with a message, never a traceback or exit 2."""
    assert main(["report", str(tmp_path / "nope.jsonl")]) == 1
    assert "does not exist" in capsys.readouterr().err
    path = _write(tmp_path / "r.jsonl", [_line(0)])
    assert main(["report", str(path), "--bogus"]) == 1
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert main(["report", str(path), "--manifest", "m.csv"]) == 1
    assert "--manifest is used with --failed-manifest" in capsys.readouterr().err


def test_duplicate_lines_are_counted_and_shown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two runs appended to one output: every line repeating a row is counted (`duplicate_lines`)
    and shown; a manifest's own duplicate ids (duplicate_id lines) are not repeats."""
    run = [_line(i) for i in range(4)] + [
        {"id": "r1", "folder": "folders/f1", "status": "failed", "line": 9,
         "error": {"kind": "duplicate_id", "message": "dup"}}]
    single = _write(tmp_path / "one.jsonl", run)
    assert read_results(single).duplicate_lines == 0
    twice = _write(tmp_path / "two.jsonl", run + run)
    rep = read_results(twice)
    assert rep.duplicate_lines == 5 and rep.summary.rows == 10
    assert main(["report", str(twice), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["duplicate_lines"] == 5
    assert main(["report", str(twice)]) == 0
    out = capsys.readouterr().out
    assert "duplicate lines" in out and "5 line(s) repeat a row" in out


@pytest.mark.parametrize("content", [
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00" + bytes(range(256)) * 4,
    b"id,folder\nr1,folders/f1\nr2,folders/f2\n",  # the manifest given instead of the output
    b'{\n  "rows": 3,\n  "by_status": {"completed": 3}\n}\n',  # a --stats-json file
    b"\x00" * 5000 + b"\n",
    b"\xff\xfe" + b"\x00garbage" * 100,  # no newline at all, and not the start of a JSON line
])
def test_report_refuses_a_file_that_is_not_an_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    """A binary file, a CSV or a JSON document is not a partial output: exit 1, a clear
    message naming the file, no traceback (it used to report 0 rows and exit 0)."""
    path = tmp_path / "not-an-output.bin"
    path.write_bytes(content)
    assert main(["report", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path} is not a bulk_engine output" in err.replace("\n", "") and "Traceback" not in err
    with pytest.raises(ConfigError, match="is not a bulk_engine output"):
        read_results(path)


@pytest.mark.parametrize("content", [b"", b"\n\n", b'{"id": "r0", "folder": "f0", "sta'])
def test_report_on_an_empty_or_just_started_output_is_fine(
    tmp_path: Path, content: bytes
) -> None:
    """An empty output, or one whose first line is still being written, is a partial output."""
    path = tmp_path / "r.jsonl"
    path.write_bytes(content)
    assert main(["report", str(path), "--json"]) == 0
    assert read_results(path).summary.rows == 0


def test_report_skips_an_endless_line_without_holding_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A "line" longer than MAX_LINE_BYTES is read in chunks, skipped, counted once as torn;
    the lines after it are read as usual."""
    path = _write(tmp_path / "r.jsonl", [_line(0)], tail=b"x" * 1000 + b"\n")
    with path.open("ab") as fh:
        fh.write(json.dumps(_line(1)).encode() + b"\n")
    assert max(len(x) for x in path.read_bytes().splitlines() if x.startswith(b"{")) < 400
    for limit in (400, 1 << 20):
        monkeypatch.setattr(report, "MAX_LINE_BYTES", limit)
        rep = read_results(path)
        assert (rep.summary.rows, rep.torn_lines) == (2, 1), limit


def test_rerun_kinds_come_from_the_vocabulary() -> None:
    """The failed manifest's left-out kinds are vocab's lists, not a copy kept by hand."""
    assert report.NOT_RERUNNABLE is vocab.NOT_RERUNNABLE_KINDS
    assert report.BAD_COLUMNS is vocab.BAD_COLUMN_KINDS
