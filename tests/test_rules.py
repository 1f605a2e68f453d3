"""The rules the engine and the dry run share: the same rows, the same sync/async split."""

from __future__ import annotations

import asyncio
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from bulk_engine.config import Settings
from bulk_engine.emulator import EmulatorConfig, run_emulator
from bulk_engine.engine import Engine
from bulk_engine.manifest import ProducerStats
from bulk_engine.models import FileEntry, Job
from bulk_engine.plan import make_plan
from bulk_engine.rules import goes_sync, row_stream, scratch_seen

from archive_factory import make_archive
from conftest import API_KEY, engine_settings, read_lines

pytestmark = pytest.mark.timeout(60)


def _job(sizes: list[int], analyse_type: tuple[str, ...] | None = None) -> Job:
    files = tuple(FileEntry(Path(f"/x/f{i}.pdf"), f"f{i}.pdf", n, 0) for i, n in enumerate(sizes))
    return Job(line=2, id="a", folder="a", path=Path("/x"), files=files,
               analyse_type=analyse_type)


@pytest.mark.parametrize(("mode", "sizes", "analyse_type", "sync"), [
    ("sync", [10**9], ("decision", "share_link"), True),
    ("async", [1], None, False),
    ("auto", [1000, 1000], None, True),
    ("auto", [1000] * 5, None, False),  # more files than auto_sync_max_files (4)
    ("auto", [600_000, 600_000], None, False),  # more bytes than auto_sync_max_bytes (1 MB)
    ("auto", [1_000_000], None, True),  # the bound itself is still small
    ("auto", [10], ("decision", "share_link"), False),  # two stages: async
    ("auto", [10], ("decision",), True),
])
def test_goes_sync(mode: str, sizes: list[int], analyse_type: tuple[str, ...] | None,
                   sync: bool) -> None:
    """--mode sync/async as set; auto: sync for small decision-only folders."""
    assert goes_sync(Settings(mode=mode), _job(sizes, analyse_type)) is sync
    # The row's own analyse_type wins over the run's; the run's applies when the row has none.
    runs_two = Settings(mode="auto", analyse_type=("decision", "share_link"))
    assert goes_sync(runs_two, _job([10])) is False


def test_row_stream_reads_the_manifest_or_walks_the_root(tmp_path: Path) -> None:
    """Manifest rows (settings' defaults applied, done rows skipped and counted), or --root."""
    manifest = make_archive(tmp_path / "a", 4, seed=1)
    s = Settings(use_case="credit", analyse_type=("decision", "explanation"))
    stats = ProducerStats()
    rows = list(row_stream(s, manifest, seen=None, is_done=lambda k: k == "case-00001",
                           stats=stats))
    assert [r.id for r in rows] == ["case-00000", "case-00002", "case-00003"]
    assert all(isinstance(r, Job) and r.use_case == "credit"  # the run's defaults
               and r.analyse_type == ("decision", "explanation") for r in rows)
    assert (stats.rows_read, stats.rows_skipped_done) == (4, 1)
    walked = list(row_stream(s.replace(root=tmp_path / "a"), None, seen=None, is_done=None,
                             stats=ProducerStats()))
    assert sorted(r.id for r in walked) == [f"cases/case-{i:05d}" for i in range(4)]
    with pytest.raises(ValueError, match=r"manifest or settings\.root"):
        row_stream(s, None, seen=None, is_done=None, stats=ProducerStats())


def test_scratch_seen_flags_repeats_and_leaves_nothing_behind() -> None:
    """The journal's seen(): False the first time, True after; its scratch file is removed."""
    with scratch_seen() as seen:
        assert [seen(k) for k in ("a", "b", "a", "a", "c", "b")] == [
            False, False, True, True, False, True]
        scratch = [p for p in Path(tempfile.gettempdir()).glob("bulk-engine-*")
                   if (p / "seen.sqlite").exists()]
        assert scratch
    assert not any(p.exists() for p in scratch)


def test_the_plan_counts_what_the_run_does(tmp_path: Path) -> None:
    """--mode auto with a mix of small and large folders, a missing folder and a duplicate id:
    the dry run's rows, bad rows by kind and sync rows are what the engine then does."""
    manifest = make_archive(tmp_path / "a", 12, seed=2)
    with manifest.open("a", encoding="utf-8") as fh:
        fh.write("gone,cases/missing\ncase-00003,cases/case-00004\n")
    out = tmp_path / "o.jsonl"
    # Folders of 0.7 to 3 KB: a 2 KB bound sends some sync, the others async.
    settings = engine_settings("http://127.0.0.1:9", out, mode="auto", auto_sync_max_bytes=2000)
    plan = make_plan(settings, manifest)
    assert 0 < plan.sync_rows < plan.rows_to_submit  # the mix this test is about

    async def run() -> int:
        config = EmulatorConfig(api_keys=(API_KEY,), processing_time=(0.01, 0.03), seed=1)
        async with run_emulator(config) as emu:
            return (await Engine(settings.replace(base_url=emu.base_url), manifest).run()
                    ).exit_code

    assert asyncio.run(run()) == 2
    lines = read_lines(out)
    done = [r for r in lines if r["status"] == "completed"]
    failed = Counter(r["error"]["kind"] for r in lines if r["status"] == "failed")
    assert plan.rows_read == len(lines) == 14
    assert plan.rows_to_submit == len(done)
    assert dict(plan.rejected_by_kind) == dict(failed) == {"folder_missing": 1, "duplicate_id": 1}
    assert plan.sync_rows == sum(1 for r in done if r["polls"] == 0)  # a sync row is never polled
