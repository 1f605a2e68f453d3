"""Command line: ``python -m bulk_engine [run] MANIFEST.csv [options]``, ``demo``, ``report``,
``bench``, ``export``.

One parser with one subcommand per entry of :data:`COMMANDS`; ``run`` is implied when the first
argument names no command (``python -m bulk_engine manifest.csv`` as ever; a file literally named
``demo``, ``report``, ``bench`` or ``run`` in the current directory is still a manifest). A new
command is one more ``Command`` (its options and its handler) in that table.

Settings come from CLI > environment (``BULK_ENGINE_*``) > ``--config`` TOML > defaults. Exit
codes (``vocab.ExitCode``): 0 every row completed; 2 finished but some rows failed; 1 fatal
(config, usage, auth, I/O) — a usage error of any command is 1, never argparse's 2; 130
interrupted by Ctrl-C (143 by SIGTERM); the state is saved and a rerun resumes. The run itself
goes through ``runner.run_engine``, as the demo and bench do.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console

from bulk_engine.config import DEFAULT_BASE_URL, Settings, load_settings, read_env, unknown_env
from bulk_engine.control import ConfigReloader
from bulk_engine.errors import BulkEngineError, ConfigError
from bulk_engine.logs import Redactor, add_secret, configure_logging, get_logger
from bulk_engine.runner import check_file_target, check_paths, print_error
from bulk_engine.vocab import ExitCode

__all__ = [
    "COMMANDS",
    "EXAMPLES",
    "Command",
    "build_parser",
    "command_parsers",
    "main",
]

EXAMPLES = """\
examples:
  export BULK_ENGINE_API_KEY=...            # the key: from the environment, not argv
  python -m bulk_engine manifest.csv --output results.jsonl --rate-limit 10
  python -m bulk_engine manifest.csv --concurrency 16 --poll-min 10 --poll-max 30
  python -m bulk_engine --root /archive/folders --output results.jsonl
  python -m bulk_engine --root s3://archive/cases/ --output results.jsonl   # extra: [s3]
  python -m bulk_engine manifest.csv --config backfill.toml --stats-json stats.json
  python -m bulk_engine manifest.csv --dry-run         # check every row, send nothing
  python -m bulk_engine manifest.csv --retry-failed    # rerun only the failed rows
  python -m bulk_engine manifest.csv --retry-failed token_expired,server_error
  python -m bulk_engine manifest.csv --metrics-port 9464   # /metrics; SIGUSR1 drains
  nohup python -m bulk_engine manifest.csv --log-file run.log &   # JSON logs, status lines
  python -m bulk_engine demo                           # sample archive + local emulator
  python -m bulk_engine bench --rate-limit 20          # sweep settings against an emulator
  python -m bulk_engine report results.jsonl --failed-manifest failed.csv --chart run.png
  BULK_ENGINE_DB=postgresql://... python -m bulk_engine manifest.csv   # one worker of many
  python -m bulk_engine export --db postgresql://... --output results.jsonl

settings: command line > environment (BULK_ENGINE_<NAME>, e.g. BULK_ENGINE_RATE_LIMIT=20)
  > --config FILE (TOML; every setting is listed in config/default.toml) > defaults.

exit codes: 0 all completed, 2 some rows failed, 1 fatal error (bad settings or usage, bad key,
  I/O), 130 interrupted by Ctrl-C, 143 by SIGTERM (state saved: rerun the same command to resume)
"""

_RUN_DESCRIPTION = """\
Backfill folders of documents through the Case Analysis API: one manifest row per folder, one
JSONL line per row, crash-safe resume.

commands: run (the default: `bulk-engine run MANIFEST.csv` is `bulk-engine MANIFEST.csv`),
  demo, report, bench, export; `bulk-engine COMMAND --help` shows each one's options.
"""

_REPORT_EPILOG = """\
examples:
  python -m bulk_engine report results.jsonl
  python -m bulk_engine report results.jsonl --json > summary.json
  python -m bulk_engine report results.jsonl --failed-manifest failed.csv --manifest manifest.csv
  python -m bulk_engine failed.csv --output rerun.jsonl         # then rerun the failed rows
  python -m bulk_engine report results.jsonl --chart run.png    # needs bulk-engine[plot]

Folders in the output are as written in the original manifest (relative to its directory);
the failed manifest gets absolute folders: from each line's `path`, else --base-dir, and with
--manifest every original column (use_case, payload...) is kept. Lines repeating a row already
in the file (two runs appended to one output) are counted as `duplicate_lines`.
"""


class _UsageError(ConfigError):
    """A command line argparse cannot parse; carries the command's one-line usage."""

    def __init__(self, message: str, usage: str) -> None:
        super().__init__(message)
        self.usage = usage


