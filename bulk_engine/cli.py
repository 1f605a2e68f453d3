"""Command line: ``python -m bulk_engine MANIFEST.csv [options]``, plus ``demo`` and ``report``.

Settings come from CLI > environment (``BULK_ENGINE_*``) > ``--config`` TOML > defaults. Exit
codes: 0 every row completed; 2 finished but some rows failed; 1 fatal (config, auth, I/O);
130 interrupted by Ctrl-C (143 by SIGTERM); the state is saved and a rerun resumes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from rich.console import Console

from bulk_engine.config import DEFAULT_BASE_URL, Settings, load_settings
from bulk_engine.errors import BulkEngineError, ConfigError
from bulk_engine.logs import configure_logging, get_logger, redact

EXAMPLES = """\
examples:
  export BULK_ENGINE_API_KEY=...            # the key: from the environment, not argv
  python -m bulk_engine manifest.csv --output results.jsonl --rate-limit 10
  python -m bulk_engine manifest.csv --concurrency 16 --poll-min 10 --poll-max 30
  python -m bulk_engine --root /archive/folders --output results.jsonl
  python -m bulk_engine manifest.csv --dry-run         # check every row, send nothing
  python -m bulk_engine manifest.csv --retry-failed    # rerun only the failed rows
  python -m bulk_engine demo                           # sample archive + local emulator
  python -m bulk_engine report results.jsonl --failed-manifest failed.csv

