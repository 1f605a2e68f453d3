"""Child processes for crash tests: the emulator and the engine CLI, always reaped.

``emulator_process`` starts ``python -m bulk_engine.emulator --port 0`` and yields an
``EmulatorProcess`` (its base URL, its stats over HTTP); ``EngineProcess`` runs
``python -m bulk_engine`` with the key in the environment, never on argv. Both are stopped in
``finally`` blocks, whatever the test does, so a failing test leaves no stray process behind.
Waiting is done by bounded polling of files or HTTP counters, never by fixed sleeps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bulk_engine.emulator.process import EmulatorProcess
from bulk_engine.emulator.process import emulator_process as _emulator_process

from conftest import API_KEY

_ENV_PREFIXES = ("BULK_ENGINE_",)


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child: ours without any BULK_ENGINE_* setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_PREFIXES)}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def wait_for(cond: Callable[[], bool], *, timeout: float, interval: float = 0.01,
             what: str = "condition") -> None:
    """Poll ``cond`` until it holds; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def _reap(proc: subprocess.Popen[Any], *, grace: float = 5.0) -> None:
    """Stop ``proc`` if it still runs (SIGTERM, then SIGKILL) and wait for it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------- the emulator


@contextmanager
def emulator_process(*args: str, start_timeout: float = 15.0) -> Iterator[EmulatorProcess]:
    """Run ``python -m bulk_engine.emulator --port 0 ARGS`` (key: conftest.API_KEY) until exit."""
    with _emulator_process(args, api_keys=API_KEY, env=child_env(),
                           start_timeout=start_timeout) as emu:
        yield emu


# ---------------------------------------------------------------------- the engine


class EngineProcess:
    """One ``python -m bulk_engine`` child; stdout and stderr go to files beside the output."""

    def __init__(self, manifest: Path, output: Path, base_url: str, *extra: str,
                 tag: str = "run") -> None:
        self.output = output
        self.log_path = output.with_name(f"{output.name}.{tag}.log")
        cmd = [
            sys.executable, "-m", "bulk_engine", str(manifest), "--output", str(output),
            "--base-url", base_url, "--no-progress", "--log-level", "warning",
            "--log-format", "json", *extra,
        ]
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT,
            env=child_env(BULK_ENGINE_API_KEY=API_KEY, COLUMNS="120"),
        )
        self.started = time.monotonic()

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill the child if it still runs, reap it, close its log."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._log.close()

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> int:
        """SIGKILL now; returns the exit status (-9, or the code if it had already exited)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait()

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"engine still running after {timeout} s; log:\n{self.log_text()[-3000:]}"
            ) from None

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_for_lines(self, n: int, *, timeout: float) -> None:
        """Poll until the output holds at least ``n`` complete lines (or the child exits)."""
        wait_for(lambda: count_lines(self.output) >= n or not self.running(), timeout=timeout,
                 what=f"{n} output lines")


def run_engine(manifest: Path, output: Path, base_url: str, *extra: str, timeout: float = 30.0,
               tag: str = "final") -> tuple[int, str]:
    """Run the CLI to completion; returns (exit code, its log)."""
    with EngineProcess(manifest, output, base_url, *extra, tag=tag) as eng:
        code = eng.wait(timeout)
        return code, eng.log_text()


# ---------------------------------------------------------------------- files


def count_lines(path: Path) -> int:
    """Complete lines in ``path`` (0 if missing)."""
    try:
        with path.open("rb") as fh:
            return sum(1 for line in fh if line.endswith(b"\n"))
    except FileNotFoundError:
        return 0


def journal_snapshot(journal: Path, scratch: Path) -> dict[str, Any]:
    """States of a journal left by a dead process, read from a copy (the original stays as is).

    Returns ``counts`` (rows per state), ``submitting`` (keys caught mid-POST) and
    ``output_offset``.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    copy = scratch / journal.name
    for suffix in ("", "-wal", "-shm"):
        src = Path(str(journal) + suffix)
        dst = Path(str(copy) + suffix)
        if dst.exists():
            dst.unlink()
        if src.exists():
            shutil.copyfile(src, dst)
    conn = sqlite3.connect(str(copy))
    try:
        counts = dict(conn.execute("SELECT state, COUNT(*) FROM rows GROUP BY state").fetchall())
        submitting = [r[0] for r in conn.execute("SELECT key FROM rows WHERE state='submitting'")]
        offset = conn.execute("SELECT value FROM meta WHERE key='output_offset'").fetchone()
    finally:
        conn.close()
    return {"counts": counts, "submitting": submitting,
            "output_offset": int(offset[0]) if offset else 0}


def journal_rows(journal: Path) -> dict[str, dict[str, Any]]:
    """Every journal row by key (the journal must not be open elsewhere)."""
    conn = sqlite3.connect(str(journal))
    conn.row_factory = sqlite3.Row
    try:
        return {r["key"]: dict(r) for r in conn.execute("SELECT * FROM rows")}
    finally:
        conn.close()


def journal_meta(journal: Path) -> dict[str, str]:
    """The journal's run metadata (output_offset, rewrite_pending...)."""
    conn = sqlite3.connect(str(journal))
    try:
        return dict(conn.execute("SELECT key, value FROM meta").fetchall())
    finally:
        conn.close()


def assert_clean_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every line complete and valid JSON; returns them parsed."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"torn last line: {data[-120:]!r}"
    return [json.loads(line) for line in data.splitlines()]
