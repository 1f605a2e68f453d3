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
from typing import Any, NoReturn

from rich.console import Console
from rich.markup import escape

from bulk_engine.config import DEFAULT_BASE_URL, Settings, load_settings, unknown_env
from bulk_engine.errors import BulkEngineError, ConfigError, first_error
from bulk_engine.logs import Redactor, configure_logging, get_logger, redact

EXAMPLES = """\
examples:
  export BULK_ENGINE_API_KEY=...            # the key: from the environment, not argv
  python -m bulk_engine manifest.csv --output results.jsonl --rate-limit 10
  python -m bulk_engine manifest.csv --concurrency 16 --poll-min 10 --poll-max 30
  python -m bulk_engine --root /archive/folders --output results.jsonl
  python -m bulk_engine manifest.csv --config backfill.toml --stats-json stats.json
  python -m bulk_engine manifest.csv --dry-run         # check every row, send nothing
  python -m bulk_engine manifest.csv --retry-failed    # rerun only the failed rows
  nohup python -m bulk_engine manifest.csv --log-file run.log &   # JSON logs, status lines
  python -m bulk_engine demo                           # sample archive + local emulator
  python -m bulk_engine bench --rate-limit 20          # sweep settings against an emulator
  python -m bulk_engine report results.jsonl --failed-manifest failed.csv --chart run.png

settings: command line > environment (BULK_ENGINE_<NAME>, e.g. BULK_ENGINE_RATE_LIMIT=20)
  > --config FILE (TOML; every setting is listed in config/default.toml) > defaults.

exit codes: 0 all completed, 2 some rows failed, 1 fatal error (bad settings or usage, bad key,
  I/O), 130 interrupted by Ctrl-C, 143 by SIGTERM (state saved: rerun the same command to resume)
"""

SUBCOMMANDS = ("demo", "report", "bench")


class _Parser(argparse.ArgumentParser):
    """Usage errors are configuration errors: exit 1, since 2 means "some rows failed"."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see {self.prog} --help)")


def _error(console: Console, message: str) -> None:
    """Print an error line: secrets redacted, brackets in paths not taken for markup."""
    console.print(f"[red]error:[/] {escape(redact(message))}", highlight=False, soft_wrap=True)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
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
    a("--failure-window", type=int,
      help="how many recent API rows --max-failure-rate looks at (default 200)")
    a("--seed", type=int, help="seed for jitter (reproducible schedules)")
    a("--no-idempotency", dest="idempotency", action="store_false", default=None,
      help="do not send Idempotency-Key headers")
    a("--dry-run", action="store_true", default=None,
      help="read and check every row, print the plan, send nothing")
    a("--no-progress", dest="progress", action="store_false", default=None,
      help="no live panel; a status line in the logs every --status-interval s instead "
           "(also when stderr is not a terminal)")
    a("--status-interval", type=float, help="seconds between status log lines (default 10)")
    a("--log-level", choices=("debug", "info", "warning", "error"),
      help="default info: one row_done event per row, warnings, status lines")
    a("--log-format", choices=("json", "console", "auto"),
      help="default auto: console on a terminal, JSON lines otherwise")
    a("--log-file", type=Path, help="append logs here instead of stderr (JSON unless "
                                    "--log-format console)")
    a("--stats-json", type=Path, help="also write the end-of-run summary (or the --dry-run "
                                      "plan) as JSON here")
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
        if argv[0] == "bench":
            from bulk_engine.bench import main as bench_main

            return bench_main(argv[1:])
        return report_main(argv[1:])
    console = Console(stderr=True)
    # Until logging is configured, redact the key as the user gave it (argv or environment).
    early = Redactor([
        os.environ.get("BULK_ENGINE_API_KEY", ""),
        *(argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--api-key"),
        *(a.split("=", 1)[1] for a in argv if a.startswith("--api-key=")),
    ])
    try:
        ns = build_parser().parse_args(argv)
        settings = load_settings(cli=_cli_settings(ns), config_file=ns.config)
        if ns.manifest is None and settings.root is None:
            raise ConfigError("give a manifest CSV (or --root DIR); see --help")
        if ns.manifest is not None and ns.root is not None:
            raise ConfigError("give a manifest CSV or --root DIR, not both")
        if ns.manifest is not None and not ns.manifest.is_file():
            raise ConfigError(f"manifest {ns.manifest} does not exist or is not a file")
        for name in ("stats_json", "log_file"):
            path = getattr(settings, name)
            if path is not None and not path.parent.is_dir():
                raise ConfigError(f"{name}: directory {path.parent} does not exist")
        configure_logging(level=settings.log_level, fmt=settings.log_format,
                          log_file=settings.log_file, secrets=[settings.api_key or ""])
    except BulkEngineError as exc:
        _error(console, early.redact_text(str(exc)))
        return 1
    except OSError as exc:  # the log file cannot be opened
        _error(console, early.redact_text(f"cannot open log file: {exc}"))
        return 1
    log = get_logger()
    if ns.api_key:
        log.warning("api_key_on_command_line",
                    hint="argv is visible to other users: prefer BULK_ENGINE_API_KEY")
    for name in unknown_env(os.environ):
        log.warning("unknown_environment_variable", name=name,
                    hint="not a bulk_engine setting (see config/default.toml): ignored")
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
    from bulk_engine.progress import RowCounter, show_progress
    from bulk_engine.report import render_summary

    log = get_logger()
    try:
        engine = Engine(settings, manifest)
    except BulkEngineError as err:
        _error(console, str(err))
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
    progress = partial(
        show_progress, engine, live=live, total_rows=total_rows, console=console,
        interval=None if live else settings.status_interval, rate_limit=settings.rate_limit,
        counter=RowCounter.for_source(manifest, settings.root) if total_rows is None else None,
    )
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(progress)
            try:
                result = await engine.run()
            finally:
                tg.cancel_scope.cancel()
    except Exception as group:
        # The task group wraps what engine.run raised (ConfigError from the journal check,
        # OSError, or a bug) in an ExceptionGroup: take the error out of it.
        exc = (first_error(group, (BulkEngineError, OSError))
               or first_error(group, (BaseException,)) or group)
        if not isinstance(exc, (BulkEngineError, OSError)):
            # A bug: its traceback goes to the log (no frame locals, secrets redacted), never
            # raw to the terminal, where an exception's text could carry the key.
            log.error("crashed", exc_info=exc)
            exc = RuntimeError(f"internal error ({type(exc).__name__}: {exc}); the state is "
                               "saved, a rerun resumes; please report this with the log")
        _error(console, str(exc))
        return 1
    # The signal handlers stay installed until asyncio.run closes the loop (which removes them):
    # removed here, a second Ctrl-C while the summary prints would raise KeyboardInterrupt with
    # a traceback instead of leaving at once.
    summary = result.summary.to_json()
    render_summary(summary, console)
    if not console.is_terminal:  # logs read by machines: the summary as one event too
        log.info("run_summary", **summary)
    if settings.stats_json is not None:
        try:
            settings.stats_json.write_text(json.dumps(summary, indent=2) + "\n",
                                           encoding="utf-8")
        except OSError as write_error:
            _error(console, f"cannot write --stats-json: {write_error}")
            return 1
    if result.error is not None:
        _error(console, str(result.error))
        return getattr(result.error, "exit_code", 1)
    if result.interrupted:
        console.print("interrupted: state saved; rerun the same command to resume")
        return 143 if signals_seen and signals_seen[0] == signal.SIGTERM else 130
    return result.exit_code


def report_main(argv: Sequence[str]) -> int:
    """``python -m bulk_engine report results.jsonl [--failed-manifest F] [--chart PNG] ...``."""
    from bulk_engine.report import read_results, render_summary, write_chart, write_failed_manifest

    p = _Parser(
        prog="bulk-engine report",
        description="Summarize an output file (partial and torn files too), write a manifest "
                    "of the failed rows ready to rerun, draw a chart.",
        epilog="""\
