"""Run settings: one frozen, validated dataclass, loaded from defaults < TOML file < env < CLI.

Every setting is listed with its default and a comment in ``config/default.toml`` (a test keeps
the two in step). Environment variables are ``BULK_ENGINE_<NAME>`` with the setting name
upper-cased (``BULK_ENGINE_RATE_LIMIT=40``); ``BULK_ENGINE_CONFIG`` names a TOML file. A bad value
raises ConfigError naming the setting, the value and where it came from (flag, variable, file).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bulk_engine.errors import ConfigError
from bulk_engine.s3.url import S3Url, is_s3_url, parse_s3_url
from bulk_engine.vocab import ERROR_KINDS

__all__ = [
    "ANALYSE_TYPES",
    "DEFAULT_BASE_URL",
    "ENV_PREFIX",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MODES",
    "Settings",
    "load_settings",
    "override",
    "read_env",
    "read_toml",
    "unknown_env",
]

DEFAULT_BASE_URL = "https://api-v2.finovox.com"
ANALYSE_TYPES = ("decision", "explanation", "share_link")
MODES = ("async", "sync", "auto")
ENV_PREFIX = "BULK_ENGINE_"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("auto", "json", "console")
# Variables with these prefixes belong to other tools (the emulator) or to the loader itself.
_FOREIGN_ENV = (ENV_PREFIX + "EMULATOR_", ENV_PREFIX + "CONFIG")
# BULK_ENGINE_API_KEY_1, _2, ...: more keys for one run (--db), read into ``api_key``.
_NUMBERED_KEY = re.compile(re.escape(ENV_PREFIX) + r"API_KEY_(\d+)")


class _InvalidSetting(ConfigError):
    """A ConfigError about one setting, so the loader can say where the bad value came from."""

    def __init__(self, settings: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.settings = settings


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything a run needs to know. Validated on construction: a bad value raises ConfigError."""

    base_url: str = DEFAULT_BASE_URL
    api_key: str | None = field(default=None, repr=False)
    output: Path = Path("results.jsonl")
    journal: Path | None = None  # default: <output>.journal
    concurrency: int = 8
    rate_limit: float | None = None  # None: auto (the engine finds the key's rate)
    burst: int = 10
    poll_min: float = 10.0
    poll_max: float = 30.0
    max_outstanding: int = 2000
    adaptive_window: bool = True  # the outstanding window adapts below max_outstanding
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
    submit_timeout: float = 120.0
    poll_timeout: float = 60.0
    max_file_size: int = 100 * 1024 * 1024
    follow_symlinks: bool = False
    root: Path | S3Url | None = None  # a directory, or s3://bucket/prefix/ (parse_s3_url)
    confine_to: Path | None = None
    ca_bundle: Path | None = None
    retry_failed: bool = False
    max_failure_rate: float = 0.5
    failure_window: int = 200
    outage_after: float = 10.0
    # --db: one run shared by many workers through PostgreSQL (bulk_engine.pg).
    db: str | None = field(default=None, repr=False)  # postgresql://... (may hold a password)
    run: str | None = None  # the shared run's name (default: from the manifest and settings)
    lease: float = 60.0
    claim_batch: int = 16
    fsync_every: int = 64
    fsync_interval: float = 0.25
    idempotency: bool = True
    seed: int | None = None
    dry_run: bool = False
    progress: bool = True
    status_interval: float = 10.0
    log_level: str = "info"
    log_format: str = "auto"
    log_file: Path | None = None
    stats_json: Path | None = None
    # ---- long runs: metrics, control, stuck analyses (README "Long runs") ----
    retry_failed_kinds: tuple[str, ...] = ()  # with retry_failed: only these kinds (else all)
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    stuck_factor: float = 3.0
    s3_endpoint_url: str | None = None  # else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / profile

    def __post_init__(self) -> None:
        def need(cond: bool, setting: str | tuple[str, ...], msg: str) -> None:
            if not cond:
                raise _InvalidSetting((setting,) if isinstance(setting, str) else setting, msg)

        url = urlsplit(self.base_url)
        need(url.scheme in ("http", "https") and bool(url.netloc), "base_url",
             f"base_url must be an http:// or https:// URL, got {self.base_url!r}")
        if self.api_key is not None:
            # aiohttp refuses a header value with a line break deep in the first request;
            # say it here, without ever showing the key.
            need(not any(ord(c) < 0x20 or ord(c) == 0x7F for c in self.api_key), "api_key",
                 "api_key contains a line break or another control character (the key is not "
                 "shown); remove it — a key read from a file often ends with a newline")
            need(self.api_key == self.api_key.strip(), "api_key",
                 "api_key starts or ends with spaces (the key is not shown); remove them")
        need(self.concurrency >= 1, "concurrency",
             f"concurrency must be at least 1, got {self.concurrency}")
        need(self.rate_limit is None
             or (math.isfinite(self.rate_limit) and self.rate_limit > 0), "rate_limit",
             f"rate_limit must be a positive number of calls per second, got "
             f"{self.rate_limit} (or 'auto': found at run time)")
        need(self.burst >= 1, "burst", f"burst must be at least 1, got {self.burst}")
        need(math.isfinite(self.poll_min) and self.poll_min > 0, "poll_min",
             f"poll_min must be a positive number of seconds, got {self.poll_min}")
        need(self.poll_min <= self.poll_max, ("poll_min", "poll_max"),
             f"poll_max ({self.poll_max}) must not be below poll_min ({self.poll_min})")
        need(self.poll_max < 3000, "poll_max",
             f"poll_max must stay well inside the 60-minute result window (under 3000 s), "
             f"got {self.poll_max}")
        need(self.max_outstanding >= self.concurrency, ("max_outstanding", "concurrency"),
             f"max_outstanding ({self.max_outstanding}) must be at least concurrency "
             f"({self.concurrency})")
        need(self.mode in MODES, "mode",
             f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        need(len(self.analyse_type) > 0, "analyse_type", "analyse_type needs at least one value")
        bad = [a for a in self.analyse_type if a not in ANALYSE_TYPES]
        need(not bad, "analyse_type",
             f"unknown analyse_type {', '.join(map(repr, bad))}; "
             f"choose from {', '.join(ANALYSE_TYPES)}")
        need(bool(self.use_case.strip()), "use_case", "use_case must not be empty")
        need(self.auto_sync_max_bytes >= 0, "auto_sync_max_bytes",
             f"auto_sync_max_bytes must be 0 or more, got {self.auto_sync_max_bytes}")
        need(self.auto_sync_max_files >= 0, "auto_sync_max_files",
             f"auto_sync_max_files must be 0 or more, got {self.auto_sync_max_files}")
        need(self.max_attempts >= 1, "max_attempts",
             f"max_attempts must be at least 1, got {self.max_attempts}")
        need(self.max_retries >= 0, "max_retries",
             f"max_retries must be 0 or more, got {self.max_retries}")
        need(self.retry_base > 0, "retry_base",
             f"retry_base must be a positive number of seconds, got {self.retry_base}")
        need(self.retry_base <= self.retry_cap, ("retry_base", "retry_cap"),
             f"retry_cap ({self.retry_cap}) must not be below retry_base ({self.retry_base})")
        for name in ("connect_timeout", "submit_timeout", "poll_timeout", "fsync_interval",
                     "status_interval", "outage_after"):
            value = getattr(self, name)
            need(math.isfinite(value) and value > 0, name,
                 f"{name} must be a positive number of seconds, got {value}")
        need(self.max_file_size > 0, "max_file_size",
             f"max_file_size must be a positive number of bytes, got {self.max_file_size}")
        need(0 < self.max_failure_rate <= 1, "max_failure_rate",
             f"max_failure_rate must be in (0, 1], got {self.max_failure_rate}")
        need(self.failure_window >= 1, "failure_window",
             f"failure_window must be at least 1, got {self.failure_window}")
        need(self.fsync_every >= 1, "fsync_every",
             f"fsync_every must be at least 1, got {self.fsync_every}")
        keys = self.api_keys
        need(len(set(keys)) == len(keys), "api_key",
             "the same API key is given twice (the keys are not shown)")
        need(len(keys) <= 1 or self.db is not None, "api_key",
             f"{len(keys)} API keys are given (BULK_ENGINE_API_KEY=k1,k2 or "
             "BULK_ENGINE_API_KEY_1, _2...): several keys are for one run shared through "
             "--db; a single machine uses one key")
        need(self.db is None or self.db.strip().startswith(("postgresql://", "postgres://")),
             "db", "db must be a postgresql://USER:PASSWORD@HOST:PORT/DATABASE URL (the value "
             "is not shown: it may hold a password)")
        need(self.run is None or bool(self.run.strip()), "run", "run must not be empty")
        need(math.isfinite(self.lease) and self.lease >= 1, "lease",
             f"lease must be at least 1 second, got {self.lease}")
        need(self.claim_batch >= 1, "claim_batch",
             f"claim_batch must be at least 1, got {self.claim_batch}")
        need(self.log_level.lower() in LOG_LEVELS, "log_level",
             f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        need(self.log_format in LOG_FORMATS, "log_format",
             f"log_format must be one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}")
        if self.s3_endpoint_url is not None:
            ep = urlsplit(self.s3_endpoint_url)
            need(ep.scheme in ("http", "https") and bool(ep.hostname), "s3_endpoint_url",
                 "s3_endpoint_url must be an http:// or https:// URL, got "
                 f"{ep.scheme + '://' if ep.scheme else ''}{ep.hostname or '(no host)'}")
        if self.ca_bundle is not None:
            need(self.ca_bundle.is_file(), "ca_bundle",
                 f"ca_bundle {self.ca_bundle} is not a readable file")
        self._check_long_run_settings(need)

    def _check_long_run_settings(self, need: Callable[[bool, str, str], None]) -> None:
        unknown = [k for k in self.retry_failed_kinds if k not in ERROR_KINDS]
        need(not unknown, "retry_failed_kinds",
             f"unknown error kind {', '.join(map(repr, unknown))} for --retry-failed; "
             f"choose from {', '.join(sorted(ERROR_KINDS))}")
        need(not self.retry_failed_kinds or self.retry_failed, "retry_failed_kinds",
             "retry_failed_kinds is used with retry_failed = true")
        need(self.metrics_port is None or 0 <= self.metrics_port <= 65535, "metrics_port",
             f"metrics_port must be a TCP port (0-65535), got {self.metrics_port}")
        need(bool(self.metrics_host.strip()), "metrics_host", "metrics_host must not be empty")
        need(math.isfinite(self.stuck_factor) and self.stuck_factor >= 1, "stuck_factor",
             f"stuck_factor must be a number of at least 1, got {self.stuck_factor}")

    @property
    def api_keys(self) -> tuple[str, ...]:
        """The API keys: ``api_key`` split at commas (more than one only with ``db``)."""
        return tuple(k for k in (k.strip() for k in (self.api_key or "").split(",")) if k)

    @property
    def journal_path(self) -> Path:
        return self.journal if self.journal is not None else Path(f"{self.output}.journal")

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


_FIELDS = {f.name: f for f in fields(Settings)}
# Settings whose command-line flag is not named after them.
_FLAGS = {"retry_failed_kinds": "--retry-failed"}


def _coerce(name: str, value: Any, source: str = "") -> Any:
    """Turn a TOML/env/CLI value into the field's type, with a message naming the setting."""
    default = _FIELDS[name].default
    typ = str(_FIELDS[name].type)
    where = f" (from {source})" if source else ""
    try:
        if value is None:
            return None
        if name == "rate_limit" and isinstance(value, str) and value.strip().lower() == "auto":
            return None  # auto: found at run time (a number is a hard ceiling)
        if "Path" in typ:
            if not isinstance(value, (str, os.PathLike, S3Url)) or not str(value).strip():
                raise ValueError(value)
            if isinstance(value, S3Url) or ("S3Url" in typ and is_s3_url(str(value))):
                if "S3Url" not in typ:
                    raise ValueError(value)
                # s3://bucket/prefix/ taken literally: Path() would fold its "//"
                return value if isinstance(value, S3Url) else _s3_url(name, str(value), where)
            return Path(value).expanduser()
        if "tuple" in typ:
            if isinstance(value, str):
                value = value.replace(";", ",").split(",")
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
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
        if isinstance(value, bool):  # TOML `true` is not a number, whatever Python thinks
            raise ValueError(value)
        if typ in ("int", "int | None"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(str(value).strip()) if isinstance(value, str) else int(value)
        if typ in ("float", "float | None"):
            return float(value)
        if not isinstance(value, str):
            raise ValueError(value)
        return value
    except (TypeError, ValueError, OverflowError):
        kinds = {"int": "a whole number", "int | None": "a whole number", "float": "a number",
                 "float | None": "a number", "bool": "true or false"}
        kind = kinds.get(typ, "a path" if "Path" in typ else
                         "a list of names" if "tuple" in typ else "text")
        shown = "a value that is not text (not shown)" if name == "api_key" else repr(value)
        also = "; or 'auto'" if name == "rate_limit" else ""
        raise ConfigError(f"setting {name}: expected {kind}, got {shown}{where}{also}") from None


def _s3_url(name: str, value: str, where: str) -> S3Url:
    try:
        return parse_s3_url(value)
    except ConfigError as exc:
        raise ConfigError(f"setting {name}: {exc}{where}") from None


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML config file; keys are setting names (dashes allowed)."""
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory, not a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    section = raw.get("bulk_engine", raw)
    if not isinstance(section, dict):
        raise ConfigError(f"config file {path}: [bulk_engine] must be a table")
    out: dict[str, Any] = {}
    for key, value in section.items():
        name = key.replace("-", "_")
        if isinstance(value, dict):
            continue  # other sections (emulator profiles) are not engine settings
        if name not in _FIELDS:
            hint = _did_you_mean(name)
            raise ConfigError(f"config file {path}: unknown setting {key!r}{hint}")
        out[name] = _coerce(name, value, f"{path}")
    return out


def read_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """Settings from ``BULK_ENGINE_*`` variables."""
    out: dict[str, Any] = {}
    for name in _FIELDS:
        key = ENV_PREFIX + name.upper()
        if key in environ and environ[key] != "":
            out[name] = _coerce(name, environ[key], key)
    numbered = sorted((int(m.group(1)), value) for var, value in environ.items()
                      if (m := _NUMBERED_KEY.fullmatch(var)) and value)
    if numbered:
        out["api_key"] = ",".join([*([out["api_key"]] if "api_key" in out else []),
                                   *(value for _, value in numbered)])
    return out


def unknown_env(environ: Mapping[str, str]) -> list[str]:
    """``BULK_ENGINE_*`` variables that name no setting (typos the CLI warns about)."""
    known = {ENV_PREFIX + n.upper() for n in _FIELDS}
    return sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in known
                  and not k.startswith(_FOREIGN_ENV) and not _NUMBERED_KEY.fullmatch(k))


def _did_you_mean(name: str) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(_FIELDS), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_settings(
    *,
    cli: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Merge defaults < config file < environment < CLI (values of None in ``cli`` are unset).

    The config file is ``config_file``, else ``BULK_ENGINE_CONFIG``. A bad value raises
    ConfigError naming the setting, the value and where it came from.
    """
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    source: dict[str, str] = {}
    if config_file is None and environ.get(ENV_PREFIX + "CONFIG"):
        config_file = Path(environ[ENV_PREFIX + "CONFIG"])
    if config_file is not None:
        from_file = read_toml(config_file)
        merged.update(from_file)
        source.update(dict.fromkeys(from_file, f"config file {config_file}"))
    from_env = read_env(environ)
    merged.update(from_env)
    source.update({n: ENV_PREFIX + n.upper() for n in from_env})
    for name, value in (cli or {}).items():
        if value is not None and name in _FIELDS:
            flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
            merged[name] = _coerce(name, value, flag)
            source[name] = flag
    try:
        return Settings(**merged)
    except _InvalidSetting as exc:
        if len(exc.settings) == 1 and exc.settings[0] in source:
            hint = f" (from {source[exc.settings[0]]})"
        else:
            where = [f"{n} from {source[n]}" for n in exc.settings if n in source]
            hint = f" ({'; '.join(where)})" if where else ""
        raise ConfigError(f"{exc}{hint}") from None
    except TypeError as exc:  # pragma: no cover - guarded by _FIELDS
        raise ConfigError(str(exc)) from None


def override(settings: Settings, values: Mapping[str, Any], *, source: str) -> Settings:
    """``settings`` with ``values`` (by setting name; text, numbers and lists are coerced as
    from a TOML file), validated as a whole: ConfigError naming the setting and ``source``.
    A running engine applies its tunables this way (SIGHUP, ``POST /control/settings``)."""
    unknown = sorted(str(name) for name in values if name not in _FIELDS)
    if unknown:
        raise ConfigError(f"unknown setting {', '.join(map(repr, unknown))} (from {source})")
    coerced = {name: _coerce(name, value, source) for name, value in values.items()}
    try:
        return settings.replace(**coerced)
    except _InvalidSetting as exc:
        raise ConfigError(f"{exc} (from {source})") from None
