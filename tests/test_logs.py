"""Logs: renderers, redaction of the key and tokens (tracebacks too), the canonical row event."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from bulk_engine.emulator import EmulatorConfig, run_emulator
from bulk_engine.engine import Engine
from bulk_engine.logs import (
    Redactor,
    configure_logging,
    get_logger,
    redact,
    reset_logging,
    short_token,
)

from archive_factory import make_archive
from conftest import API_KEY, engine_settings

KEY = "key-9f8e7d6c5b4a"
TOKEN = "gAAAAABmZ" + "x" * 120 + "=="


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    reset_logging()
    structlog.contextvars.clear_contextvars()


def _boom(secret: str) -> None:
    secret_local = secret  # a frame local holding the key: must never be rendered
    raise RuntimeError(f"call failed with key {secret_local} and token {TOKEN}")


def _log_everything(log: Any) -> None:
    log.info("plain", url=f"https://x/?k={KEY}", nested={"a": [KEY, {"b": KEY}]},
             token=TOKEN, api_key=KEY, headers={"api-key": KEY}, raw=KEY.encode())
    log.info(f"message with {KEY} and {TOKEN}")
    try:
        _boom(KEY)
    except RuntimeError:
        log.exception("failed", id="row-1")


# ---- the redactor ---------------------------------------------------------------------------


def test_redactor_removes_key_everywhere_and_cuts_tokens() -> None:
    """Values, nested containers, bytes, exceptions; secret keys whole; tokens to 12 chars."""
    r = Redactor([KEY, ""])
    ev = r(None, "info", {
        "event": f"x {KEY}", "deep": {"l": [KEY, (KEY,)], "t": TOKEN}, "api_key": "anything",
        "Authorization": "Bearer z", "token": TOKEN, "retrieve_token": TOKEN, "n": 3,
        "exc": ValueError(KEY), "raw": KEY.encode(), "none": None, "p": Path(f"/x/{KEY}"),
    })
    text = repr(ev)
    assert KEY not in text and TOKEN not in text
    assert ev["event"] == "x [REDACTED]"
    assert ev["api_key"] == ev["Authorization"] == "[REDACTED]"
    assert ev["token"] == ev["retrieve_token"] == TOKEN[:12] + "…"
    assert ev["deep"]["t"] == TOKEN[:12] + "…"
    assert ev["n"] == 3 and ev["none"] is None
    assert ev["exc"] == "ValueError: [REDACTED]"


def test_short_token() -> None:
    assert short_token(None) is None
    assert short_token("abc") == "abc"
    assert short_token(TOKEN) == TOKEN[:12] + "…"


def test_redact_uses_the_configured_secrets() -> None:
    """Messages printed outside structlog (CLI errors) are redacted with the same secrets."""
    configure_logging(stream=io.StringIO(), secrets=[KEY])
    assert redact(f"bad {KEY} {TOKEN}") == f"bad [REDACTED] {TOKEN[:12]}…"


# ---- both renderers -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_no_secret_reaches_the_output(fmt: str) -> None:
    """Neither renderer writes the key, a whole token, or a frame local; tracebacks still show."""
    buf = io.StringIO()
    configure_logging(fmt=fmt, stream=buf, secrets=[KEY])
    _log_everything(get_logger())
    out = buf.getvalue()
    assert KEY not in out
    assert TOKEN not in out
    assert "secret_local =" not in out and "'secret_local'" not in out
    assert TOKEN[:12] in out
    assert "RuntimeError" in out and "_boom" in out  # the traceback is there, without locals
    assert "[REDACTED]" in out


def test_json_lines_are_json_with_a_structured_traceback() -> None:
    """JSON format: one object per line; exceptions as a list of frames without locals."""
    buf = io.StringIO()
    configure_logging(fmt="json", stream=buf, secrets=[KEY])
    _log_everything(get_logger())
    events = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [e["event"] for e in events] == [
        "plain", "message with [REDACTED] and " + TOKEN[:12] + "…", "failed"]
    failed = events[-1]
    assert failed["level"] == "error" and failed["id"] == "row-1" and "timestamp" in failed
    frames = failed["exception"][0]["frames"]
    assert all("locals" not in f or not f["locals"] for f in frames)


def test_stdlib_loggers_go_through_redaction() -> None:
    """aiohttp/asyncio log through stdlib logging: same renderer, same redaction, warning+."""
    buf = io.StringIO()
    configure_logging(fmt="json", stream=buf, secrets=[KEY])
    lib = logging.getLogger("aiohttp.client")
    lib.info("chatter %s", KEY)  # below warning: dropped
    lib.warning("unclosed session with %s", KEY)
    try:
        _boom(KEY)
    except RuntimeError:
        logging.getLogger("asyncio").exception("task failed")
    out = buf.getvalue()
    assert KEY not in out and "chatter" not in out
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0]["event"] == "unclosed session with [REDACTED]"
    assert lines[0]["logger"] == "aiohttp.client"
    assert "RuntimeError" in json.dumps(lines[1]["exception"])


def test_auto_format_console_on_a_terminal_json_otherwise() -> None:
    """auto: a terminal gets console lines, anything else JSON lines."""
    pipe, tty = io.StringIO(), _Tty()
    configure_logging(stream=pipe)
    get_logger().info("hello", n=1)
    assert json.loads(pipe.getvalue())["event"] == "hello"
    configure_logging(stream=tty)
    get_logger().info("hello", n=1)
    assert "hello" in tty.getvalue() and not tty.getvalue().startswith("{")


def test_level_filters_and_log_file(tmp_path: Path) -> None:
    """--log-level drops lower events; --log-file appends JSON lines."""
    path = tmp_path / "run.log"
    path.write_text('{"event": "earlier"}\n')
    configure_logging(level="warning", log_file=path, secrets=[KEY])
    log = get_logger()
    log.info("quiet")
    log.warning("loud", key_was=KEY)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["event"] for e in lines] == ["earlier", "loud"]
    assert lines[1]["key_was"] == "[REDACTED]"


def test_default_stream_follows_sys_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a stream, each line goes to the current sys.stderr (the live panel's proxy)."""
    configure_logging(fmt="json")
    swapped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", swapped)
    get_logger().info("through the proxy")
    assert "through the proxy" in swapped.getvalue()


