"""Emulator settings: one frozen, validated dataclass, loadable from a TOML profile.

``EmulatorConfig`` says how the emulated Case Analysis API behaves: which API keys it accepts,
how long analyses take, how many run in parallel per key, how it rate-limits, and which faults it
injects (each fault is a probability applied per request with the seeded RNG). Profiles such as
``config/fast.toml`` hold an ``[emulator]`` table whose keys are the field names; the CLI
(``cli.py``) overlays its flags on top.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["FAULT_RATES", "MIB", "EmulatorConfig", "load_profile"]

MIB = 1024 * 1024

#: The fault knobs: a probability each, drawn per request (see ``EmulatorConfig``).
FAULT_RATES = (
    "reset_before_body_rate",
    "drop_after_create_rate",
    "stall_rate",
    "malformed_json_rate",
)


@dataclass(frozen=True, kw_only=True)
class EmulatorConfig:
    """How the emulated API behaves. Invalid values raise ``ValueError`` on construction.

    Timing and limits:
      - ``api_keys``: accepted values of the ``api-key`` header; never shown in ``repr``.
      - ``processing_time``: ``(min, max)`` seconds; each analysis lasts a uniform draw in it,
        counted from the moment it starts (not from submission).
      - ``max_parallel_analyses``: analyses running at once per key; the others queue (FIFO).
      - ``fail_rate``: fraction of folders whose analysis fails (retrieve answers 500).
      - ``rate_limit`` / ``burst``: per-key token bucket over every API call (requests per second,
        bucket size); ``None`` disables it. Excess calls get 429 with ``Retry-After``.
      - ``error_rate``: fraction of API calls answered 503 (``Retry-After: 1``) before anything
        else happens, so such a call never creates a run.
      - ``result_ttl``: seconds a result stays retrievable after its analysis completes (then 404).
      - ``max_upload_bytes``: larger ``POST /case`` bodies get 413, detected while streaming.
      - ``idempotency_ttl``: seconds an ``Idempotency-Key`` keeps pointing at its run.
      - ``seed``: seeds the RNG behind processing times, failures and faults (``None``: random).
      - ``keepalive_timeout``: seconds before the server closes an idle keep-alive connection.

    Faults (probabilities in [0, 1], drawn per request; 0 draws nothing from the RNG):
      - ``reset_before_body_rate``: ``POST /case`` resets the connection before reading the body.
      - ``drop_after_create_rate``: ``POST /case`` creates the run, then closes the connection
        instead of answering (the "lost 202").
      - ``stall_rate`` / ``stall_seconds``: any API call waits that long after doing its work and
        before answering (so a stalled ``POST /case`` has already created its run).
      - ``malformed_json_rate``: a retrieve that would answer 200 or 202 sends the same status
        with a body that is not valid JSON.
    """

    api_keys: tuple[str, ...] = field(default=("demo",), repr=False)
    processing_time: tuple[float, float] = (0.05, 0.2)
    max_parallel_analyses: int = 10
    fail_rate: float = 0.0
    rate_limit: float | None = None
    burst: int = 10
    error_rate: float = 0.0
    result_ttl: float = 3600.0
    max_upload_bytes: int = 512 * MIB
    seed: int | None = None
    idempotency_ttl: float = 86400.0
    reset_before_body_rate: float = 0.0
    drop_after_create_rate: float = 0.0
    stall_rate: float = 0.0
    stall_seconds: float = 30.0
    malformed_json_rate: float = 0.0
    keepalive_timeout: float = 15.0

    def __post_init__(self) -> None:
        # TOML and JSON give lists; accept them and store the tuples the type promises.
        if isinstance(self.api_keys, list):
            object.__setattr__(self, "api_keys", tuple(self.api_keys))
        if isinstance(self.processing_time, list):
            object.__setattr__(self, "processing_time", tuple(self.processing_time))
        self._check_keys()
        self._check_processing_time()
        _check_int("max_parallel_analyses", self.max_parallel_analyses, minimum=1)
        _check_int("burst", self.burst, minimum=1)
        _check_int("max_upload_bytes", self.max_upload_bytes, minimum=1)
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=None)
        for name in ("fail_rate", "error_rate", *FAULT_RATES):
            value = _check_number(name, getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value!r}")
        if self.rate_limit is not None:
            _check_positive("rate_limit", self.rate_limit)
        _check_positive("result_ttl", self.result_ttl)
        _check_positive("idempotency_ttl", self.idempotency_ttl)
        _check_positive("keepalive_timeout", self.keepalive_timeout)
        if _check_number("stall_seconds", self.stall_seconds) < 0:
            raise ValueError(f"stall_seconds must be >= 0, got {self.stall_seconds!r}")

    def _check_keys(self) -> None:
        keys = self.api_keys
        if not isinstance(keys, tuple) or not keys:
            raise ValueError("api_keys must be a non-empty tuple of strings")
        for index, key in enumerate(keys):
            # The message names the position, never the key: keys are secrets.
            if not isinstance(key, str) or not key or key != key.strip() or "," in key:
                raise ValueError(
                    f"api_keys[{index}] must be a non-empty string without commas or "
                    "surrounding whitespace"
                )
        if len(set(keys)) != len(keys):
            raise ValueError("api_keys must not contain duplicates")

    def _check_processing_time(self) -> None:
        pair = self.processing_time
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise ValueError(f"processing_time must be a (min, max) pair, got {pair!r}")
        low = _check_number("processing_time min", pair[0])
        high = _check_number("processing_time max", pair[1])
        if not 0.0 <= low <= high:
            raise ValueError(f"processing_time must satisfy 0 <= min <= max, got {pair!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> EmulatorConfig:
        """Build a config from a mapping of field names (e.g. a TOML table); unknown names fail."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown emulator setting(s): {', '.join(unknown)}")
        return cls(**dict(values))


def load_profile(path: str | Path) -> dict[str, Any]:
    """Read the ``[emulator]`` table of a TOML profile, as raw values (not yet validated).

    Raises ``ValueError`` when the file is not valid TOML or has no ``[emulator]`` table, and
    ``OSError`` when it cannot be read.
    """
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: invalid TOML: {exc}") from None
    table = document.get("emulator")
    if not isinstance(table, dict):
        raise ValueError(f"{path}: no [emulator] table")
    return dict(table)


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _check_positive(name: str, value: object) -> None:
    if _check_number(name, value) <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _check_int(name: str, value: object, *, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
