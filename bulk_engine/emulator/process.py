"""The emulator in a child process (``python -m bulk_engine.emulator --port 0``).

For benchmarks and crash tests, where the emulator must not share the engine's CPU or die with
it. The keys travel in the environment, never on argv; the child is stopped (SIGTERM, then
SIGKILL) and reaped on exit, whatever happened inside the ``with`` block.
"""

from __future__ import annotations

import json
import math
import os
import select
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["EmulatorProcess", "emulator_process"]

_MARKER = "listening on "


@dataclass
class EmulatorProcess:
    """A running emulator child: its base URL, and its counters over HTTP."""

    proc: subprocess.Popen[str]
    base_url: str
    flags: list[str] = field(default_factory=list)
    log_path: Path | None = None

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.base_url + path, timeout=30) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict[str, Any]:
        """``GET /_emulator/stats``."""
        return self.get("/_emulator/stats")  # type: ignore[no-any-return]

    def submissions(self) -> list[dict[str, Any]]:
        """``GET /_emulator/submissions``: every submission that created a run."""
        return self.get("/_emulator/submissions")["submissions"]  # type: ignore[no-any-return]

    def cpu_seconds(self) -> float:
        """CPU seconds (user + system) the child has used so far (Linux /proc; else NaN)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return math.nan
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def emulator_process(
    flags: Sequence[str],
    *,
    api_keys: str,
    log_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    start_timeout: float = 30.0,
) -> Iterator[EmulatorProcess]:
    """Run the emulator with ``flags`` on a free port; yield it once it listens; then stop it.

    ``api_keys`` (comma-separated) goes in ``BULK_ENGINE_EMULATOR_API_KEYS``; stderr goes to
    ``log_path`` (or nowhere).
    """
    cmd = [sys.executable, "-m", "bulk_engine.emulator", "--port", "0", *flags]
    child_env = dict(os.environ if env is None else env)
    child_env["BULK_ENGINE_EMULATOR_API_KEYS"] = api_keys
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    log = log_path.open("w") if log_path is not None else None
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                stderr=log if log is not None else subprocess.DEVNULL,
                                text=True, env=child_env)
    finally:
        if log is not None:
            log.close()  # the child holds its own copy
    try:
        url = _read_url(proc, start_timeout, log_path)
        yield EmulatorProcess(proc, url, list(flags), log_path)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _read_url(proc: subprocess.Popen[str], timeout: float, log_path: Path | None) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = ""
    while _MARKER not in line:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            tail = log_path.read_text()[-2000:] if log_path is not None else ""
            raise RuntimeError(f"the emulator did not start (exit {proc.poll()}): {tail}")
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                continue
    return line.split(_MARKER, 1)[1].split()[0]