def test_context_bound_per_task_is_merged() -> None:
    """Values bound with structlog.contextvars appear in every event of that context."""
    buf = io.StringIO()
    configure_logging(fmt="json", stream=buf)
    with structlog.contextvars.bound_contextvars(id="row-7"):
        get_logger().info("retry", kind="rate_limited")
    get_logger().info("after")
    first, second = (json.loads(line) for line in buf.getvalue().splitlines())
    assert first["id"] == "row-7" and "id" not in second


# ---- the canonical row event ----------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_one_row_done_event_per_row(tmp_path: Path) -> None:
    """A run logs exactly one row_done per row with id, status, attempts, polls, latency."""
    manifest = make_archive(tmp_path / "a", 12, seed=11)
    with manifest.open("a", encoding="utf-8") as fh:
        fh.write("missing-row,does/not/exist\n")
    cfg = EmulatorConfig(api_keys=(API_KEY,), processing_time=(0.01, 0.03), fail_rate=0.2,
                         seed=3)
    with capture_logs() as logs:
        async with run_emulator(cfg) as emu:
            out = tmp_path / "out.jsonl"
            result = await Engine(engine_settings(emu.base_url, out, max_failure_rate=1.0),
                                  manifest).run()
    done = [e for e in logs if e["event"] == "row_done"]
    ids = [e["id"] for e in done]
    assert len(ids) == 13 == len(set(ids)) == result.summary.rows
    lines = {json.loads(line)["id"]: json.loads(line) for line in out.read_text().splitlines()}
    for e in done:
        rec = lines[e["id"]]
        assert e["status"] == rec["status"]
        assert (e["attempts"], e["polls"], e["latency_s"]) == (
            rec["attempts"], rec["polls"], rec["latency_s"])
        assert e["error"] == (rec["error"]["kind"] if rec["error"] else None)
        if rec["status"] == "completed":
            assert e["decision"] == rec["result"]["decision"]["status"]
    assert next(e for e in done if e["id"] == "missing-row")["error"] == "folder_missing"
    assert all(API_KEY not in repr(e) for e in logs)
