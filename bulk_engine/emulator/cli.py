"""Command line of the emulator: ``python -m bulk_engine.emulator --port P --api-keys k1,k2``.

Settings come from the dataclass defaults, then an optional ``--profile`` TOML file (its
``[emulator]`` table), then the flags. Keys may also come from the environment variable
``BULK_ENGINE_EMULATOR_API_KEYS`` so they stay out of ``ps`` listings. The server prints one line,
``emulator listening on http://HOST:PORT (keys: N)``, never the keys, and stops cleanly on SIGINT
or SIGTERM (exit status 0).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import ssl
import sys
from collections.abc import Sequence
from typing import Any

from bulk_engine.emulator.config import EmulatorConfig, load_profile
from bulk_engine.emulator.server import run_emulator

__all__ = ["ENV_API_KEYS", "build_parser", "config_from_args", "main"]

ENV_API_KEYS = "BULK_ENGINE_EMULATOR_API_KEYS"


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1: {text!r}")
    return value


def _processing_time(text: str) -> tuple[float, float]:
    low, sep, high = text.partition(":")
    try:
        pair = (float(low), float(high if sep else low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX seconds, got {text!r}") from None
    return pair


def _rate_limit(text: str) -> float | str:
    if text.lower() in ("none", "off"):
        return "none"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected requests/s or 'none', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every setting flag defaults to None, meaning "not given"."""
    parser = argparse.ArgumentParser(
        prog="python -m bulk_engine.emulator",
        description="Local emulator of the Case Analysis API (POST /case, POST /case/retrieve), "
        "with per-key parallelism, rate limiting, result expiry and fault injection. "
        "Counters: GET /_emulator/stats; recorded uploads: GET /_emulator/submissions; "
        "per-key cap and rate limit, changeable mid-run: GET/POST /_emulator/limits.",
    )
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="interface to bind (default: %(default)s)")
    net.add_argument(
        "--port", type=int, default=8080, help="port, 0 for a free one (default: %(default)s)"
    )
    net.add_argument("--certfile", help="PEM certificate: serve HTTPS (with --keyfile)")
    net.add_argument("--keyfile", help="PEM private key for --certfile")
    net.add_argument(
        "--keepalive-timeout", type=float, help="close idle keep-alive connections after S seconds"
    )

    api = parser.add_argument_group("API behaviour")
    api.add_argument("--profile", help="TOML file with an [emulator] table (flags override it)")
    api.add_argument(
        "--api-keys",
        help=f"comma-separated accepted keys (or env {ENV_API_KEYS}; default: demo)",
    )
    api.add_argument(
        "--processing-time",
        type=_processing_time,
        metavar="MIN:MAX",
        help="seconds an analysis lasts, drawn uniformly",
    )
    api.add_argument(
        "--max-parallel-analyses", type=int, metavar="N", help="analyses running at once per key"
    )
    api.add_argument("--fail-rate", type=_rate, metavar="F", help="fraction of folders that fail")
    api.add_argument(
        "--rate-limit",
        type=_rate_limit,
        metavar="R",
        help="requests/s per key over all endpoints ('none' to disable)",
    )
    api.add_argument("--burst", type=int, metavar="B", help="token bucket size for --rate-limit")
    api.add_argument("--result-ttl", type=float, metavar="S", help="seconds results stay available")
    api.add_argument(
        "--idempotency-ttl",
        type=float,
        metavar="S",
        help="seconds an Idempotency-Key is remembered",
    )
    api.add_argument(
        "--max-upload-bytes", type=int, metavar="N", help="larger POST /case bodies get 413"
    )
    api.add_argument("--seed", type=int, metavar="N", help="seed of the RNG (reproducible runs)")

    faults = parser.add_argument_group("faults (probabilities per request)")
    faults.add_argument("--error-rate", type=_rate, metavar="F", help="answer 503 + Retry-After: 1")
    faults.add_argument(
        "--reset-before-body-rate",
        type=_rate,
        metavar="F",
        help="POST /case: reset the connection before reading the body",
    )
    faults.add_argument(
        "--drop-after-create-rate",
        type=_rate,
        metavar="F",
        help="POST /case: create the run, then close the connection without answering",
    )
    faults.add_argument(
        "--stall-rate", type=_rate, metavar="F", help="wait --stall-seconds before answering"
    )
    faults.add_argument("--stall-seconds", type=float, metavar="S", help="length of a stall")
    faults.add_argument(
        "--malformed-json-rate",
        type=_rate,
        metavar="F",
        help="retrieve: answer 200/202 with a body that is not valid JSON",
    )
    return parser


_SETTING_FLAGS = (
    "processing_time",
    "max_parallel_analyses",
    "fail_rate",
    "rate_limit",
    "burst",
    "error_rate",
    "result_ttl",
    "idempotency_ttl",
    "max_upload_bytes",
    "seed",
    "reset_before_body_rate",
    "drop_after_create_rate",
    "stall_rate",
    "stall_seconds",
    "malformed_json_rate",
    "keepalive_timeout",
)


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    """Merge defaults < profile < env (keys only) < flags; raise ``ValueError`` or ``OSError``."""
    values: dict[str, Any] = load_profile(args.profile) if args.profile else {}
    keys = args.api_keys or os.environ.get(ENV_API_KEYS)
    if keys:
        values["api_keys"] = tuple(k.strip() for k in keys.split(",") if k.strip())
    for name in _SETTING_FLAGS:
        value = getattr(args, name)
        if value is not None:
            values[name] = None if value == "none" else value
    return EmulatorConfig.from_mapping(values)


async def _serve(config: EmulatorConfig, args: argparse.Namespace) -> None:
    ssl_context = None
    if args.certfile:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(args.certfile, args.keyfile)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with run_emulator(config, host=args.host, port=args.port, ssl_context=ssl_context) as emu:
        print(f"emulator listening on {emu.base_url} (keys: {len(config.api_keys)})", flush=True)
        await stop.wait()
    print("emulator stopped", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the emulator until SIGINT/SIGTERM; return the exit status (2 for bad settings)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.certfile) != bool(args.keyfile):
        parser.error("--certfile and --keyfile go together")
    try:
        config = config_from_args(args)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    try:
        asyncio.run(_serve(config, args))
    except KeyboardInterrupt:  # a SIGINT before the handlers were installed
        return 130
    except OSError as exc:  # e.g. the port is taken
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