class _Parser(argparse.ArgumentParser):
    """Usage errors are configuration errors: exit 1, since 2 means "some rows failed"."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see {self.prog} --help)", self.format_usage().strip())


# ---- the commands ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Command:
    """One subcommand: its one-line help, its options, and the handler that runs it.

    ``add_arguments`` fills the command's parser (options, description, epilog); ``run`` gets
    the parsed options and the raw arguments (to redact a key given on the command line before
    logging is set up) and returns the exit code.
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Sequence[str]], int]


def _run_arguments(p: argparse.ArgumentParser) -> None:
    # Its usage is the program's: `bulk-engine MANIFEST.csv`, `run` implied.
    p.prog = "bulk-engine"
    p.usage = "%(prog)s [run] [MANIFEST.csv | --root DIR] [options]"
    p.description = _RUN_DESCRIPTION
    p.epilog = EXAMPLES
    p.add_argument("manifest", nargs="?", type=Path,
                   help="CSV with a `folder` column (and optional id, use_case, analyse_type, "
                        "payload); relative folders resolve against the manifest's directory")
    a = p.add_argument
    # A string, not a Path: Path("s3://b/p/") would fold the "//" (config parses it).
    a("--root", help="instead of a manifest: every leaf folder under DIR (or leaf prefix "
                     "under s3://BUCKET/PREFIX/) is a row")
    a("--base-url", help=f"API base URL (env BULK_ENGINE_BASE_URL, default {DEFAULT_BASE_URL})")
    a("--api-key", help="API key (prefer env BULK_ENGINE_API_KEY: argv is visible to others)")
    a("--output", type=Path, help="JSONL output path (default results.jsonl)")
    a("--journal", type=Path, help="journal path (default OUTPUT.journal)")
    a("--config", type=Path, help="TOML settings file (see config/default.toml)")
    a("--concurrency", type=int, help="uploads in flight (default 8)")
    a("--rate-limit", metavar="auto|R",
      help="API calls per second, all endpoints together: auto (default) finds the key's rate "
           "from its 429s; a number is a hard, fixed ceiling")
    a("--burst", type=int, help="calls allowed at once above the steady rate (default 10)")
    a("--poll-min", type=float, help="shortest wait between polls of a token, s (default 10)")
    a("--poll-max", type=float, help="longest wait between polls of a token, s (default 30)")
    a("--max-outstanding", type=int,
      help="submitted folders not yet retrieved, at most (default 2000); the window adapts "
           "to the API's parallel capacity below it")
    a("--fixed-window", dest="adaptive_window", action="store_false", default=None,
      help="keep the outstanding window at --max-outstanding (no adaptation)")
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
    a("--s3-endpoint-url", help="S3-compatible store of s3:// folders (default: "
      "AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / the AWS profile's, else AWS)")
    a("--retry-failed", action=_RetryFailed, nargs="?", default=None, metavar="KINDS",
      help="resubmit rows whose outcome was failed (the output is rewritten without them); "
           "KINDS (comma-separated error kinds, e.g. token_expired,server_error) limits it to "
           "those")
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
    a("--db", help="postgresql://USER:PASSWORD@HOST/DB: this process is one worker of a run "
                   "shared with every worker given the same manifest (prefer env "
                   "BULK_ENGINE_DB: argv is visible to others); see `export`")
    a("--run", help="with --db: the shared run's name (default: derived from the manifest's "
                    "content and the settings, so every worker joins the same run)")
    a("--metrics-port", type=int, metavar="PORT",
      help="serve Prometheus /metrics and /control/* (pause, resume, drain, settings) on PORT")
    a("--metrics-host", metavar="HOST",
      help="address of that server (default 127.0.0.1; another needs BULK_ENGINE_CONTROL_TOKEN)")
    a("--stuck-factor", type=float, metavar="K",
      help="warn when a folder runs past K times the learned p99 processing time (default 3)")


class _RetryFailed(argparse.Action):
    """``--retry-failed`` alone: every failed row; ``--retry-failed KINDS``: those kinds."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        namespace.retry_failed = True
        if values:
            namespace.retry_failed_kinds = values


_KINDS = re.compile(r"[a-z_]+(,[a-z_]+)*")


def _bare_retry_failed(argv: list[str]) -> list[str]:
    """``--retry-failed manifest.csv`` keeps meaning "every failed row" of that manifest: the
    word after the flag is taken as kinds only if it looks like kinds and names no file."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        nxt = out[i + 1]
        if arg == "--retry-failed" and not nxt.startswith("-") and (
                not _KINDS.fullmatch(nxt) or Path(nxt).exists()):
            out[i] = "--retry-failed="
    return out


