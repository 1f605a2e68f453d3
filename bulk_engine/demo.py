"""``python -m bulk_engine demo``: a sample archive, the emulator in-process, a full run.

For newcomers: no key, no network. Writes ``bulk-engine-demo/`` in the current directory
(archive, manifest, ``results.jsonl``) and prints the summary; finishes in well under a minute.
The run goes through the same runner as ``python -m bulk_engine MANIFEST.csv`` (panel, Ctrl-C,
summary); the emulator fails 3 % of the folders on purpose, so some rows end ``failed``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
from pathlib import Path

from rich.console import Console

from bulk_engine.errors import BulkEngineError, ConfigError
from bulk_engine.runner import print_error
from bulk_engine.vocab import ExitCode

__all__ = ["DEMO_KEY", "MARKER", "add_arguments", "run"]

DEMO_KEY = "demo-key"
# Written into the demo's directory: the only kind of directory the demo deletes and recreates.
MARKER = ".bulk-engine-demo"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's options, on the ``demo`` subcommand's parser."""
    p.description = __doc__
    p.add_argument("--folders", type=_positive_int, default=48,
                   help="sample folders (default 48)")
    p.add_argument("--dir", type=Path, default=Path("bulk-engine-demo"),
                   help="working directory (default ./bulk-engine-demo; recreated if it holds "
                        "an earlier demo, refused if it holds anything else)")
    p.add_argument("--rate-limit", type=_positive_float, default=20.0,
                   help="calls/s (default 20)")
    p.add_argument("--seed", type=int, default=7, help="seed of the archive and the emulator")
    p.add_argument("--no-progress", action="store_true", help="no live panel")


def _fresh_workdir(workdir: Path) -> None:
    """Empty ``workdir`` for a new demo; never delete a directory the demo did not make."""
    if workdir.exists() or workdir.is_symlink():
        if not workdir.is_dir() or workdir.is_symlink():
            raise ConfigError(f"--dir {workdir} exists and is not a directory")
        if any(workdir.iterdir()) and not (workdir / MARKER).is_file():
            raise ConfigError(f"--dir {workdir} is not empty and was not made by the demo: "
                              "choose another --dir (the demo deletes and recreates it)")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).write_text("made by `python -m bulk_engine demo`; deleted by its next "
                                  "run\n", encoding="utf-8")


async def _demo(ns: argparse.Namespace, console: Console) -> ExitCode:
    from bulk_engine.config import Settings
    from bulk_engine.emulator import EmulatorConfig, run_emulator
    from bulk_engine.runner import run_engine
    from bulk_engine.sample import make_sample_archive

    workdir: Path = ns.dir
    _fresh_workdir(workdir)
    manifest = make_sample_archive(workdir, ns.folders, seed=ns.seed)
    console.print(f"sample archive: {ns.folders} folders under {workdir}/folders")
    config = EmulatorConfig(
        api_keys=(DEMO_KEY,), processing_time=(0.3, 2.0), max_parallel_analyses=10,
        fail_rate=0.03, rate_limit=ns.rate_limit * 1.5, burst=20, seed=ns.seed,
    )
    async with run_emulator(config) as emu:
        console.print(f"emulator listening on {emu.base_url} (in-process)")
        settings = Settings(
            base_url=emu.base_url, api_key=DEMO_KEY, output=workdir / "results.jsonl",
            concurrency=8, rate_limit=ns.rate_limit, burst=10, poll_min=0.5, poll_max=3.0,
            analyse_type=("decision", "share_link"), seed=ns.seed, progress=not ns.no_progress,
            max_failure_rate=0.9,
        )
        code = await run_engine(settings, manifest, console, total_rows=ns.folders)
    meaning = {
        ExitCode.OK: "every row completed",
        ExitCode.SOME_FAILED: "some rows failed: the demo's emulator fails 3 % of folders on "
                              "purpose; a real run would exit 2",
    }.get(code, f"exit code {int(code)}, see above")
    console.print(f"results: {settings.output} ({meaning})")
    console.print(f"next: python -m bulk_engine report {settings.output}")
    return code


def run(ns: argparse.Namespace) -> ExitCode:
    """Run the demo for the parsed ``demo`` options; the exit code (failed rows are expected)."""
    from bulk_engine.logs import configure_logging

    console = Console(stderr=True)
    configure_logging(level="warning", fmt="console")
    try:
        code = asyncio.run(_demo(ns, console))
    except (BulkEngineError, OSError) as exc:
        print_error(console, str(exc))
        return ExitCode.FATAL
    # A demo with a 3 % simulated failure rate finishes with failed rows by design.
    return ExitCode.OK if code in (ExitCode.OK, ExitCode.SOME_FAILED) else code
