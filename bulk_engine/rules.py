"""Rules shared by the engine and the dry run, so that a plan counts what a run does.

    settings + manifest ─▶ row_stream ─▶ Job / BadRow ─▶ goes_sync? ─▶ POST /case (sync or async)
                              │
                  seen(id): duplicate ids of this run ── is_done(key): rows an earlier run finished

Each rule is written once here: which source the rows come from and with which defaults
(:func:`row_stream`), which folders ``--mode auto`` sends synchronously (:func:`goes_sync`), and
how a run without a journal remembers the ids it met (:func:`scratch_seen`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from bulk_engine.config import Settings
from bulk_engine.journal import JournalReader
from bulk_engine.manifest import ProducerStats, RowDefaults, iter_manifest, iter_root, iter_s3_root
from bulk_engine.models import BadRow, Job
from bulk_engine.s3.url import S3Url

if TYPE_CHECKING:
    from bulk_engine.s3.access import S3Folders

__all__ = ["goes_sync", "row_stream", "scratch_seen"]


def goes_sync(settings: Settings, job: Job) -> bool:
    """True if ``job`` is submitted synchronously: ``--mode sync``, or ``--mode auto`` for a small
    single-stage folder (``decision`` only, at most ``auto_sync_max_bytes`` and
    ``auto_sync_max_files``)."""
    s = settings
    if s.mode != "auto":
        return s.mode == "sync"
    single_stage = tuple(job.analyse_type or s.analyse_type) == ("decision",)
    small = job.total_bytes <= s.auto_sync_max_bytes and len(job.files) <= s.auto_sync_max_files
    return single_stage and small


def row_stream(
    settings: Settings,
    manifest: Path | None,
    *,
    seen: Callable[[str], bool] | None,
    is_done: Callable[[str], bool] | None,
    stats: ProducerStats,
    list_folders: bool = True,
    s3: S3Folders | None = None,
) -> Iterator[Job | BadRow]:
    """The run's rows: the manifest's, or every leaf folder under ``--root`` without one.

    Done rows are skipped (and counted in ``stats``) before their folder is listed; ``seen``
    flags duplicate ids. Raises ConfigError on the first ``next()`` if the source is unusable.
    With ``list_folders=False`` the rows come as the manifest states them (Jobs without files;
    a ``--root s3://`` walk lists anyway: that is how it finds its rows). ``s3`` lists the
    folders in buckets (``s3://`` rows, ``--root s3://``).
    """
    s = settings
    defaults = RowDefaults.from_settings(s)
    if manifest is None:
        if s.root is None:
            raise ValueError("row_stream needs a manifest or settings.root")
        if isinstance(s.root, S3Url):
            return iter_s3_root(s.root, s3=s3, defaults=defaults, max_file_size=s.max_file_size,
                                seen=seen, is_done=is_done, stats=stats)
        return iter_root(s.root, defaults=defaults, max_file_size=s.max_file_size,
                         follow_symlinks=s.follow_symlinks, seen=seen, is_done=is_done,
                         stats=stats, list_folders=list_folders)
    return iter_manifest(manifest, defaults=defaults, max_file_size=s.max_file_size,
                         follow_symlinks=s.follow_symlinks, confine_to=s.confine_to, seen=seen,
                         is_done=is_done, stats=stats, list_folders=list_folders, s3=s3)


@contextmanager
def scratch_seen() -> Iterator[Callable[[str], bool]]:
    """A ``seen(key)`` for a pass without a journal (a dry run of a new output, ``report``).

    The journal's own implementation (``JournalReader.seen``: a TEMP table on disk, flat memory
    for millions of ids) over an empty scratch database, deleted on exit.
    """
    with tempfile.TemporaryDirectory(prefix="bulk-engine-") as tmp:
        scratch = Path(tmp) / "seen.sqlite"
        scratch.touch()
        reader = JournalReader(scratch)
        try:
            yield reader.seen
        finally:
            reader.close()