def _early_redactor(argv: Sequence[str]) -> Redactor:
    """Until logging is configured, redact the key as the user gave it (argv or environment)."""
    return Redactor([
        os.environ.get("BULK_ENGINE_API_KEY", ""),
        *(argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--api-key"),
        *(a.split("=", 1)[1] for a in argv if a.startswith("--api-key=")),
    ])


def _cli_settings(ns: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(ns).items() if k not in ("command", "manifest", "config")}


def _reloader(ns: argparse.Namespace) -> ConfigReloader | None:
    """How SIGHUP re-reads the settings: as at the start, when there is a file to re-read."""
    if ns.config is None and not os.environ.get("BULK_ENGINE_CONFIG"):
        return None
    cli = _cli_settings(ns)
    pinned = {k for k, v in cli.items() if v is not None} | set(read_env(os.environ))
    return ConfigReloader(partial(load_settings, cli=cli, config_file=ns.config),
                          frozenset(pinned))


def _run(ns: argparse.Namespace, argv: Sequence[str]) -> int:
    """``bulk-engine [run] MANIFEST.csv``: settings, checks, then the dry run or the run."""
    import asyncio

    from bulk_engine.runner import run_engine

    console = Console(stderr=True)
    early = _early_redactor(argv)
    try:
        settings = load_settings(cli=_cli_settings(ns), config_file=ns.config)
        if ns.manifest is None and settings.root is None:
            raise ConfigError("give a manifest CSV (or --root DIR); see --help")
        if ns.manifest is not None and ns.root is not None:
            raise ConfigError("give a manifest CSV or --root DIR, not both")
        if ns.manifest is not None and not ns.manifest.is_file():
            raise ConfigError(f"manifest {ns.manifest} does not exist or is not a file")
        # Every path the run (or the dry run) writes, before any work: a directory given as
        # --stats-json must not surface as a traceback after the run.
        check_paths(settings)
        configure_logging(level=settings.log_level, fmt=settings.log_format,
                          log_file=settings.log_file, secrets=[settings.api_key or ""])
    except BulkEngineError as exc:
        print_error(console, early.redact_text(str(exc)))
        return ExitCode.FATAL
    except OSError as exc:  # the log file cannot be opened
        print_error(console, early.redact_text(f"cannot open log file: {exc}"))
        return ExitCode.FATAL
    log = get_logger()
    if ns.api_key:
        log.warning("api_key_on_command_line",
                    hint="argv is visible to other users: prefer BULK_ENGINE_API_KEY")
    if ns.db and _has_password(ns.db):
        log.warning("db_password_on_command_line",
                    hint="argv is visible to other users: prefer BULK_ENGINE_DB or ~/.pgpass")
    for name in unknown_env(os.environ):
        log.warning("unknown_environment_variable", name=name,
                    hint="not a bulk_engine setting (see config/default.toml): ignored")
    _warn_plain_http(settings)
    if settings.dry_run:
        from bulk_engine.plan import dry_run

        return dry_run(settings, ns.manifest, console)
    return asyncio.run(run_engine(settings, ns.manifest, console, reloader=_reloader(ns)))


def _has_password(url: str) -> bool:
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).password is not None or "password=" in url
    except ValueError:
        return False


def _warn_plain_http(settings: Settings) -> None:
    from urllib.parse import urlsplit

    url = urlsplit(settings.base_url)
    if url.scheme == "http" and url.hostname not in ("localhost", "127.0.0.1", "::1"):
        get_logger().warning("plain_http", host=url.hostname,
                             hint="the API key would travel unencrypted; use https://")


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Summarize an output file (partial and torn files too), write a manifest "
                     "of the failed rows ready to rerun, draw a chart.")
    p.epilog = _REPORT_EPILOG
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


def _report(ns: argparse.Namespace, argv: Sequence[str]) -> int:
    """``python -m bulk_engine report results.jsonl [--failed-manifest F] [--chart PNG] ...``."""
    from bulk_engine.report import read_results, render_summary, write_chart, write_failed_manifest

    console = Console(stderr=True)
    try:
        if not ns.results.is_file():
            raise ConfigError(f"{ns.results} does not exist or is not a file")
        if ns.manifest is not None and ns.failed_manifest is None:
            raise ConfigError("--manifest is used with --failed-manifest")
        check_file_target("--stats-json", ns.stats_json)
        check_file_target("--failed-manifest", ns.failed_manifest, parent_must_exist=False)
        check_file_target("--chart", ns.chart, parent_must_exist=False)
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
    except (BulkEngineError, OSError) as exc:
        print_error(console, str(exc))
        return ExitCode.FATAL
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
    return ExitCode.OK


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Write the lines of a run shared through --db as a JSONL output file (the "
                     "schema of a single machine's output; `report` reads it), replacing the "
                     "file atomically.")
    p.add_argument("--db", help="postgresql://USER:PASSWORD@HOST/DB (env BULK_ENGINE_DB)")
    p.add_argument("--run", help="the run's name (default: the database's only run)")
    p.add_argument("--output", type=Path, default=Path("results.jsonl"),
                   help="JSONL file to write (default results.jsonl)")
    p.add_argument("--since", type=int, metavar="N",
                   help="only the rows finished after export sequence N (each export prints "
                        "the sequence it reached)")
    p.add_argument("--config", type=Path, help="TOML settings file (db, run)")


