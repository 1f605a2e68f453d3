"""Logging: structlog configured once at the entry point; modules only call ``get_logger()``.

Rendering is console on a terminal and JSON otherwise (``--log-format``), to stderr or
``--log-file``. Standard-library loggers (aiohttp, asyncio) go through the same processors, at
warning and above. A redaction processor runs last before rendering: the API key is replaced
wherever it appears, and retrieve tokens (Fernet, ``gAAAAA...``) are cut to a short prefix.
Tracebacks are rendered without frame locals, which could hold the key.

Context is bound per task with ``structlog.contextvars`` (the engine binds the row id around each
submission and poll), so every event a task logs says which row it concerns.

While the live progress panel is up, rich swaps ``sys.stderr`` for a proxy that prints above the
panel; the default log stream looks ``sys.stderr`` up at each write, so log lines land above the
panel instead of tearing it.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, TextIO

import structlog

__all__ = [
    "REDACTED",
    "TOKEN_KEEP",
    "TOKEN_RE",
    "Redactor",
    "add_secret",
    "configure_logging",
    "get_logger",
    "redact",
    "reset_logging",
    "short_token",
]

TOKEN_RE = re.compile(r"gAAAAA[A-Za-z0-9_\-=]{8,}")
TOKEN_KEEP = 12
REDACTED = "[REDACTED]"
# Keys whose whole value is secret, and keys that hold a retrieve token.
_SECRET_KEYS = frozenset({"api_key", "api-key", "apikey", "headers", "authorization"})
_TOKEN_KEYS = frozenset({"token", "retrieve_token"})


def short_token(token: str | None) -> str | None:
    """A retrieve token cut short enough to be safe in logs."""
    if token is None:
        return None
    return token[:TOKEN_KEEP] + "…" if len(token) > TOKEN_KEEP else token


class Redactor:
    """structlog processor: removes secrets from every value of an event, recursively."""

    def __init__(self, secrets: list[str]) -> None:
        self.secrets = [s for s in secrets if s]

    def add_secret(self, secret: str | None) -> None:
        """Redact this value too from now on (e.g. a key read after logging was configured)."""
        if secret and secret not in self.secrets:
            self.secrets.append(secret)

    def redact_text(self, text: str) -> str:
        for s in self.secrets:
            if s in text:
                text = text.replace(s, REDACTED)
        return TOKEN_RE.sub(lambda m: m.group(0)[:TOKEN_KEEP] + "…", text)

    def _redact(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact_text(value)
        if isinstance(value, (bytes, bytearray)):
            return self.redact_text(bytes(value).decode("utf-8", "replace"))
        if isinstance(value, dict):
            return {k: self._value(k, v) for k, v in value.items()}
        if isinstance(value, (list, tuple, set, frozenset)):
            return [self._redact(v) for v in value]
        if isinstance(value, BaseException):
            return self.redact_text(f"{type(value).__name__}: {value}")
        if isinstance(value, (int, float, bool)) or value is None:
            return value
        # Anything else would be rendered as text by the renderer: redact that text.
        return self.redact_text(str(value))

    def _value(self, key: Any, value: Any) -> Any:
        name = str(key).lower()
        if name in _SECRET_KEYS and value is not None:
            return REDACTED
        if name in _TOKEN_KEYS and isinstance(value, str):
            return short_token(value)
        return self._redact(value)

    def __call__(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> Any:
        for key in list(event):
            if key == "exc_info":  # still an exception object: rendered (and redacted) later
                continue
            event[key] = self._value(key, event[key])
        return event


class _Stderr:
    """``sys.stderr`` looked up at each write (rich's live panel swaps it for a proxy)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


_redactor = Redactor([])
_HANDLER_NAME = "bulk_engine"
_log_file: TextIO | None = None  # the --log-file we opened (closed on reconfigure or reset)


def _renderer_chain(fmt: str, colors: bool) -> list[Any]:
    """Exception rendering, redaction, then the renderer: secrets never reach the output."""
    if fmt == "json":
        return [
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            ),
            _redactor,
            structlog.processors.JSONRenderer(ensure_ascii=False, default=str),
        ]
    return [
        _drop_none,
        structlog.processors.format_exc_info,  # plain text traceback, no locals
        _redactor,
        structlog.dev.ConsoleRenderer(
            colors=colors, exception_formatter=structlog.dev.plain_traceback
        ),
    ]


def _drop_none(logger: Any, name: str, event: MutableMapping[str, Any]) -> Any:
    """Console only: ``error=None decision=None`` is noise to a reader (JSON keeps every key)."""
    for key in [k for k, v in event.items() if v is None]:
        del event[key]
    return event


def configure_logging(
    *,
    level: str = "info",
    fmt: str = "auto",
    log_file: Path | None = None,
    secrets: list[str] | None = None,
    stream: TextIO | None = None,
) -> Redactor:
    """Configure structlog (and stdlib logging) for the process; return the redactor.

    ``fmt`` is ``json``, ``console`` or ``auto`` (console when the destination is a terminal).
    Raises OSError if ``log_file`` cannot be opened.
    """
    global _redactor, _log_file
    _redactor = Redactor(secrets or [])
    # Line-buffered so `tail -f` follows it. It lives until the next configure (or reset).
    out: Any
    if log_file is not None:
        out = log_file.open("a", encoding="utf-8", buffering=1)
        _close_log_file()
        _log_file = out
    else:
        _close_log_file()
        out = stream if stream is not None else _Stderr()
    is_tty = bool(out.isatty())
    if fmt == "auto":
        fmt = "console" if is_tty else "json"
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        # JSON: ISO-8601 UTC for machines; console: local wall time for the person watching.
        structlog.processors.TimeStamper(fmt="iso", utc=True) if fmt == "json"
        else structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S", utc=False),
    ]
    level_no = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*shared, *_renderer_chain(fmt, is_tty)],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    _configure_stdlib(out, fmt, is_tty, max(level_no, logging.WARNING), shared)
    return _redactor


def _configure_stdlib(out: Any, fmt: str, colors: bool, level: int, shared: list[Any]) -> None:
    """Route stdlib logging (aiohttp, asyncio) through the same chain, redaction included."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if h.get_name() == _HANDLER_NAME:
            root.removeHandler(h)
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setLevel(level)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    *_renderer_chain(fmt, colors)],
    ))
    root.addHandler(handler)
    if root.level > level or root.level == logging.NOTSET:
        root.setLevel(level)


def _close_log_file() -> None:
    global _log_file
    if _log_file is not None:
        _log_file.close()
        _log_file = None


def reset_logging() -> None:
    """Undo ``configure_logging``: structlog defaults, our stdlib handler gone, log file closed."""
    structlog.reset_defaults()
    root = logging.getLogger()
    for h in list(root.handlers):
        if h.get_name() == _HANDLER_NAME:
            root.removeHandler(h)
    _close_log_file()


def get_logger(**bind: Any) -> Any:
    """The module-level logger accessor: ``log = get_logger()``."""
    return structlog.get_logger(**bind)


def add_secret(secret: str | None) -> None:
    """Redact this value too from now on, in logs and printed errors (a secret learnt after
    logging was configured: each key of a list, a database password)."""
    _redactor.add_secret(secret)


def redact(text: str) -> str:
    """Redact secrets from an arbitrary string (messages printed outside structlog)."""
    return _redactor.redact_text(text)
