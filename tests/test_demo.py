"""The newcomer's first command: `python -m bulk_engine demo` runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(90)
def test_demo_runs_the_whole_pipeline(tmp_path: Path) -> None:
    """The demo builds an archive, starts the emulator, writes one line per folder, exits 0."""
    proc = subprocess.run(
        [sys.executable, "-m", "bulk_engine", "demo", "--folders", "20", "--no-progress",
         "--rate-limit", "100"],
        cwd=tmp_path, capture_output=True, text=True, timeout=80,
    )
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "bulk-engine-demo" / "results.jsonl"
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 20
    assert len({r["id"] for r in lines}) == 20
    assert all(r["status"] in ("completed", "failed") for r in lines)
    assert any(r["status"] == "completed" and "decision" in r["result"] for r in lines)
    assert "Run summary" in proc.stderr