examples:
  python -m bulk_engine report results.jsonl
  python -m bulk_engine report results.jsonl --json > summary.json
  python -m bulk_engine report results.jsonl --failed-manifest failed.csv --manifest manifest.csv
  python -m bulk_engine failed.csv --output rerun.jsonl         # then rerun the failed rows
  python -m bulk_engine report results.jsonl --chart run.png    # needs bulk-engine[plot]

Folders in the output are as written in the original manifest (relative to its directory);
the failed manifest gets absolute folders: from each line's `path`, else --base-dir, and with
--manifest every original column (use_case, payload...) is kept.
""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("results", type=Path, help="a JSONL output file")
    p.add_argument("--failed-manifest", type=Path, metavar="CSV",
                   help="write a manifest of the failed rows (absolute folders) here")
    p.add_argument("--manifest", type=Path, metavar="CSV",
                   help="the original manifest: copy failed rows from it with every column")
    p.add_argument("--base-dir", type=Path, metavar="DIR",
                   help="resolve relative folders against DIR (the original manifest's "
                        "directory) when the output has no `path`")
    p.add_argument("--chart", type=Path, metavar="PNG",
                   help="draw throughput over time and the latency histogram (matplotlib)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("--stats-json", type=Path, metavar="PATH", help="write the summary as JSON")
    console = Console(stderr=True)
    try:
        ns = p.parse_args(list(argv))
        if not ns.results.is_file():
            raise ConfigError(f"{ns.results} does not exist or is not a file")
        if ns.manifest is not None and ns.failed_manifest is None:
            raise ConfigError("--manifest is used with --failed-manifest")
        rep = read_results(ns.results)
        summary = rep.to_json()
        if ns.failed_manifest is not None:
            fm = write_failed_manifest(rep, ns.failed_manifest, manifest=ns.manifest,
                                       base_dir=ns.base_dir)
            summary["failed_manifest"] = fm.to_json()
        if ns.chart is not None:
            write_chart(rep.summary, ns.chart, title=f"bulk_engine: {ns.results.name}")
        if ns.stats_json is not None:
            ns.stats_json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    except BulkEngineError as exc:
        _error(console, str(exc))
        return 1
    except OSError as exc:
        _error(console, str(exc))
        return 1
    if ns.json:
        print(json.dumps(summary, indent=2))
    else:
        render_summary(summary, Console(), title=f"Report: {ns.results}")
    if ns.failed_manifest is not None:
        fm_json = summary["failed_manifest"]
        console.print(f"failed manifest: {fm_json['rows']} row(s) in {ns.failed_manifest}",
                      highlight=False)
        if fm_json["left_out"]:
            console.print("  left out (fix the original manifest first): " + ", ".join(
                f"{k}: {v}" for k, v in fm_json["left_out"].items()), highlight=False)
        if fm_json["not_found_in_manifest"]:
            console.print(f"  [yellow]{fm_json['not_found_in_manifest']} failed row(s) are not "
                          "in --manifest: is it the original?[/]", highlight=False)
        if ns.manifest is None and fm_json["rows"]:
            console.print("  note: per-row use_case/analyse_type/payload columns are not in the "
                          "output; add --manifest ORIGINAL.csv to carry them over",
                          highlight=False)
    if ns.chart is not None:
        console.print(f"chart: {ns.chart}", highlight=False)
    return 0
