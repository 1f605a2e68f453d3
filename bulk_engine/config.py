"""Run settings: one frozen, validated dataclass, loaded from defaults < TOML file < env < CLI.

Every setting is listed with its default and a comment in ``config/default.toml`` (shipped in the
package as ``bulk_engine/default.toml``). Environment variables are ``BULK_ENGINE_<NAME>`` with the
setting name upper-cased (``BULK_ENGINE_RATE_LIMIT=40``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bulk_engine.errors import ConfigError

DEFAULT_BASE_URL = "https://api-v2.finovox.com"
ANALYSE_TYPES = ("decision", "explanation", "share_link")
MODES = ("async", "sync", "auto")
ENV_PREFIX = "BULK_ENGINE_"


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything a run needs to know. Validated on construction: a bad value raises ConfigError."""

    base_url: str = DEFAULT_BASE_URL
    api_key: str | None = field(default=None, repr=False)
    output: Path = Path("results.jsonl")
    journal: Path | None = None  # default: <output>.journal
    concurrency: int = 8
    rate_limit: float = 10.0
    burst: int = 10
    poll_min: float = 10.0
    poll_max: float = 30.0
    max_outstanding: int = 2000
    mode: str = "async"
    analyse_type: tuple[str, ...] = ("decision",)
    use_case: str = "rental"
    auto_sync_max_bytes: int = 1_000_000
    auto_sync_max_files: int = 4
    max_attempts: int = 3
    max_retries: int = 8
    retry_base: float = 0.5
    retry_cap: float = 30.0
    connect_timeout: float = 10.0
    submit_timeout: float = 300.0
    poll_timeout: float = 60.0
    max_file_size: int = 100 * 1024 * 1024
    follow_symlinks: bool = False
    root: Path | None = None
    confine_to: Path | None = None
    ca_bundle: Path | None = None
    retry_failed: bool = False
    max_failure_rate: float = 0.5
    failure_window: int = 200
    fsync_every: int = 64
    fsync_interval: float = 0.25
    idempotency: bool = True
    seed: int | None = None
    dry_run: bool = False
    progress: bool = True
    log_level: str = "info"
    log_format: str = "auto"
    log_file: Path | None = None
    stats_json: Path | None = None

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        url = urlsplit(self.base_url)
        need(url.scheme in ("http", "https") and bool(url.netloc),
             f"base_url must be an http:// or https:// URL, got {self.base_url!r}")
        need(self.concurrency >= 1, "concurrency must be at least 1")
        need(math.isfinite(self.rate_limit) and self.rate_limit > 0,
             "rate_limit must be a positive number of calls per second")
        need(self.burst >= 1, "burst must be at least 1")
        need(0 < self.poll_min <= self.poll_max,
             f"need 0 < poll_min <= poll_max, got {self.poll_min} and {self.poll_max}")
        need(self.poll_max < 3000, "poll_max must stay well inside the 60-minute result window")
        need(self.max_outstanding >= self.concurrency,
             "max_outstanding must be at least concurrency")
        need(self.mode in MODES, f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        need(len(self.analyse_type) > 0, "analyse_type needs at least one value")
        bad = [a for a in self.analyse_type if a not in ANALYSE_TYPES]
        need(not bad, f"unknown analyse_type {bad}; choose from {', '.join(ANALYSE_TYPES)}")
        need(bool(self.use_case), "use_case must not be empty")
        need(self.max_attempts >= 1, "max_attempts must be at least 1")
        need(self.max_retries >= 0, "max_retries must be 0 or more")
        need(0 < self.retry_base <= self.retry_cap, "need 0 < retry_base <= retry_cap")
        for name in ("connect_timeout", "submit_timeout", "poll_timeout", "fsync_interval"):
            need(getattr(self, name) > 0, f"{name} must be positive")
        need(self.max_file_size > 0, "max_file_size must be positive")
        need(0 < self.max_failure_rate <= 1, "max_failure_rate must be in (0, 1]")
        need(self.failure_window >= 1, "failure_window must be at least 1")
        need(self.fsync_every >= 1, "fsync_every must be at least 1")
        need(self.log_level.lower() in ("debug", "info", "warning", "error", "critical"),
             f"unknown log_level {self.log_level!r}")
        need(self.log_format in ("auto", "json", "console"),
             f"log_format must be auto, json or console, got {self.log_format!r}")
        if self.ca_bundle is not None:
            need(self.ca_bundle.is_file(), f"ca_bundle {self.ca_bundle} is not a readable file")

    @property
    def journal_path(self) -> Path:
        return self.journal if self.journal is not None else Path(f"{self.output}.journal")

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


_FIELDS = {f.name: f for f in fields(Settings)}


def _coerce(name: str, value: Any) -> Any:
    """Turn a TOML/env/CLI value into the field's type, with a message naming the setting."""
    default = _FIELDS[name].default
    typ = str(_FIELDS[name].type)
    try:
        if value is None:
            return None
        if "Path" in typ:
            return Path(value).expanduser()
        if "tuple" in typ:
            if isinstance(value, str):
                value = [v for v in value.replace(";", ",").split(",")]
            return tuple(str(v).strip() for v in value if str(v).strip())
        if isinstance(default, bool) or typ == "bool":
            if isinstance(value, bool):
                return value
            low = str(value).strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ == "int" or typ == "int | None":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if typ == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"setting {name!r}: cannot read {value!r} as {typ}") from None


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML config file; keys are setting names (dashes allowed)."""
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    section = raw.get("bulk_engine", raw)
    out: dict[str, Any] = {}
    for key, value in section.items():
        name = key.replace("-", "_")
        if isinstance(value, dict):
            continue  # other sections (emulator profiles) are not engine settings
        if name not in _FIELDS:
            raise ConfigError(f"config file {path}: unknown setting {key!r}")
        out[name] = _coerce(name, value)
    return out


def read_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """Settings from ``BULK_ENGINE_*`` variables."""
    out: dict[str, Any] = {}
    for name in _FIELDS:
        key = ENV_PREFIX + name.upper()
        if key in environ and environ[key] != "":
            out[name] = _coerce(name, environ[key])
    return out


def load_settings(
    *,
    cli: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Merge defaults < config file < environment < CLI (values of None in ``cli`` are unset)."""
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    if config_file is None and environ.get(ENV_PREFIX + "CONFIG"):
        config_file = Path(environ[ENV_PREFIX + "CONFIG"])
    if config_file is not None:
        merged.update(read_toml(config_file))
    merged.update(read_env(environ))
    for name, value in (cli or {}).items():
        if value is not None and name in _FIELDS:
            merged[name] = _coerce(name, value)
    try:
        return Settings(**merged)
    except TypeError as exc:  # pragma: no cover - guarded by _FIELDS
        raise ConfigError(str(exc)) from None
