"""``python -m bulk_engine export``: a shared run's lines as the JSONL file a single machine writes.

Where it sits: workers finish rows in the database (``DatabaseSink``: each row's line is stored
with it); this reads them back, in the order rows were finished (``RunStore.export``), into
``--output``: the same schema, one line per done row, ready for ``report``.

The file is replaced atomically: written to a temporary file beside it, fsynced, renamed over
it, the directory fsynced. A reader sees the old file or the new one, never half of one.
``--since N`` writes only the rows finished after export sequence ``N`` (each export says where
it stopped: the next incremental export starts there).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bulk_engine.errors import ConfigError
from bulk_engine.pg.connect import Database
from bulk_engine.pg.rows import RunStore
from bulk_engine.writer import fsync_dir

__all__ = ["ExportReport", "export_run", "find_run"]


@dataclass(frozen=True, slots=True)
class ExportReport:
    """What an export wrote."""

    run: str
    path: Path
    lines: int
    since: int  # the sequence it started after
    last: int  # the sequence of its last line (``since`` when there was none): next --since
    rows_total: int  # rows in the run
    rows_not_done: int  # rows no line was written for yet (workers still at it)


async def find_run(db: Database, name: str | None) -> RunStore:
    """The run ``name``, or the database's only run (ConfigError naming them if several)."""
    if name is not None:
        return await RunStore.join(db, name)
    runs = await RunStore.list_runs(db)
    if not runs:
        raise ConfigError(f"no run in {db.parts.where()} yet: start workers first")
    if len(runs) > 1:
        names = ", ".join(repr(r.name) for r in runs[:10])
        raise ConfigError(f"the database holds {len(runs)} runs ({names}): say which with "
                          "--run NAME")
    return RunStore(db, runs[0])


async def export_run(dsn: str, output: Path, *, run: str | None = None,
                     since: int | None = None, connect_timeout: float = 10.0) -> ExportReport:
    """Write the run's lines (after sequence ``since``) to ``output``, atomically."""
    db = await Database.connect(dsn, migrate=False, max_size=2, connect_timeout=connect_timeout)
    try:
        store = await find_run(db, run)
        start = since or 0
        last, lines = start, 0
        tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
        try:
            with tmp.open("wb") as fh:
                async for seq, line in store.export(start):
                    fh.write(line)
                    last, lines = seq, lines + 1
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, output)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(output.parent)
        counts = await store.counts()
        return ExportReport(store.run.name, output, lines, start, last, counts.total,
                            counts.total - counts.done)
    finally:
        await db.close()
