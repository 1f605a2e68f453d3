"""The command line: help, exit codes for bad settings, --dry-run sends nothing, a full run."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from structlog.testing import capture_logs

from bulk_engine.cli import main
from bulk_engine.emulator import EmulatorConfig, run_emulator
from bulk_engine.engine import Engine
from bulk_engine.logs import reset_logging
from bulk_engine.runner import run_engine
from bulk_engine.vocab import ExitCode

from archive_factory import make_archive
from conftest import API_KEY, engine_settings, read_lines
from procs import child_env, wait_for

pytestmark = pytest.mark.timeout(30)
FAST = EmulatorConfig(api_keys=(API_KEY,), processing_time=(0.01, 0.03), seed=1)


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("BULK_ENGINE_API_KEY", "BULK_ENGINE_CONFIG", "BULK_ENGINE_CONCURRENCY"):
        monkeypatch.delenv(name, raising=False)
    yield
    reset_logging()


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    return capsys.readouterr().err


# ---- help and bad settings ------------------------------------------------------------------


def test_help_shows_examples_precedence_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    """--help ends with examples, the settings precedence and the exit codes."""
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for want in ("examples:", "--dry-run", "report results.jsonl", "BULK_ENGINE_<NAME>",
                 "config/default.toml", "exit codes:", "130 interrupted", "--status-interval",
                 "--log-file", "--stats-json"):
        assert want in out, want


@pytest.mark.parametrize(("argv", "message"), [
    (["m.csv", "--concurrency", "0"], "concurrency must be at least 1, got 0 (from --concurrency)"),
    (["m.csv", "--poll-min", "40"], "poll_max (30.0) must not be below poll_min (40.0)"),
    (["m.csv", "--analyse-type", "decision,verdict"], "unknown analyse_type 'verdict'"),
    (["m.csv", "--concurrency", "lots"], "argument --concurrency: invalid int value: 'lots'"),
    (["m.csv", "--mode", "turbo"], "argument --mode: invalid choice: 'turbo'"),
    (["m.csv", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["m.csv", "--base-url", "api.example.com"], "base_url must be an http:// or https:// URL"),
    ([], "give a manifest CSV (or --root DIR)"),
    (["missing.csv"], "manifest missing.csv does not exist"),
    (["m.csv", "--root", "."], "give a manifest CSV or --root DIR, not both"),
    (["m.csv", "--stats-json", "/no/such/dir/s.json"], "stats_json: directory /no/such/dir"),
    (["m.csv", "--config", "nope.toml"], "config file nope.toml does not exist"),
])
def test_bad_settings_exit_1_with_a_precise_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    argv: list[str], message: str,
) -> None:
    """Bad values and usage errors exit 1 (2 means "rows failed"), with the exact problem."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.csv").write_text("folder\nx\n")
    assert main(argv) == 1
    err = _err(capsys)
    assert message in err, err
    assert "Traceback" not in err


