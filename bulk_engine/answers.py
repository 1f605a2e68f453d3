"""The documented shapes of the API's answers, checked before anything is believed.

Where it sits: ``client.py`` hands every JSON body it receives to these pure functions; an
answer that does not fit what the request asked for becomes a ``malformed_response`` error
(retried, then a `failed` line), never a result. Shapes, from the API's documentation:

- async ``POST /case``: ``202 {"retrieve_token": "<non-empty string>"}``;
- sync ``POST /case`` and retrieve ``200``: an object with one top-level key per requested
  ``analyse_type`` and none of the others: ``decision`` is an object whose ``status`` is a
  string, ``share_link`` an object whose ``url`` is a string, ``explanation`` a list;
- retrieve ``202``: an object (``{"status": "processing", "run_id": ...}``).

A result that lacks a requested key, or holds an analyse type that was not requested, is not
the answer to this request (a gateway's own 200, or a replay of another request under the same
``Idempotency-Key``): it is refused, so a wrong result never reaches the output.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from bulk_engine.config import ANALYSE_TYPES

__all__ = [
    "SNIPPET_CHARS",
    "processing_problem",
    "result_problem",
    "snippet",
    "token_problem",
]

SNIPPET_CHARS = 120
_SPACE = re.compile(r"\s+")


def result_problem(body: Any, analyse_type: Sequence[str]) -> str | None:
    """Why ``body`` is not a result for a request of ``analyse_type``; None when it is one."""
    if not isinstance(body, dict):
        return f"the result is a JSON {_json_type(body)}, not an object"
    wanted = set(analyse_type)
    missing = [a for a in ANALYSE_TYPES if a in wanted and a not in body]
    if missing:
        return f"the result lacks the requested {', '.join(missing)}"
    extra = [a for a in ANALYSE_TYPES if a not in wanted and a in body]
    if extra:
        return (f"the result holds {', '.join(extra)}, which this request did not ask for "
                "(the answer to another request?)")
    if "decision" in wanted:
        decision = body["decision"]
        if not isinstance(decision, dict) or not isinstance(decision.get("status"), str):
            return "decision is not an object with a string status"
    if "share_link" in wanted:
        link = body["share_link"]
        if not isinstance(link, dict) or not isinstance(link.get("url"), str):
            return "share_link is not an object with a string url"
    if "explanation" in wanted and not isinstance(body["explanation"], list):
        return "explanation is not a list"
    return None


def token_problem(body: Any) -> str | None:
    """Why ``body`` is not an async submit's answer (a ``retrieve_token``); None when it is."""
    if not isinstance(body, dict):
        return f"the body is a JSON {_json_type(body)}, not an object"
    token = body.get("retrieve_token")
    if not isinstance(token, str) or not token.strip():
        return "the body has no retrieve_token string"
    return None


def processing_problem(body: Any) -> str | None:
    """Why ``body`` is not a retrieve 202 (still processing); None when it is."""
    if not isinstance(body, dict):
        return f"the body is a JSON {_json_type(body)}, not an object"
    return None


def snippet(text: str) -> str:
    """The start of a body, whitespace collapsed, for an error message (redact it first)."""
    flat = _SPACE.sub(" ", text or "").strip()
    if not flat:
        return "(empty body)"
    return repr(flat[:SNIPPET_CHARS] + ("…" if len(flat) > SNIPPET_CHARS else ""))


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return type(value).__name__
