"""Logging: structlog configured once at the entry point; modules only call ``get_logger()``.

Rendering is console on a terminal and JSON otherwise (``--log-format``), to stderr or
``--log-file``. A redaction processor runs last before rendering: the API key is replaced
wherever it appears, and retrieve tokens (Fernet, ``gAAAAA...``) are cut to a short prefix.
Tracebacks are rendered without frame locals, which could hold the key.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, TextIO

import structlog

TOKEN_RE = re.compile(r"gAAAAA[A-Za-z0-9_\-=]{8,}")
TOKEN_KEEP = 12


def short_token(token: str | None) -> str | None:
    """A retrieve token cut short enough to be safe in logs."""
    if token is None:
        return None
    return token[:TOKEN_KEEP] + "…" if len(token) > TOKEN_KEEP else token


class Redactor:
    """structlog processor: removes secrets from every value of an event, recursively."""

    def __init__(self, secrets: list[str]) -> None:
        self.secrets = [s for s in secrets if s]

    def redact_text(self, text: str) -> str:
        for s in self.secrets:
            if s in text:
                text = text.replace(s, "[REDACTED]")
        return TOKEN_RE.sub(lambda m: m.group(0)[:TOKEN_KEEP] + "…", text)

    def _redact(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact_text(value)
        if isinstance(value, dict):
            return {k: self._redact(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._redact(v) for v in value]
        if isinstance(value, BaseException):
            return self.redact_text(f"{type(value).__name__}: {value}")
        return value

    def __call__(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> Any:
        for key in list(event):
            if key in ("api_key", "api-key", "headers"):
                event[key] = "[REDACTED]"
            else:
                event[key] = self._redact(event[key])
        return event


_redactor = Redactor([])


def configure_logging(
    *,
    level: str = "info",
    fmt: str = "auto",
    log_file: Path | None = None,
    secrets: list[str] | None = None,
    stream: TextIO | None = None,
) -> Redactor:
    """Configure structlog for the process. Returns the redactor so callers can add secrets."""
    global _redactor
    _redactor = Redactor(secrets or [])
    # The log file lives as long as the process.
    out: TextIO = log_file.open("a", encoding="utf-8") if log_file else (stream or sys.stderr)
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        processors += [
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            ),
            _redactor,
            structlog.processors.JSONRenderer(ensure_ascii=False),
        ]
    else:
        processors += [
            structlog.processors.format_exc_info,
            _redactor,
            structlog.dev.ConsoleRenderer(
                colors=out.isatty(), exception_formatter=structlog.dev.plain_traceback
            ),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    return _redactor


def get_logger(**bind: Any) -> Any:
    """The module-level logger accessor: ``log = get_logger()``."""
    return structlog.get_logger(**bind)


def redact(text: str) -> str:
    """Redact secrets from an arbitrary string (messages printed outside structlog)."""
    return _redactor.redact_text(text)
