"""Shared helpers of the benchmark scripts (not part of the package).

- ``emulator(...)``: the emulator in its own process (``python -m bulk_engine.emulator --port 0``),
  its URL read from the line it prints, its counters from ``GET /_emulator/stats``.
- ``run_child(cmd)``: a client as a subprocess, with wall time and the child's own
  ``getrusage`` (user + system CPU, peak RSS) taken from ``os.wait4``.
- ``engine_cmd(...)``: the engine's CLI command line for a subprocess run.
- archives (``sample_archive``, ``reuse_manifest``), output analysis (``read_output``), machine
  description (``machine``), percentiles and markdown tables.

Every script imports this module as ``from common import ...`` (``benchmarks/`` is the script's
own directory, so it is on ``sys.path`` when the script runs).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bulk_engine.emulator.process import EmulatorProcess, emulator_process
from bulk_engine.report import read_results
from bulk_engine.stats import Summary

REPO = Path(__file__).resolve().parents[1]
API_KEY = "bench-key-0123456789"


# ---- the emulator, in its own process -----------------------------------------------------------


def emulator_flags(
    *,
    rate_limit: float | None = None,
    burst: int | None = None,
    processing: tuple[float, float] = (0.0, 0.0),
    max_parallel: int = 100_000,
    max_upload_bytes: int | None = None,
    seed: int = 1,
    extra: Sequence[str] = (),
) -> list[str]:
    """The emulator's command-line flags for a benchmark (keys come from the environment)."""
    flags = [
        "--processing-time", f"{processing[0]:g}:{processing[1]:g}",
        "--max-parallel-analyses", str(max_parallel),
        "--rate-limit", "none" if rate_limit is None else f"{rate_limit:g}",
        "--seed", str(seed),
    ]
    if burst is not None:
        flags += ["--burst", str(burst)]
    if max_upload_bytes is not None:
        flags += ["--max-upload-bytes", str(max_upload_bytes)]
    return flags + list(extra)


@contextlib.contextmanager
def emulator(flags: Sequence[str], *, workdir: Path) -> Iterator[EmulatorProcess]:
    """Start ``python -m bulk_engine.emulator --port 0 FLAGS`` and stop it (SIGTERM) on exit."""
    with emulator_process(flags, api_keys=API_KEY, log_path=workdir / "emulator.log") as emu:
        yield emu


# ---- clients as subprocesses, with their own rusage ---------------------------------------------


@dataclass
class ChildRun:
    """A finished child process: exit status, wall seconds, CPU seconds and peak RSS (MiB)."""

    returncode: int
    wall_s: float
    user_s: float
    sys_s: float
    maxrss_mib: float
    stdout: str
    stderr: str

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s


