"""The canary: every failure path run with a recognisable key, then every byte searched for it.

Paths: a refused key (401 on POST /case), server errors (503s, retrieve 500), resets, lost
answers, stalls past the timeouts, mass failure, and a crash whose exception text carries the
request headers. Run through the CLI as a subprocess (stderr, stdout, --log-file) and in-process
(logs captured in JSON and console formats); then logs, output JSONL, stats and the journal's
files (WAL included) are searched byte for byte: zero hits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import pytest
import structlog
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from bulk_engine.client import CaseClient
from bulk_engine.config import load_settings
from bulk_engine.emulator import Emulator, EmulatorConfig, run_emulator
from bulk_engine.engine import Engine
from bulk_engine.logs import configure_logging, get_logger

from archive_factory import make_archive
from conftest import engine_settings

pytestmark = pytest.mark.timeout(60)

CANARY = "CANARY-KEY-9f3b2c"
NEEDLES = (CANARY.encode(), b"9f3b2c")  # the key, and a fragment of it

# error_rate is kept low: each 503 carries Retry-After: 1, a one-second pause of the whole run.
CHAOS: dict[str, Any] = dict(error_rate=0.03, fail_rate=0.3, reset_before_body_rate=0.1,
                             drop_after_create_rate=0.1, stall_rate=0.05, stall_seconds=3.0)
# Fast engine settings for the subprocess, through the environment.
FAST_ENV = {
    "BULK_ENGINE_POLL_MIN": "0.02", "BULK_ENGINE_POLL_MAX": "0.2",
    "BULK_ENGINE_RETRY_BASE": "0.01", "BULK_ENGINE_RETRY_CAP": "0.1",
    "BULK_ENGINE_RATE_LIMIT": "500", "BULK_ENGINE_BURST": "50",
    "BULK_ENGINE_SUBMIT_TIMEOUT": "0.4", "BULK_ENGINE_POLL_TIMEOUT": "0.4",
    "BULK_ENGINE_FAILURE_WINDOW": "10", "BULK_ENGINE_FSYNC_INTERVAL": "0.05",
}
# The crash: POST /case raises an exception whose text carries the request headers, the way
# repr(aiohttp.ClientResponseError) can (aiohttp #8402).
CRASH_SCRIPT = """
import sys
from bulk_engine import client
async def crash(self, job, **kw):
    raise RuntimeError("simulated bug; headers: {'api-key': '%s'}" % self._settings.api_key)
client.CaseClient.submit_once = crash
from bulk_engine.cli import main
sys.exit(main(sys.argv[1:]))
"""


# ---- helpers -------------------------------------------------------------------------------


def leaks(blobs: dict[str, bytes]) -> list[str]:
    """The names of the blobs that contain the canary (or a fragment of it)."""
    return [name for name, data in blobs.items() if any(n in data for n in NEEDLES)]


def files_in(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (output, journal + WAL/SHM, logs, stats), byte for byte."""
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@asynccontextmanager
async def emulator(**kw: Any) -> AsyncIterator[Emulator]:
    cfg: dict[str, Any] = dict(api_keys=(CANARY,), processing_time=(0.01, 0.03), seed=3)
    cfg.update(kw)
    async with run_emulator(EmulatorConfig(**cfg), shutdown_timeout=0.1) as emu:
        yield emu


