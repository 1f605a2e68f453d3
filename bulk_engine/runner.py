"""The runner: one engine run as the command line does it, shared by the CLI, the demo and bench.

    cli ──┐
    demo ─┼─▶ run_engine(settings, manifest, console) ─▶ Engine.run() ─▶ summary, --stats-json,
    bench ┘      (executor, Ctrl-C/SIGTERM, progress)                    exit code (ExitCode)

Around ``Engine(settings, manifest).run()`` it adds what a process needs: an executor sized for
the uploads, signal handling (the first SIGINT/SIGTERM interrupts the run cleanly, a second one
leaves at once), the live panel or the ``status`` log lines, the printed summary, the
``--stats-json`` file and the mapping of the result to an exit code. Errors are printed as one
redacted line, never as a traceback (a bug's traceback goes to the log, without frame locals).
Library users who want none of this call ``Engine(...).run()`` directly.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from bulk_engine.config import Settings
from bulk_engine.control import ConfigReloader, install_signal_handlers
from bulk_engine.errors import BulkEngineError, ConfigError, first_error
from bulk_engine.logs import get_logger, redact
from bulk_engine.vocab import ExitCode

__all__ = ["check_file_target", "check_paths", "print_error", "run_engine"]


def print_error(console: Console, message: str) -> None:
    """Print an error line: secrets redacted, brackets in paths not taken for markup."""
    console.print(f"[red]error:[/] {escape(redact(message))}", highlight=False, soft_wrap=True)


def check_file_target(name: str, path: Path | None, *, parent_must_exist: bool = True) -> None:
    """Refuse a file path the run would write to and cannot: ConfigError naming ``name``.

    A directory is refused (writing there fails only at the end of a run, or never: a dry run
    would happily plan a run into a directory); so is a parent that is not a directory, or a
    missing parent when the writer does not create it.
    """
    if path is None:
        return
    if path.is_dir():
        raise ConfigError(f"{name}: {path} is a directory, not a file; give a file path")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise ConfigError(f"{name}: {parent} is not a directory")
    if parent_must_exist and not parent.is_dir():
        raise ConfigError(f"{name}: directory {parent} does not exist")


def check_paths(settings: Settings) -> None:
    """Check every path a run (or a dry run) would write, before any work: ConfigError if one
    cannot be used. The output's directory may be missing (the run creates it)."""
    check_file_target("output", settings.output, parent_must_exist=False)
    check_file_target("journal", settings.journal_path, parent_must_exist=False)
    check_file_target("stats_json", settings.stats_json)
    check_file_target("log_file", settings.log_file)


def _exit_code(value: object) -> ExitCode:
    try:
        return ExitCode(value) if isinstance(value, int) else ExitCode.FATAL
    except ValueError:
        return ExitCode.FATAL


async def run_engine(
    settings: Settings,
    manifest: Path | None,
    console: Console,
    *,
    total_rows: int | None = None,
    summary: bool = True,
    reloader: ConfigReloader | None = None,
) -> ExitCode:
    """Run the engine with progress and signal handling; print the summary; return the exit code.

    ``total_rows`` (when known) spares the background count of the manifest's rows for the
    panel; ``summary=False`` prints no summary table (bench runs many engines in a row).
    Must run in the main thread's event loop (it installs SIGINT/SIGTERM handlers).
    Long runs (README "Long runs: metrics and control"): SIGUSR1 drains, SIGHUP reloads the
    tunables through ``reloader``; ``settings.metrics_port`` starts the admin server
    (``/metrics``, ``/control/*``) in the run's task group.
    """
    import anyio

    from bulk_engine.engine import Engine
    from bulk_engine.progress import RowCounter, show_progress
    from bulk_engine.report import render_summary

    log = get_logger()
    try:
        check_paths(settings)
        if settings.db is not None:  # one worker of a run shared through PostgreSQL
            from bulk_engine.pg.worker import PgWorker

            engine: Engine = PgWorker(settings, manifest)
        else:
            engine = Engine(settings, manifest)
    except BulkEngineError as err:
        print_error(console, str(err))
        return ExitCode.FATAL
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
    install_signal_handlers(loop, engine, reloader)  # SIGUSR1 drains, SIGHUP reloads
    live = settings.progress and console.is_terminal
    counter = (RowCounter.for_source(manifest, settings.root, settings)
               if total_rows is None else None)
    progress = partial(
        show_progress, engine, live=live, total_rows=total_rows, console=console,
        interval=None if live else settings.status_interval, rate_limit=settings.rate_limit,
        counter=counter,
    )
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(progress)
            if settings.metrics_port is not None:
                from bulk_engine.admin import serve_admin

                await tg.start(partial(
                    serve_admin, engine, host=settings.metrics_host, port=settings.metrics_port,
                    rows_total=lambda: total_rows if counter is None else counter.total))
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
        print_error(console, str(exc))
        return ExitCode.FATAL
    # The signal handlers stay installed until asyncio.run closes the loop (which removes them):
    # removed here, a second Ctrl-C while the summary prints would raise KeyboardInterrupt with
    # a traceback instead of leaving at once.
    summary_json = result.summary.to_json()
    if summary:
        render_summary(summary_json, console)
    if not console.is_terminal:  # logs read by machines: the summary as one event too
        log.info("run_summary", **summary_json)
    if settings.stats_json is not None:
        try:
            settings.stats_json.write_text(json.dumps(summary_json, indent=2) + "\n",
                                           encoding="utf-8")
        except OSError as write_error:
            print_error(console, f"cannot write --stats-json: {write_error}")
            return ExitCode.FATAL
    if result.error is not None:
        print_error(console, str(result.error))
        return _exit_code(getattr(result.error, "exit_code", ExitCode.FATAL))
    if engine.gate.draining and not result.interrupted:
        console.print(f"drained: every accepted folder was retrieved; "
                      f"{summary_json.get('rows_withdrawn', 0)} withdrawn and the rows not read "
                      "yet are left: rerun the same command to go on", highlight=False)
    if result.interrupted:
        console.print("interrupted: state saved; rerun the same command to resume")
        return (ExitCode.TERMINATED if signals_seen and signals_seen[0] == signal.SIGTERM
                else ExitCode.INTERRUPTED)
    return _exit_code(result.exit_code)
