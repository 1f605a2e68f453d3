"""The newcomer's first command: `python -m bulk_engine demo` runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bulk_engine.cli import main
from bulk_engine.demo import MARKER, _fresh_workdir
from bulk_engine.logs import reset_logging


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
    assert (tmp_path / "bulk-engine-demo" / MARKER).is_file()  # a rerun may recreate it


def test_demo_never_deletes_a_directory_it_did_not_make(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--dir` is deleted and recreated only if empty or made by an earlier demo; otherwise the
    demo refuses (exit 1) before touching anything."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.pdf").write_bytes(b"%PDF-1.4 years of work")
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    try:
        assert main(["demo", "--dir", str(precious), "--folders", "1"]) == 1
        assert "was not made by the demo" in capsys.readouterr().err
        assert main(["demo", "--dir", str(a_file), "--folders", "1"]) == 1
        assert "exists and is not a directory" in capsys.readouterr().err
    finally:
        reset_logging()
    assert (precious / "thesis.pdf").read_bytes() == b"%PDF-1.4 years of work"
    assert a_file.read_text() == "not a directory"


def test_demo_recreates_its_own_directory(tmp_path: Path) -> None:
    """A directory the demo made (it holds the marker) is emptied for the next demo."""
    workdir = tmp_path / "bulk-engine-demo"
    _fresh_workdir(workdir)
    (workdir / "results.jsonl").write_text("{}\n")
    _fresh_workdir(workdir)
    assert sorted(p.name for p in workdir.iterdir()) == [MARKER]