def test_bad_environment_value_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad BULK_ENGINE_* value names the variable."""
    (tmp_path / "m.csv").write_text("folder\nx\n")
    monkeypatch.setenv("BULK_ENGINE_CONCURRENCY", "-2")
    assert main([str(tmp_path / "m.csv")]) == 1
    assert "concurrency must be at least 1, got -2 (from BULK_ENGINE_CONCURRENCY)" in _err(capsys)


def test_bad_config_file_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad --config entry names the file and the setting."""
    (tmp_path / "m.csv").write_text("folder\nx\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text("rate_limit = -1\n")
    assert main([str(tmp_path / "m.csv"), "--config", str(cfg)]) == 1
    err = _err(capsys)
    assert "rate_limit must be a positive number" in err and "c.toml" in err


def test_errors_never_show_the_key_nor_break_on_brackets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An error quoting the key prints it redacted; brackets in paths are not markup."""
    monkeypatch.chdir(tmp_path)
    assert main(["m.csv", "--api-key", "sekrit-123", "--base-url", "ftp://sekrit-123@h"]) == 1
    err = _err(capsys)
    assert "sekrit-123" not in err and "[REDACTED]" in err
    assert main(["[/tmp/x]/m.csv"]) == 1
    assert "manifest [/tmp/x]/m.csv does not exist" in _err(capsys)


def test_missing_api_key_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A real run without a key stops before any work with a hint."""
    manifest = make_archive(tmp_path / "a", 2, seed=1)
    assert main([str(manifest), "--output", str(tmp_path / "o.jsonl")]) == 1
    assert "no API key: set BULK_ENGINE_API_KEY" in _err(capsys)


def test_unknown_environment_variable_is_warned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A typo in a BULK_ENGINE_* name is logged as a warning (it would be silently ignored)."""
    manifest = make_archive(tmp_path / "a", 1, seed=1)
    monkeypatch.setenv("BULK_ENGINE_CONCURENCY", "4")
    log = tmp_path / "run.log"
    assert main([str(manifest), "--dry-run", "--output", str(tmp_path / "o.jsonl"),
                 "--log-file", str(log)]) == 0
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["event"], e["name"]) for e in events] == [
        ("unknown_environment_variable", "BULK_ENGINE_CONCURENCY")]


# ---- one parser, every command -----------------------------------------------------------------


@pytest.mark.parametrize(("argv", "prog", "message"), [
    (["demo", "--bogus"], "bulk-engine demo", "unrecognized arguments: --bogus"),
    (["bench", "--bogus"], "bulk-engine bench", "unrecognized arguments: --bogus"),
    (["report", "--bogus"], "bulk-engine report", "required: results"),
    (["run", "m.csv", "--bogus"], "bulk-engine", "unrecognized arguments: --bogus"),
    (["m.csv", "extra.csv"], "bulk-engine", "unrecognized arguments: extra.csv"),
    (["demo", "--folders", "0"], "bulk-engine demo", "must be at least 1, got 0"),
    (["demo", "--rate-limit", "fast"], "bulk-engine demo", "--rate-limit: invalid"),
    (["bench", "--processing-time", "5:1"], "bulk-engine bench", "need 0 <= MIN <= MAX"),
    (["bench", "--concurrency", "0,2"], "bulk-engine bench", "must be positive"),
    (["bench", "--rates", "ten"], "bulk-engine bench", "--rates: invalid"),
])
def test_every_command_usage_error_exits_1_with_its_usage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    argv: list[str], prog: str, message: str,
) -> None:
    """A usage error of any command exits 1 (never argparse's 2), with that command's usage."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.csv").write_text("folder\nx\n")
    assert main(argv) == 1
    err = _err(capsys)
    assert err.startswith(f"usage: {prog} "), err
    assert message in err and f"(see {prog} --help)" in err, err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == [tmp_path / "m.csv"]  # nothing was started


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_python_m_usage_error_exits_1(tmp_path: Path, command: str) -> None:
    """`python -m bulk_engine demo --bogus` (and bench) exit 1, as the contract says."""
    proc = subprocess.run([sys.executable, "-m", "bulk_engine", command, "--bogus"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env=child_env())
    assert proc.returncode == 1, proc.stderr
    assert f"usage: bulk-engine {command}" in proc.stderr
    assert "unrecognized arguments: --bogus" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(("command", "wants"), [
    ("run", ["usage: bulk-engine [run] [MANIFEST.csv | --root DIR]", "commands:", "demo, report,"
             " bench", "--dry-run", "examples:"]),
    ("demo", ["usage: bulk-engine demo", "--folders", "--dir", "no key, no network"]),
    ("report", ["usage: bulk-engine report", "results", "--failed-manifest", "--chart",
                "examples:", "duplicate_lines"]),
    ("bench", ["usage: bulk-engine bench", "--concurrency", "--rates", "--processing-time",
               "recommend"]),
])
def test_every_command_has_a_useful_help(
    capsys: pytest.CaptureFixture[str], command: str, wants: list[str]
) -> None:
    """`COMMAND --help` exits 0 and shows that command's usage, options and description."""
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert [w for w in wants if w not in out] == []


def _plan_of(argv: list[str], plan_json: Path) -> dict[str, Any]:
    code = main([*argv, "--stats-json", str(plan_json)])
    assert code in (0, 2)
    return json.loads(plan_json.read_text())  # type: ignore[no-any-return]


def test_run_is_implied_or_explicit(tmp_path: Path) -> None:
    """`bulk-engine run M.csv` is `bulk-engine M.csv`."""
    manifest = make_archive(tmp_path / "a", 4, seed=5)
    base = ["--dry-run", "--output", str(tmp_path / "o.jsonl")]
    implied = _plan_of([str(manifest), *base], tmp_path / "p1.json")
    explicit = _plan_of(["run", str(manifest), *base], tmp_path / "p2.json")
    assert implied == explicit and implied["rows_to_submit"] == 4


@pytest.mark.parametrize("name", ["demo", "report", "bench", "run"])
def test_a_manifest_named_like_a_command_is_still_a_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """A file literally named `demo` (report, bench, run) in the cwd is the manifest, as before."""
    manifest = make_archive(tmp_path, 3, seed=6)
    manifest.rename(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    plan = _plan_of([name, "--dry-run", "--output", "o.jsonl"], tmp_path / "plan.json")
    assert plan["rows_read"] == 3 and plan["rows_to_submit"] == 3


# ---- paths that cannot be written --------------------------------------------------------------


@pytest.mark.parametrize(("flag", "name", "dry_run"), [
    ("--stats-json", "stats_json", True),
    ("--stats-json", "stats_json", False),
    ("--log-file", "log_file", True),
    ("--output", "output", True),
    ("--output", "output", False),
    ("--journal", "journal", True),
])
def test_a_directory_as_a_file_path_is_refused_up_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    no_network: socket.socket, flag: str, name: str, dry_run: bool,
) -> None:
    """--stats-json/--log-file/--output/--journal naming a directory: exit 1 naming it, no
    traceback, nothing done (the dry run as well as the real run)."""
    manifest = make_archive(tmp_path / "a", 2, seed=7)
    target = tmp_path / "a-directory"
    target.mkdir()
    monkeypatch.setenv("BULK_ENGINE_API_KEY", API_KEY)
    port = no_network.getsockname()[1]
    argv = [str(manifest), "--base-url", f"http://127.0.0.1:{port}", "--no-progress"]
    if flag != "--output":
        argv += ["--output", str(tmp_path / "o.jsonl")]
    argv += [flag, str(target)] + (["--dry-run"] if dry_run else [])
    assert main(argv) == 1
    err = _err(capsys)
    assert f"{name}: {target} is a directory" in err.replace("\n", ""), err
    assert "Traceback" not in err and "IsADirectoryError" not in err
    assert list(target.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "a-directory"]


def test_run_engine_refuses_a_directory_as_stats_json(tmp_path: Path) -> None:
    """The runner checks the paths itself (for the demo, bench and library callers)."""
    manifest = make_archive(tmp_path / "a", 1, seed=8)
    buf = io.StringIO()
    settings = engine_settings("http://127.0.0.1:9", tmp_path / "o.jsonl", stats_json=tmp_path)
    code = asyncio.run(run_engine(settings, manifest, Console(file=buf, width=200)))
    assert code == ExitCode.FATAL
    assert f"stats_json: {tmp_path} is a directory" in buf.getvalue()
    assert not (tmp_path / "o.jsonl").exists()

# ---- --dry-run ------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A listening socket to point --base-url at, and sockets that refuse to connect anywhere."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"network used during --dry-run: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield listener
    with pytest.raises(BlockingIOError):
        listener.accept()  # nobody came
    listener.close()


def test_dry_run_plans_and_sends_nothing(
    tmp_path: Path, no_network: socket.socket, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rows, files, bytes, rejected rows and an estimate; no key needed, nothing sent; exit 2."""
    manifest = make_archive(tmp_path / "a", 20, seed=2)
    with manifest.open("a", encoding="utf-8") as fh:
        fh.write("gone,does/not/exist\ncase-00003,folders/x\n")
    plan_json = tmp_path / "plan.json"
    port = no_network.getsockname()[1]
    code = main([str(manifest), "--dry-run", "--base-url", f"http://127.0.0.1:{port}",
                 "--output", str(tmp_path / "o.jsonl"), "--rate-limit", "4",
                 "--stats-json", str(plan_json)])
    assert code == 2  # some rows would fail
    plan = json.loads(plan_json.read_text())
    assert plan["rows_read"] == 22
    assert plan["rows_to_submit"] == 20 and plan["rows_already_done"] == 0
    assert plan["rejected_by_kind"] == {"folder_missing": 1, "duplicate_id": 1}
    assert plan["files"] > 20 and plan["bytes"] > 0
    assert plan["api_calls"] == 40 and plan["estimated_seconds"] == 20  # 40/4 + poll_min 10
    assert plan["journal"] == "none"
    out = _err(capsys)
    assert "Dry run: nothing was sent" in out and "folder_missing" in out
    assert not (tmp_path / "o.jsonl").exists()
    assert not (tmp_path / "o.jsonl.journal").exists()


async def test_dry_run_counts_rows_already_done(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After a run, a dry run of the manifest grown longer skips the done rows, as a rerun would.

    (The same manifest file and API host: a journal of another manifest or host is refused, by
    the run and the dry run alike, see test_dry_run_refuses_a_journal_of_another_run.)"""
    manifest = make_archive(tmp_path / "a", 30, seed=3)
    full = manifest.read_text()
    manifest.write_text("".join(full.splitlines(keepends=True)[:11]))  # header + 10 rows
    out = tmp_path / "o.jsonl"
    async with run_emulator(FAST) as emu:
        result = await Engine(engine_settings(emu.base_url, out), manifest).run()
        base_url = emu.base_url
    assert result.exit_code == 0
    manifest.write_text(full)  # 20 more rows since
    before = out.read_bytes()
    plan_json = tmp_path / "plan.json"
    assert main([str(manifest), "--dry-run", "--output", str(out), "--mode", "auto",
                 "--base-url", base_url, "--stats-json", str(plan_json)]) == 0
    plan = json.loads(plan_json.read_text())
    assert (plan["rows_already_done"], plan["rows_to_submit"], plan["sync_rows"]) == (10, 20, 20)
    assert plan["journal"] == "read"
    assert plan["api_calls"] == 20  # sync rows: one call each
    assert "(20 in sync mode)" in _err(capsys)
    assert out.read_bytes() == before  # the dry run wrote nothing



def _state_files(folder: Path) -> dict[str, bytes]:
    """The output, the journal and its lock, byte for byte. (A read-only SQLite connection may
    add empty -wal/-shm files beside a WAL journal: SQLite's, not a change of the journal.)"""
    return {p.name: p.read_bytes() for p in folder.iterdir()
            if p.is_file() and not p.name.endswith(("-wal", "-shm"))}


def _run_once(manifest: Path, out: Path) -> tuple[str, int]:
    """One engine run against a fresh emulator: (its base URL, the exit code)."""
    async def go() -> tuple[str, int]:
        async with run_emulator(FAST) as emu:
            result = await Engine(engine_settings(emu.base_url, out), manifest).run()
            return emu.base_url, result.exit_code

    return asyncio.run(go())


def test_dry_run_refuses_a_journal_of_another_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the run would refuse the journal's settings, the dry run refuses them too, with the
    run's own message, and exits 1 instead of counting "already done" rows; it writes nothing."""
    manifest = make_archive(tmp_path / "a", 6, seed=9)
    out = tmp_path / "o.jsonl"
    base_url, code = _run_once(manifest, out)
    assert code == 0
    journal = Path(f"{out}.journal")
    files = _state_files(tmp_path)
    other = [str(manifest), "--output", str(out), "--base-url", base_url, "--use-case", "credit"]
    assert main([*other, "--dry-run"]) == 1
    dry_err = _err(capsys)
    assert "belong to a different run" in dry_err and '"use_case": "credit"' in dry_err
    assert "Dry run" not in dry_err
    assert _state_files(tmp_path) == files
    # The real run (no network needed: it stops at the journal) says the very same thing.
    monkeypatch.setenv("BULK_ENGINE_API_KEY", API_KEY)
    assert main([*other, "--no-progress", "--log-level", "error"]) == 1
    assert _err(capsys).strip().splitlines()[-1] == dry_err.strip().splitlines()[-1]
    # With the run's own settings, the dry run reads the journal as before.
    plan = _plan_of([str(manifest), "--output", str(out), "--base-url", base_url, "--dry-run"],
                    tmp_path / "plan.json")
    assert (plan["rows_already_done"], plan["journal"]) == (6, "read")
    assert journal.exists()


def test_dry_run_counts_live_tokens_as_polls_not_uploads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A row whose retrieve token an earlier run journaled is polled by the rerun, not uploaded:
    the plan counts it "to poll (resumed token)"; a row caught mid-upload is to submit again."""
    from bulk_engine.journal import Journal, settings_fingerprint, settings_summary
    from bulk_engine.manifest import RowDefaults, iter_manifest
    from bulk_engine.models import Job

    manifest = make_archive(tmp_path / "a", 5, seed=10)
    out = tmp_path / "o.jsonl"
    settings = engine_settings("http://127.0.0.1:9", out)
    jobs = [j for j in iter_manifest(manifest, defaults=RowDefaults.from_settings(settings),
                                     max_file_size=1 << 30) if isinstance(j, Job)]
    with Journal.open(settings.journal_path) as journal:
        journal.check_settings(settings_fingerprint(settings, manifest),
                               summary=settings_summary(settings, manifest))
        for job in jobs[:3]:
            journal.mark_submitting(job, 1)
        journal.mark_submitted(jobs[0].key, "gAAAAA-live-token-0", None, 1.0)
        journal.mark_submitted(jobs[1].key, "gAAAAA-live-token-1", None, 1.0)
        journal.mark_done_many([(jobs[3].key, "completed")], 0)  # jobs[2]: still submitting
    plan = _plan_of([str(manifest), "--output", str(out), "--base-url", "http://127.0.0.1:9",
                     "--dry-run"], tmp_path / "plan.json")
    assert (plan["rows_read"], plan["rows_already_done"], plan["rows_to_poll"],
            plan["rows_to_submit"]) == (5, 1, 2, 2)
    assert plan["api_calls"] == 2 * 2 + 2  # two uploads with their poll, two polls
    assert "to poll (resumed token)" in _err(capsys)

# ---- a full run -----------------------------------------------------------------------------


async def test_run_prints_summary_writes_stats_json_and_logs(tmp_path: Path) -> None:
    """run_engine: exit 0, the summary on the console, --stats-json, one row_done per row."""
    manifest = make_archive(tmp_path / "a", 15, seed=4)
    out, stats = tmp_path / "o.jsonl", tmp_path / "stats.json"
    buf = io.StringIO()
    console = Console(file=buf, width=120, color_system=None)
    async with run_emulator(FAST) as emu:
        settings = engine_settings(emu.base_url, out, stats_json=stats)
        with capture_logs() as logs:
            code = await run_engine(settings, manifest, console)
    assert code == 0
    summary = json.loads(stats.read_text())
    assert summary["rows"] == 15 and summary["by_status"] == {"completed": 15}
    assert summary["api_calls"] >= 30 and summary["throttled_429"] == 0
    assert summary["latency_s"]["p50"] > 0
    text = buf.getvalue()
    assert "Run summary" in text and "latency p50 / p95 / p99" in text
    assert len([e for e in logs if e["event"] == "row_done"]) == 15
    assert [e["rows"] for e in logs if e["event"] == "run_summary"] == [15]
    lines = read_lines(out)
    assert all(rec["path"] == str(manifest.parent / rec["folder"]) for rec in lines)
    assert all(rec["possible_duplicate"] is False for rec in lines)


# ---- the README ------------------------------------------------------------------------------


def test_readme_covers_every_flag_output_field_and_exit_code() -> None:
    """Each CLI flag, each output field and each exit code is in the README; it has Tuning."""
    from bulk_engine.cli import build_parser, command_parsers
    from bulk_engine.models import Outcome

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    parsers = command_parsers(build_parser())
    flags = [o for name in ("run", "report") for a in parsers[name]._actions
             for o in a.option_strings if o not in ("-h", "--help")]
    assert "--dry-run" in flags and "--failed-manifest" in flags
    assert [f for f in flags if f"`{f}" not in readme] == []
    fields = Outcome(key="k", line=1, id="i", folder="f", status="completed").to_json()
    assert [f for f in fields if f"`{f}`" not in readme] == []
    for code in ("0", "1", "2", "130"):
        assert f"| {code} |" in readme
    assert "## Tuning" in readme and "bulk_engine bench" in readme


# ---- Ctrl-C at any moment -------------------------------------------------------------------

_IMPORT_LINE = "import time:"


def _import_lines_after_package(log: Path) -> int:
    """`-X importtime` lines written after the package's own import completed (-1: not yet)."""
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    for i, line in enumerate(lines):
        if line.startswith(_IMPORT_LINE) and line.rstrip().endswith("| bulk_engine"):
            return sum(1 for x in lines[i + 1:] if x.startswith(_IMPORT_LINE))
    return -1


def _interrupt_at(moment: int | str, manifest: Path, url: str, listener: socket.socket,
                  tmp_path: Path) -> tuple[int | str, int, str]:
    """Start the CLI, SIGINT it at ``moment``; (moment, exit code, stderr without import lines).

    ``moment``: that many import lines after the package's own, or "connected": once the run
    has opened its first connection to ``listener``.
    """
    err_path = tmp_path / f"err-{moment}.log"
    with err_path.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "bulk_engine", str(manifest),
             "--output", str(tmp_path / f"o-{moment}.jsonl"), "--base-url", url,
             "--no-progress", "--log-format", "json"],
            stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path,
            # faulthandler: a process that does not exit is made to show where it is stuck
            env=child_env(BULK_ENGINE_API_KEY=API_KEY, PYTHONFAULTHANDLER="1"),
        )
        try:
            if moment == "connected":
                conn, _ = listener.accept()  # the run is under way
                conn.close()
            else:
                wait_for(lambda: (_import_lines_after_package(err_path) >= int(moment)
                                  or proc.poll() is not None),
                         timeout=60, what=f"{moment} imports")
            assert proc.poll() is None, err_path.read_text()[-2000:]
            proc.send_signal(signal.SIGINT)
            try:
                code = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGABRT)  # faulthandler dumps every thread's stack
                proc.wait(timeout=10)
                raise AssertionError(f"no exit 60 s after SIGINT at {moment}: "
                                     + err_path.read_text(errors="replace")[-4000:]) from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = err_path.read_text(encoding="utf-8", errors="replace")
    messages = "\n".join(x for x in text.splitlines() if not x.startswith(_IMPORT_LINE))
    return moment, code, messages[-1500:]


@pytest.mark.timeout(180)
def test_ctrl_c_at_any_early_moment_exits_130_without_traceback(tmp_path: Path) -> None:
    """SIGINT during the imports (the first half second), the settings, or the run's start:
    a short "interrupted" message and exit 130, never a KeyboardInterrupt traceback.

    The moments are import milestones (`-X importtime` lines written after `bulk_engine` itself
    is imported: from the first import of the CLI to the engine's), then the engine's first
    connection. Earlier than the package (the interpreter's startup, `site`) no package code
    runs yet. The API is a socket that accepts and never answers, so the run lasts until the
    signal.
    """
    manifest = make_archive(tmp_path / "a", 3, seed=11)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(60)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        results = [_interrupt_at(moment, manifest, url, listener, tmp_path)
                   for moment in (1, 25, 80, 160, 240, 330, "connected")]
    finally:
        listener.close()
    for moment, code, messages in results:
        assert code == 130, (moment, code, messages)
        assert "Traceback" not in messages and "KeyboardInterrupt" not in messages, (
            moment, messages)
        assert "interrupted" in messages, (moment, messages)
