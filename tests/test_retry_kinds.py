"""--retry-failed [KINDS]: bare, every failed row; with kinds, only those (and the transport
kinds a plain rerun retries anyway); an unknown kind is a usage error (exit 1)."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import pytest

from bulk_engine.cli import _bare_retry_failed, _with_command, build_parser, main
from bulk_engine.config import Settings
from bulk_engine.emulator import EmulatorConfig, run_emulator
from bulk_engine.engine import Engine
from bulk_engine.logs import reset_logging
from bulk_engine.startup import retry_kinds
from bulk_engine.vocab import NOT_FINAL_KINDS

from archive_factory import make_archive
from conftest import API_KEY, engine_settings, read_lines

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("BULK_ENGINE_API_KEY", "BULK_ENGINE_CONFIG", "BULK_ENGINE_RETRY_FAILED"):
        monkeypatch.delenv(name, raising=False)
    yield
    reset_logging()


def _parse(argv: list[str]) -> dict[str, object]:
    ns = build_parser().parse_args(_bare_retry_failed(_with_command(argv)))
    return {k: getattr(ns, k, None) for k in ("manifest", "retry_failed", "retry_failed_kinds")}


def test_the_flag_alone_or_before_the_manifest_means_every_failed_row(tmp_path: Path) -> None:
    """`--retry-failed` at the end, or before the manifest, is the bare flag; a kinds list
    after it (or `=KINDS`) names kinds."""
    m = tmp_path / "m.csv"
    m.write_text("folder\nx\n")
    assert _parse([str(m), "--retry-failed"]) == {
        "manifest": m, "retry_failed": True, "retry_failed_kinds": None}
    assert _parse(["--retry-failed", str(m)]) == {
        "manifest": m, "retry_failed": True, "retry_failed_kinds": None}
    assert _parse(["--retry-failed", str(m), "--no-progress"])["manifest"] == m
    assert _parse([str(m), "--retry-failed", "token_expired,server_error"]) == {
        "manifest": m, "retry_failed": True, "retry_failed_kinds": "token_expired,server_error"}
    assert _parse([str(m), "--retry-failed=analysis_failed"])["retry_failed_kinds"] == \
        "analysis_failed"
    assert _parse([str(m)])["retry_failed"] is None


@pytest.mark.parametrize("kinds", ["token_expird", "analysis_failed,nope"])
def test_an_unknown_kind_is_a_usage_error(tmp_path: Path, kinds: str,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 1 naming the unknown kind and the known ones; nothing runs."""
    m = tmp_path / "m.csv"
    m.write_text("folder\nx\n")
    monkeypatch.setenv("BULK_ENGINE_API_KEY", API_KEY)
    code = main([str(m), "--output", str(tmp_path / "o.jsonl"), "--retry-failed", kinds])
    err = capsys.readouterr().err
    assert code == 1
    assert "unknown error kind" in err and "token_expired" in err, err
    assert "(from --retry-failed)" in err
    assert not (tmp_path / "o.jsonl.journal").exists()


def test_retry_kinds_adds_the_transport_kinds_a_plain_rerun_retries() -> None:
    """No flag: the transport kinds; bare: every kind (None); with kinds: those and the
    transport kinds."""
    assert retry_kinds(Settings()) == NOT_FINAL_KINDS
    assert retry_kinds(Settings(retry_failed=True)) is None
    assert retry_kinds(Settings(retry_failed=True, retry_failed_kinds=("token_expired",))) == \
        NOT_FINAL_KINDS | {"token_expired"}
    with pytest.raises(Exception, match="used with retry_failed"):
        Settings(retry_failed_kinds=("token_expired",))


async def test_retry_failed_with_a_kind_retries_only_rows_failed_that_way(
        tmp_path: Path) -> None:
    """analysis_failed rows are sent again and complete; the folder_missing row keeps its
    failed line; one line per row throughout."""
    root = tmp_path / "a"
    manifest = make_archive(root, 20, seed=41)
    with manifest.open("a", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerow(["gone", "no/such/folder"])
    out = tmp_path / "out.jsonl"
    failing = EmulatorConfig(api_keys=(API_KEY,), processing_time=(0.01, 0.03),
                             fail_rate=0.4, seed=4)
    async with run_emulator(failing) as emu:
        first = await Engine(engine_settings(emu.base_url, out, max_failure_rate=1.0),
                             manifest).run()
    kinds = {r["id"]: (r["error"] or {}).get("kind") for r in read_lines(out)}
    failed_api = {i for i, k in kinds.items() if k == "analysis_failed"}
    assert first.exit_code == 2 and failed_api and kinds["gone"] == "folder_missing"
    healthy = EmulatorConfig(api_keys=(API_KEY,), processing_time=(0.01, 0.03))
    async with run_emulator(healthy) as emu:
        second = await Engine(engine_settings(
            emu.base_url, out, retry_failed=True, retry_failed_kinds=("analysis_failed",)),
            manifest).run()
        stats = emu.stats()
    lines = read_lines(out)
    assert len(lines) == 21 == len({r["id"] for r in lines})
    by_id = {r["id"]: r for r in lines}
    assert all(by_id[i]["status"] == "completed" for i in failed_api)
    assert by_id["gone"]["error"]["kind"] == "folder_missing"
    assert stats["submissions"] == len(failed_api)  # nothing else was sent
    assert second.exit_code == 2  # the missing folder is still failed