exit codes: 0 all completed, 2 some rows failed, 1 fatal error, 130 interrupted (rerun resumes)
"""

SUBCOMMANDS = ("demo", "report")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bulk-engine",
        description="Backfill folders of documents through the Case Analysis API: one manifest "
                    "row per folder, one JSONL line per row, crash-safe resume.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("manifest", nargs="?", type=Path,
                   help="CSV with a `folder` column (and optional id, use_case, analyse_type, "
                        "payload); relative folders resolve against the manifest's directory")
    a = p.add_argument
    a("--root", type=Path, help="instead of a manifest: every leaf folder under DIR is a row")
    a("--base-url", help=f"API base URL (env BULK_ENGINE_BASE_URL, default {DEFAULT_BASE_URL})")
    a("--api-key", help="API key (prefer env BULK_ENGINE_API_KEY: argv is visible to others)")
    a("--output", type=Path, help="JSONL output path (default results.jsonl)")
    a("--journal", type=Path, help="journal path (default OUTPUT.journal)")
    a("--config", type=Path, help="TOML settings file (see config/default.toml)")
    a("--concurrency", type=int, help="uploads in flight (default 8)")
    a("--rate-limit", type=float, help="API calls per second, all endpoints together (default 10)")
    a("--burst", type=int, help="calls allowed at once above the steady rate (default 10)")
    a("--poll-min", type=float, help="shortest wait between polls of a token, s (default 10)")
    a("--poll-max", type=float, help="longest wait between polls of a token, s (default 30)")
    a("--max-outstanding", type=int,
      help="submitted folders not yet retrieved, at most (default 2000)")
    a("--mode", choices=("async", "sync", "auto"), help="submission mode (default async)")
    a("--analyse-type", help="comma-separated: decision, explanation, share_link")
    a("--use-case", help="use case sent with every folder (default rental)")
    a("--max-attempts", type=int, help="submissions per row, resubmits included (default 3)")
    a("--max-retries", type=int, help="retries of one call on transient errors (default 8)")
    a("--max-file-size", type=int, help="bytes; larger files fail their row (default 100 MiB)")
    a("--follow-symlinks", action="store_true", default=None,
      help="follow symlinks that point outside their folder")
    a("--confine-to", type=Path, help="refuse manifest folders outside DIR")
    a("--ca-bundle", type=Path, help="PEM file of CA certificates for a private CA")
    a("--retry-failed", action="store_true", default=None,
      help="resubmit rows whose outcome was failed (the output is rewritten without them)")
    a("--max-failure-rate", type=float,
      help="stop when this share of recent rows failed server-side (default 0.5)")
    a("--seed", type=int, help="seed for jitter (reproducible schedules)")
    a("--no-idempotency", dest="idempotency", action="store_false", default=None,
      help="do not send Idempotency-Key headers")
    a("--dry-run", action="store_true", default=None,
      help="read and check every row, print the plan, send nothing")
    a("--no-progress", dest="progress", action="store_false", default=None,
      help="no live panel; a status line in the logs every 10 s instead")
    a("--log-level", choices=("debug", "info", "warning", "error"))
    a("--log-format", choices=("json", "console", "auto"))
    a("--log-file", type=Path)
    a("--stats-json", type=Path, help="also write the end-of-run summary as JSON here")
    return p


def _cli_settings(ns: argparse.Namespace) -> dict[str, Any]:
    keys = [k for k in vars(ns) if k not in ("manifest", "config")]
    return {k: getattr(ns, k) for k in keys}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS and not Path(argv[0]).exists():
        if argv[0] == "demo":
            from bulk_engine.demo import main as demo_main

            return demo_main(argv[1:])
        return report_main(argv[1:])
    ns = build_parser().parse_args(argv)
    console = Console(stderr=True)
    try:
        settings = load_settings(cli=_cli_settings(ns), config_file=ns.config)
        if ns.manifest is None and settings.root is None:
            raise ConfigError("give a manifest CSV (or --root DIR); see --help")
        if ns.manifest is not None and not ns.manifest.is_file():
            raise ConfigError(f"manifest {ns.manifest} does not exist or is not a file")
    except BulkEngineError as exc:
        console.print(f"[red]error:[/] {redact(str(exc))}")
        return 1
    configure_logging(level=settings.log_level, fmt=settings.log_format,
                      log_file=settings.log_file, secrets=[settings.api_key or ""])
    log = get_logger()
    if ns.api_key:
        log.warning("api_key_on_command_line",
                    hint="argv is visible to other users: prefer BULK_ENGINE_API_KEY")
    _warn_plain_http(settings)
    if settings.dry_run:
        from bulk_engine.plan import dry_run

        return dry_run(settings, ns.manifest, console)
    return asyncio.run(run_engine(settings, ns.manifest, console))


def _warn_plain_http(settings: Settings) -> None:
    from urllib.parse import urlsplit

    url = urlsplit(settings.base_url)
    if url.scheme == "http" and url.hostname not in ("localhost", "127.0.0.1", "::1"):
        get_logger().warning("plain_http", host=url.hostname,
                             hint="the API key would travel unencrypted; use https://")


async def run_engine(settings: Settings, manifest: Path | None, console: Console,
                     *, total_rows: int | None = None) -> int:
    """Run the engine with progress and signal handling; print the summary; return exit code."""
    import anyio

    from bulk_engine.engine import Engine
    from bulk_engine.progress import show_progress
    from bulk_engine.report import render_summary

    log = get_logger()
    try:
        engine = Engine(settings, manifest)
    except BulkEngineError as exc:
        console.print(f"[red]error:[/] {redact(str(exc))}")
        return 1
    loop = asyncio.get_running_loop()
    # aiohttp reads upload files in the loop's default executor, which DNS lookups share; the
    # stock pool (cores + 4 threads) would queue reads behind each other at high concurrency.
    loop.set_default_executor(
        ThreadPoolExecutor(max_workers=settings.concurrency + 8, thread_name_prefix="be-io")
    )
    signals_seen: list[int] = []

    def on_signal(signum: int) -> None:
        signals_seen.append(signum)
        if len(signals_seen) > 1:
            # Second signal: leave now. Output and journal stay consistent (append-only
            # output with tail repair; SQLite WAL), so the rerun resumes.
            os._exit(128 + signum)
        log.warning("interrupted", signal=signal.Signals(signum).name,
                    hint="saving state; press Ctrl-C again to quit at once")
        engine.interrupt()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    live = settings.progress and console.is_terminal
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(show_progress, engine, live=live, total_rows=total_rows))
            try:
                result = await engine.run()
            finally:
                tg.cancel_scope.cancel()
    except BulkEngineError as exc:
        console.print(f"[red]error:[/] {redact(str(exc))}")
        return 1
    except OSError as exc:
        console.print(f"[red]error:[/] {redact(str(exc))}")
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    summary = result.summary.to_json()
    render_summary(summary, console)
    if settings.stats_json is not None:
        settings.stats_json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if result.error is not None:
        console.print(f"[red]error:[/] {redact(str(result.error))}")
        return getattr(result.error, "exit_code", 1)
    if result.interrupted:
        console.print("interrupted: state saved; rerun the same command to resume")
        return 143 if signals_seen and signals_seen[0] == signal.SIGTERM else 130
    return result.exit_code


def report_main(argv: Sequence[str]) -> int:
    """``python -m bulk_engine report results.jsonl [--failed-manifest F] [--json]``."""
    from bulk_engine.report import render_summary, summarize_file

    p = argparse.ArgumentParser(prog="bulk-engine report",
                                description="Summarize an output file (partial files too).")
    p.add_argument("results", type=Path)
    p.add_argument("--failed-manifest", type=Path, help="write a manifest of the failed rows")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    ns = p.parse_args(list(argv))
    if not ns.results.is_file():
        print(f"error: {ns.results} does not exist", file=sys.stderr)
        return 1
    summary = summarize_file(ns.results, failed_manifest=ns.failed_manifest)
    if ns.json:
        print(json.dumps(summary, indent=2))
    else:
        render_summary(summary, Console(), title=f"Report: {ns.results}")
    return 0