async def cli(args: list[str], *, env: dict[str, str], crash: bool = False,
              timeout: float = 40) -> tuple[int, bytes, bytes]:
    """Run the CLI (or the crashing wrapper) in a subprocess; (exit code, stdout, stderr)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BULK_ENGINE_")}
    full_env.update(FAST_ENV)
    full_env.update(env)
    prefix = ["-c", CRASH_SCRIPT] if crash else ["-m", "bulk_engine"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *prefix, *args, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=full_env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out, err


# ---- through the CLI ----------------------------------------------------------------------

SCENARIOS: dict[str, tuple[dict[str, Any], list[str], int, str]] = {
    # emulator knobs, extra CLI flags, expected exit code, phrase expected on stderr
    "bad_key": (dict(api_keys=("someone-else",)), [], 1, "refused the key"),
    "chaos": (CHAOS, ["--max-failure-rate", "1.0"], 2, "failed"),
    "mass_failure": (dict(fail_rate=1.0), ["--max-failure-rate", "0.5"], 1,
                     "failed server-side"),
    "crash": ({}, [], 1, "internal error"),
}


@pytest.mark.parametrize(
    ("scenario", "fmt", "to_file"),
    [
        ("bad_key", "json", True),
        ("chaos", "console", False),
        ("mass_failure", "json", False),
        ("crash", "json", True),
        ("crash", "console", False),
    ],
)
async def test_cli_failure_paths_never_leak_the_key(
    tmp_path: Path, scenario: str, fmt: str, to_file: bool
) -> None:
    """Subprocess run of a failure path: no trace of the key in any output, log or state file."""
    knobs, flags, code, phrase = SCENARIOS[scenario]
    manifest = make_archive(tmp_path / "archive", 20, seed=1)
    run = tmp_path / "run"
    run.mkdir()
    args = [str(manifest), "--output", str(run / "out.jsonl"), "--no-progress",
            "--log-level", "debug", "--log-format", fmt, "--stats-json", str(run / "stats.json"),
            *flags]
    if to_file:
        args += ["--log-file", str(run / "engine.log")]
    async with emulator(**knobs) as emu:
        rc, out, err = await cli([*args, "--base-url", emu.base_url],
                                 env={"BULK_ENGINE_API_KEY": CANARY}, crash=scenario == "crash")
        stats = emu.stats()
    logs = (run / "engine.log").read_bytes() if to_file else err
    assert rc == code, err.decode(errors="replace")[-3000:]
    assert phrase.encode() in err
    if to_file:  # logs in the file; the terminal only gets the one-line error
        assert b"Traceback" not in err
    if scenario == "crash":
        # The traceback is in the log, redacted, not lost.
        assert b"RuntimeError" in logs and b"[REDACTED]" in logs
    if scenario == "chaos":
        assert stats["runs"]["failed"] and sum(stats["faults_injected"].values()) > 0
    blobs = {"stdout": out, "stderr": err, **files_in(run)}
    assert leaks(blobs) == []


async def test_api_key_on_the_command_line_works_but_warns(tmp_path: Path) -> None:
    """--api-key works, warns that argv is visible, and the key still appears nowhere."""
    manifest = make_archive(tmp_path / "archive", 5, seed=2)
    run = tmp_path / "run"
    run.mkdir()
    async with emulator() as emu:
        rc, out, err = await cli(
            [str(manifest), "--base-url", emu.base_url, "--api-key", CANARY, "--output",
             str(run / "out.jsonl"), "--no-progress", "--log-format", "json"], env={})
    assert rc == 0, err.decode(errors="replace")
    assert b"api_key_on_command_line" in err and b"BULK_ENGINE_API_KEY" in err
    assert leaks({"stdout": out, "stderr": err, **files_in(run)}) == []


def test_key_from_environment_or_config_file_never_in_repr(tmp_path: Path) -> None:
    """The key loads from the environment or a TOML file; Settings' repr never shows it."""
    conf = tmp_path / "be.toml"
    conf.write_text(f'api_key = "{CANARY}"\n', encoding="utf-8")
    from_file = load_settings(config_file=conf, environ={})
    from_env = load_settings(environ={"BULK_ENGINE_API_KEY": CANARY})
    assert from_file.api_key == from_env.api_key == CANARY
    for s in (from_file, from_env):
        assert CANARY not in repr(s) and CANARY not in str(s)
    assert CANARY not in repr(EmulatorConfig(api_keys=(CANARY,)))


# ---- in-process, logs captured ------------------------------------------------------------


@pytest.fixture
def log_stream(tmp_path: Path) -> Iterator[tuple[Path, TextIO]]:
    """A log file the test owns (closed and unhooked afterwards: no leaked handles)."""
    path = tmp_path / "run" / "engine.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    level = root.level
    with path.open("a", encoding="utf-8") as fh:
        yield path, fh
        structlog.reset_defaults()
        for h in list(root.handlers):
            if h.get_name() == "bulk_engine":
                root.removeHandler(h)
        root.setLevel(level)


@pytest.mark.parametrize("fmt", ["json", "console"])
async def test_in_process_failure_paths_never_leak_the_key(
    tmp_path: Path, fmt: str, log_stream: tuple[Path, TextIO], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused key, chaos, mass failure and a crash in-process, logs captured at debug level."""
    log_path, fh = log_stream
    configure_logging(level="debug", fmt=fmt, stream=fh, secrets=[CANARY])
    log = get_logger()
    manifest = make_archive(tmp_path / "archive", 20, seed=4)
    run = log_path.parent

    def settings(base_url: str, name: str, **kw: Any) -> Any:
        return engine_settings(base_url, run / f"{name}.jsonl", api_key=CANARY,
                               submit_timeout=0.4, poll_timeout=0.4, failure_window=10, **kw)

    async with emulator(api_keys=("someone-else",)) as emu:
        res = await Engine(settings(emu.base_url, "bad_key"), manifest).run()
    assert res.exit_code == 1
    log.error("run_failed", error=res.error)  # how a caller would report it

    async with emulator(**CHAOS) as emu:
        res = await Engine(settings(emu.base_url, "chaos", max_failure_rate=1.0), manifest).run()
    assert res.exit_code == 2

    async with emulator(fail_rate=1.0) as emu:
        res = await Engine(settings(emu.base_url, "mass"), manifest).run()
    assert res.exit_code == 1 and "failed server-side" in str(res.error)

    async def crash(self: CaseClient, job: Any, **kw: Any) -> Any:
        raise RuntimeError(f"simulated bug; headers: {{'api-key': '{CANARY}'}}")

    with monkeypatch.context() as m:
        m.setattr(CaseClient, "submit_once", crash)
        async with emulator() as emu:
            with pytest.raises(BaseException) as crashed:
                await Engine(settings(emu.base_url, "crash"), manifest).run()
    log.error("crashed", exc_info=crashed.value)

    # aiohttp's ClientResponseError can carry the request headers: logged as a value and as a
    # traceback, it still renders without them.
    headers = CIMultiDictProxy(CIMultiDict({"api-key": CANARY}))
    info = aiohttp.RequestInfo(URL("http://api.test/case"), "POST", headers,
                               URL("http://api.test/case"))
    raw = aiohttp.ClientResponseError(info, (), status=400, message="bad", headers=headers)
    log.warning("raw_error", error=raw, info=info, headers=headers)
    try:
        raise raw
    except aiohttp.ClientResponseError:
        log.exception("raw_error_traceback")

    fh.flush()
    text = log_path.read_bytes()
    assert b"refused the key" in text and b"RuntimeError" in text
    assert b"[REDACTED]" in text  # the key was there to find, and was redacted
    assert leaks(files_in(run)) == []