def _export(ns: argparse.Namespace, argv: Sequence[str]) -> int:
    """``python -m bulk_engine export [--db URL] [--run NAME] --output results.jsonl``."""
    import asyncio

    console = Console(stderr=True)
    try:
        settings = load_settings(cli={"db": ns.db, "run": ns.run}, config_file=ns.config)
        if settings.db is None:
            raise ConfigError("export needs the database: --db postgresql://... (or "
                              "BULK_ENGINE_DB)")
        if ns.since is not None and ns.since < 0:
            raise ConfigError(f"--since must be 0 or more, got {ns.since}")
        check_file_target("--output", ns.output)
        configure_logging(level="warning", fmt="auto")  # db_unavailable while it waits
        from bulk_engine.pg.connect import parse_dsn
        from bulk_engine.pg.export import export_run

        add_secret(parse_dsn(settings.db)[1])
        rep = asyncio.run(export_run(settings.db, ns.output, run=settings.run, since=ns.since,
                                     connect_timeout=settings.connect_timeout))
    except (BulkEngineError, OSError) as exc:
        print_error(console, str(exc))
        return ExitCode.FATAL
    console.print(f"exported {rep.lines} line(s) of run {rep.run!r} to {rep.path} (rows "
                  f"finished after sequence {rep.since}, up to {rep.last}); "
                  f"{rep.rows_not_done} of {rep.rows_total} row(s) not done yet; next "
                  f"incremental export: --since {rep.last}", highlight=False, markup=False)
    return ExitCode.OK


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    from bulk_engine.demo import add_arguments

    add_arguments(p)


def _demo(ns: argparse.Namespace, argv: Sequence[str]) -> int:
    from bulk_engine.demo import run

    return run(ns)


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    from bulk_engine.bench import add_arguments

    add_arguments(p)


def _bench(ns: argparse.Namespace, argv: Sequence[str]) -> int:
    from bulk_engine.bench import run

    return run(ns)


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command("run", "backfill an archive: one manifest row per folder (the default)",
                _run_arguments, _run),
        Command("demo", "a sample archive, the emulator in-process, a full run",
                _demo_arguments, _demo),
        Command("report", "summarize an output file; a manifest of its failed rows; a chart",
                _report_arguments, _report),
        Command("bench", "sweep concurrency × rate against an emulator; recommend settings",
                _bench_arguments, _bench),
        Command("export", "write a run shared through --db (PostgreSQL) as a JSONL file",
                _export_arguments, _export),
    )
}


def build_parser() -> argparse.ArgumentParser:
    """The command line's one parser: a subparser per entry of :data:`COMMANDS`."""
    parser = _Parser(
        prog="bulk-engine",
        description="Backfill folders of documents through the Case Analysis API.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.add_arguments(p)
        p.set_defaults(command=cmd.name)
    return parser


def command_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommands' parsers of :func:`build_parser`'s parser, by command name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise ValueError("not a parser with subcommands")


def _with_command(argv: list[str]) -> list[str]:
    """``run`` is implied unless the first argument names a command; a file of that name in the
    current directory is still a manifest, as it was before there were subcommands."""
    if argv and argv[0] in COMMANDS and not Path(argv[0]).exists():
        return argv
    return ["run", *argv]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bulk_engine``: parse, run the command, return its exit code.

    Ctrl-C before the run's own handlers are in place (settings, a long dry run) or after they
    are gone is a short message and 130, never a traceback.
    """
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted (Ctrl-C)\n")
        return ExitCode.INTERRUPTED


def _main(argv: list[str]) -> int:
    argv = _bare_retry_failed(_with_command(argv))
    parser = build_parser()
    try:
        ns, extras = parser.parse_known_args(argv)
        if extras:
            command_parsers(parser)[ns.command].error(
                f"unrecognized arguments: {' '.join(extras)}")
    except _UsageError as exc:
        console = Console(stderr=True)
        redactor = _early_redactor(argv)
        console.print(redactor.redact_text(exc.usage), highlight=False, markup=False)
        print_error(console, redactor.redact_text(str(exc)))
        return ExitCode.FATAL
    return COMMANDS[ns.command].run(ns, argv)