def run_child(
    cmd: Sequence[str], *, env: dict[str, str] | None = None, workdir: Path,
    name: str = "child", timeout: float | None = None,
    sampler: Any = None,
) -> ChildRun:
    """Run ``cmd``; rusage comes from ``os.wait4`` on that one child (not all children).

    ``sampler(pid)`` is called every 50 ms while the child runs, if given.
    """
    out_path, err_path = workdir / f"{name}.stdout", workdir / f"{name}.stderr"
    full_env = dict(os.environ)
    full_env.update(env or {})
    with out_path.open("w") as out, err_path.open("w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, env=full_env)
        deadline = None if timeout is None else t0 + timeout
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                proc.kill()
                pid, status, ru = os.wait4(proc.pid, 0)
                break
            if sampler is not None:
                sampler(proc.pid)
            time.sleep(0.05)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return ChildRun(
        returncode=proc.returncode, wall_s=wall, user_s=ru.ru_utime, sys_s=ru.ru_stime,
        maxrss_mib=ru.ru_maxrss / 1024.0,  # Linux: KiB
        stdout=out_path.read_text(errors="replace"), stderr=err_path.read_text(errors="replace"),
    )


def rss_mib(pid: int) -> float:
    """Current resident set size of ``pid`` in MiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def engine_cmd(
    manifest: Path, *, base_url: str, output: Path, rate_limit: float, concurrency: int,
    poll_min: float, poll_max: float, burst: int | None = None, extra: Sequence[str] = (),
) -> list[str]:
    """``python -m bulk_engine MANIFEST ...`` for a benchmark run (key in the environment)."""
    cmd = [
        sys.executable, "-m", "bulk_engine", str(manifest), "--base-url", base_url,
        "--output", str(output), "--rate-limit", f"{rate_limit:g}",
        "--concurrency", str(concurrency), "--poll-min", f"{poll_min:g}",
        "--poll-max", f"{poll_max:g}", "--no-progress", "--log-level", "warning",
        "--stats-json", str(output.with_suffix(".stats.json")), "--seed", "1",
    ]
    if burst is not None:
        cmd += ["--burst", str(burst)]
    return cmd + list(extra)


def engine_env() -> dict[str, str]:
    return {"BULK_ENGINE_API_KEY": API_KEY}


# ---- archives -----------------------------------------------------------------------------------


def sample_archive(root: Path, n: int, *, seed: int = 0) -> Path:
    """``n`` sample folders (1–3 small PDFs, some forms) under ``root``; returns the manifest.

    Reused when ``root`` already holds an archive of that size and seed.
    """
    from bulk_engine.sample import make_sample_archive

    marker = root / f".archive-{n}-{seed}"
    manifest = root / "manifest.csv"
    if marker.exists() and manifest.exists():
        return manifest
    shutil.rmtree(root, ignore_errors=True)
    manifest = make_sample_archive(root, n, seed=seed)
    marker.touch()
    return manifest


def reuse_manifest(path: Path, folders: Sequence[Path], rows: int) -> Path:
    """A manifest of ``rows`` rows with unique ids cycling over a few ``folders``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "folder"])
        for i in range(rows):
            w.writerow([f"row-{i:07d}", str(folders[i % len(folders)])])
    return path


def subset_manifest(manifest: Path, rows: int, out: Path) -> Path:
    """The first ``rows`` data rows of ``manifest`` (folders made absolute) written to ``out``."""
    base = manifest.parent
    with manifest.open(newline="", encoding="utf-8") as src, \
            out.open("w", newline="", encoding="utf-8") as dst:
        r, w = csv.DictReader(src), csv.writer(dst)
        w.writerow(["id", "folder"])
        for i, row in enumerate(r):
            if i >= rows:
                break
            w.writerow([row["id"], str((base / row["folder"]).resolve())])
    return out


def manifest_folders(manifest: Path) -> list[tuple[str, Path]]:
    """``(id, absolute folder)`` of every row of a simple manifest."""
    base = manifest.parent
    with manifest.open(newline="", encoding="utf-8") as fh:
        return [(row["id"], (base / row["folder"]).resolve()) for row in csv.DictReader(fh)]


# ---- output analysis ----------------------------------------------------------------------------


@dataclass
class OutputStats:
    """What a benchmark reads of a JSONL output: the package's own reader (``report``)."""

    summary: Summary

    @property
    def rows(self) -> int:
        return self.summary.rows

    @property
    def completed(self) -> int:
        return self.summary.by_status.get("completed", 0)

    @property
    def failed(self) -> int:
        return self.summary.by_status.get("failed", 0)

    @property
    def polls_per_folder(self) -> float:
        s = self.summary
        return s.polls / s.polled_rows if s.polled_rows else math.nan

    def latency(self, q: float) -> float:
        """The ``q`` quantile of row latency (completed - submitted), within ~1 %."""
        v = self.summary.latency.quantile(q)
        return math.nan if v is None else v


def read_output(path: Path) -> OutputStats:
    """Counts, polls per row and row latencies of a JSONL output (``report.read_results``)."""
    return OutputStats(read_results(path).summary)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# ---- machine and reporting ----------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the figures ran on: CPUs, CPU model, Python, load average at the time."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_1m_5m_15m": [round(x, 2) for x in os.getloadavg()],
    }


def print_machine() -> dict[str, Any]:
    m = machine()
    print(f"machine: {m['nproc']} CPU ({m['cpu']}), Python {m['python']}, "
          f"load average {m['loadavg_1m_5m_15m']}")
    return m


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (pastes into RESULTS.md as is)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            if math.isnan(v):
                return "—"
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


@contextlib.contextmanager
def workdir(path: str | None, prefix: str) -> Iterator[Path]:
    """``path`` if given (kept), else a temporary directory (removed)."""
    if path:
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        yield p
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def save_json(path: str | None, data: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        print(f"saved {path}")
