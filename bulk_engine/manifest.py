"""The producer: turns the manifest (or a walk of ``--root``) into Jobs and BadRows.

    manifest.csv ─▶ iter_manifest ──┐
                                    ├─Job/BadRow─▶ [bounded queue] ─▶ submitters
    --root DIR   ─▶ iter_root ──────┤
    --root s3:// ─▶ iter_s3_root ───┘

Both are plain synchronous generators that stream: the manifest is read one physical line at a
time and never held whole, so memory stays flat for a million rows. The engine runs them in a
worker thread (or pulls them chunk-wise) and feeds the submitters' bounded queue, which gives
backpressure. Each row's folder is listed here (``list_folder``): regular files directly inside,
in a stable order, with every hazard (symlinks leading out, FIFOs, devices, unreadable or
oversized files) turning the whole row into a ``BadRow`` that becomes a `failed` line. A bad row
never stops the run; only an unusable manifest (unreadable, empty, no ``folder`` column) raises
``ConfigError`` before the first row.

A ``folder`` (or ``--root``) written ``s3://bucket/prefix/`` is a folder in a bucket: its objects
directly under the prefix, listed through the run's ``s3.access.S3Folders`` (same order, hidden
and size rules, same BadRow kinds; see docs/s3.md), and fingerprinted by ETag, size and
LastModified. A malformed S3 URL is that row's ``bad_row``; ``--confine-to`` refuses bucket rows
(``outside_root``); symlink rules do not apply.

BadRow kinds: empty_folder, folder_missing, not_a_directory, folder_unreadable, folder_empty,
symlink_outside, symlink_dangling, special_file, file_unreadable, file_too_large, ragged_row,
bad_row, bad_encoding, bad_analyse_type, bad_payload, outside_root, duplicate_id,
manifest_parse_error.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import IO, TYPE_CHECKING, Any

from bulk_engine import vocab
from bulk_engine.config import ANALYSE_TYPES, Settings
from bulk_engine.errors import ConfigError, ManifestError
from bulk_engine.models import BadRow, FileEntry, Job, fingerprint_folder, row_key
from bulk_engine.s3.listing import S3Entry, size_text
from bulk_engine.s3.url import S3Url, is_s3_url, parse_s3_url

if TYPE_CHECKING:
    from bulk_engine.s3.access import S3Folders

__all__ = [
    "BAD_ROW_KINDS",
    "MAX_LINE_CHARS",
    "ProducerStats",
    "RowDefaults",
    "check_manifest",
    "iter_manifest",
    "iter_root",
    "iter_s3_root",
    "list_folder",
    "resolve_folder",
]

# The kinds of bad rows, from the registry (``vocab.ERROR_KINDS``: origin "row").
BAD_ROW_KINDS = tuple(sorted(vocab.BAD_ROW_KINDS))

# A physical line longer than this is not a manifest line (binary file, missing newlines):
# stop instead of buffering it whole.
MAX_LINE_CHARS = 4 * 1024 * 1024

_KNOWN_COLUMNS = ("id", "folder", "use_case", "analyse_type", "payload")
_SURROGATES = re.compile("[\udc80-\udcff]")
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True, kw_only=True, slots=True)
class RowDefaults:
    """The run's request settings; a row's own columns override them (payload merges on top)."""

    use_case: str | None = None
    analyse_type: tuple[str, ...] | None = None
    payload: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> RowDefaults:
        """The defaults a run's settings imply (``--use-case``, ``--analyse-type``)."""
        return cls(use_case=settings.use_case, analyse_type=settings.analyse_type)


@dataclass(slots=True)
class ProducerStats:
    """What the producer saw. Invariant: rows_read == accepted + rejected + skipped_done."""

    rows_read: int = 0
    rows_accepted: int = 0
    rows_rejected: int = 0
    rows_skipped_done: int = 0
    blank_rows: int = 0  # lines with no fields or only blank fields: not rows, not counted
    unparsed_lines: int = 0  # physical lines lost to a manifest_parse_error
    rejected_by_kind: dict[str, int] = field(default_factory=dict)

    def count(self, item: Job | BadRow) -> None:
        """Record one row handed to the submitters."""
        self.rows_read += 1
        if isinstance(item, Job):
            self.rows_accepted += 1
        else:
            self.rows_rejected += 1
            self.rejected_by_kind[item.kind] = self.rejected_by_kind.get(item.kind, 0) + 1

    def to_json(self) -> dict[str, Any]:
        """The counters as a JSON-ready dict (for the run summary and benchmarks)."""
        return {
            "rows_read": self.rows_read,
            "rows_accepted": self.rows_accepted,
            "rows_rejected": self.rows_rejected,
            "rows_skipped_done": self.rows_skipped_done,
            "blank_rows": self.blank_rows,
            "unparsed_lines": self.unparsed_lines,
            "rejected_by_kind": dict(sorted(self.rejected_by_kind.items())),
        }


# ───────────────────────────── folder listing ─────────────────────────────


def _check_file(path: str, name: str, max_file_size: int) -> os.stat_result:
    """Prove a file is a readable regular file within the size limit, without blocking."""
    if not os.access(path, os.R_OK):
        raise ManifestError(
            "file_unreadable",
            f"file {name!r} is not readable by this user; fix its permissions or remove it",
        )
    try:
        # O_NONBLOCK: if the file was swapped for a FIFO since it was listed, open must not hang.
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise ManifestError(
            "file_unreadable",
            f"file {name!r} cannot be opened ({exc.strerror}); fix its permissions or remove it",
        ) from None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ManifestError(
            "special_file", f"{name!r} is not a regular file; remove it from the folder"
        )
    if st.st_size > max_file_size:
        raise ManifestError(
            "file_too_large",
            f"file {name!r} is {size_text(st.st_size)}, above max_file_size "
            f"({size_text(max_file_size)}); raise --max-file-size or remove the file",
        )
    return st


def _inside(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip(os.sep) + os.sep)


def _entry(
    entry: os.DirEntry[str],
    folder: str,
    real_folder: Callable[[], str],
    *,
    max_file_size: int,
    follow_symlinks: bool,
) -> FileEntry | None:
    """One directory entry as a FileEntry, None if it is ignored, ManifestError if it is bad."""
    name = entry.name
    if entry.is_dir(follow_symlinks=False):
        return None  # subdirectories are not part of the case
    if entry.is_file(follow_symlinks=False):
        st = _check_file(entry.path, name, max_file_size)
        return FileEntry(path=Path(entry.path), name=name, size=st.st_size, mtime_ns=st.st_mtime_ns)
    if not entry.is_symlink():
        raise ManifestError(
            "special_file",
            f"{name!r} is a FIFO, socket or device, not a regular file; remove it from the folder",
        )
    try:
        target_st = os.stat(entry.path)
    except OSError as exc:
        try:
            target = os.readlink(entry.path)
        except OSError:  # pragma: no cover - vanished meanwhile
            target = "?"
        if exc.errno == errno.ELOOP:
            raise ManifestError(
                "symlink_dangling",
                f"symlink {name!r} (to {target!r}) is part of a loop of links that never "
                "reaches a file; fix or remove the link",
            ) from None
        if exc.errno != errno.ENOENT:
            raise ManifestError(
                "symlink_dangling",
                f"symlink {name!r} (to {target!r}) cannot be followed ({exc.strerror}); fix "
                "the link or its target's permissions",
            ) from None
        raise ManifestError(
            "symlink_dangling",
            f"symlink {name!r} points to {target!r}, which does not exist; fix or remove the link",
        ) from None
    if stat.S_ISDIR(target_st.st_mode):
        return None  # a linked directory is ignored like any subdirectory
    target = os.path.realpath(entry.path)
    if not follow_symlinks and not _inside(target, real_folder()):
        raise ManifestError(
            "symlink_outside",
            f"symlink {name!r} points outside its folder (to {target}); copy the file into the "
            "folder, or pass --follow-symlinks to allow links that leave it",
        )
    if not stat.S_ISREG(target_st.st_mode):
        raise ManifestError(
            "special_file",
            f"symlink {name!r} points to a FIFO, socket or device; remove it from the folder",
        )
    st = _check_file(target, name, max_file_size)
    return FileEntry(path=Path(target), name=name, size=st.st_size, mtime_ns=st.st_mtime_ns)


def list_folder(path: Path, *, max_file_size: int, follow_symlinks: bool) -> tuple[FileEntry, ...]:
    """The files to upload for one folder, sorted by name; ManifestError if it cannot be sent.

    Lists regular files directly inside ``path`` (not recursive; subdirectories and hidden
    dotfiles are skipped). Nothing is opened except regular files, and those only with
    ``O_NONBLOCK`` to prove they are readable. A symlink to a file inside the folder is listed
    under the link's name with the target as ``path``; one leading outside is refused unless
    ``follow_symlinks``. Any bad entry fails the whole folder: the error names the first one in
    name order and how many others there are. Names stay exactly as the OS gives them
    (undecodable bytes as surrogate escapes, NFD as NFD).
    """
    folder = os.fspath(path)
    try:
        with os.scandir(folder) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except FileNotFoundError:
        raise ManifestError(
            "folder_missing",
            f"folder {folder} does not exist; fix the path in the manifest "
            "(relative paths resolve against the manifest's directory)",
        ) from None
    except NotADirectoryError:
        raise ManifestError(
            "not_a_directory",
            f"{folder} is not a directory; the folder column must name a folder of documents",
        ) from None
    except OSError as exc:
        raise ManifestError(
            "folder_unreadable",
            f"folder {folder} cannot be listed ({exc.strerror}); fix its permissions",
        ) from None

    real: list[str] = []

    def real_folder() -> str:  # resolved once, and only if a symlink needs it
        if not real:
            real.append(os.path.realpath(folder))
        return real[0]

    files: list[FileEntry] = []
    problems: list[ManifestError] = []
    for entry in entries:
        try:
            item = _entry(
                entry,
                folder,
                real_folder,
                max_file_size=max_file_size,
                follow_symlinks=follow_symlinks,
            )
        except ManifestError as exc:
            problems.append(exc)
            continue
        except OSError as exc:  # vanished or changed while listing
            problems.append(
                ManifestError(
                    "file_unreadable", f"{entry.name!r} could not be examined ({exc.strerror})"
                )
            )
            continue
        if item is not None:
            files.append(item)
    if problems:
        first = problems[0]
        more = ""
        if len(problems) > 1:
            more = f" (and {len(problems) - 1} more problem(s) in this folder)"
        raise ManifestError(first.kind, f"in folder {folder}: {first.message}{more}")
    if not files:
        raise ManifestError(
            "folder_empty",
            f"folder {folder} has no files to upload (subdirectories and hidden files are "
            "ignored); add the documents or remove the row",
        )
    return tuple(files)


# ───────────────────────────── manifest reading ─────────────────────────────


class _LineTooLong(Exception):
    def __init__(self, line: int) -> None:
        super().__init__(f"line {line} is longer than {MAX_LINE_CHARS} characters")
        self.line = line


class _Lines:
    """The manifest's physical lines, one at a time, with NUL bytes and bad UTF-8 defused.

    A NUL or an undecodable byte is replaced by U+FFFD (so the csv parser goes on and the id
    stays printable) and the line number is remembered, so that the row it belongs to can be
    rejected on its own.
    """

    __slots__ = ("_fh", "eof", "flags", "lineno")

    def __init__(self, fh: IO[str]) -> None:
        self._fh = fh
        self.lineno = 0
        self.eof = False
        self.flags: list[tuple[int, str]] = []

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = self._fh.readline(MAX_LINE_CHARS)
        if not line:
            self.eof = True
            raise StopIteration
        self.lineno += 1
        if len(line) >= MAX_LINE_CHARS and not line.endswith(("\n", "\r")):
            raise _LineTooLong(self.lineno)
        if "\x00" in line:
            line = line.replace("\x00", "\ufffd")
            self.flags.append((self.lineno, "nul"))
        if _SURROGATES.search(line):
            line = _SURROGATES.sub("\ufffd", line)
            self.flags.append((self.lineno, "encoding"))
        return line

    def take_flags(self) -> list[tuple[int, str]]:
        flags, self.flags = self.flags, []
        return flags

    def drain(self) -> int:
        """Skip to the end of the file; return how many lines were skipped."""
        n = 0
        while True:
            try:
                next(self)
            except StopIteration:
                return n
            except _LineTooLong:
                pass
            n += 1


@dataclass(frozen=True, slots=True)
class _Columns:
    folder: int
    id: int | None
    use_case: int | None
    analyse_type: int | None
    payload: int | None
    width: int


def _read_columns(header: list[str], manifest: str) -> _Columns:
    names = [h.strip().lower() for h in header]
    index: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in _KNOWN_COLUMNS:
            if name in index:
                raise ConfigError(
                    f"manifest {manifest}: column {name!r} appears twice in the header; keep one"
                )
            index[name] = i
    if "folder" not in index:
        raise ConfigError(
            f"manifest {manifest}: the header row has no 'folder' column (found: "
            f"{', '.join(repr(h) for h in header) or 'nothing'}); add a header line such as "
            "'id,folder' naming each row's folder"
        )
    return _Columns(
        folder=index["folder"],
        id=index.get("id"),
        use_case=index.get("use_case"),
        analyse_type=index.get("analyse_type"),
        payload=index.get("payload"),
        width=len(header),
    )


def _blank(row: list[str]) -> bool:
    # A plain loop, not all(genexpr): it runs once per row, and a generator is an allocation.
    for cell in row:  # noqa: SIM110
        if cell and not cell.isspace():
            return False
    return True


def _cell(row: list[str], i: int | None) -> str:
    return row[i].strip() if i is not None and i < len(row) else ""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_analyse_type(value: str) -> tuple[str, ...]:
    parts = [p.strip() for p in value.replace(",", ";").split(";")]
    wanted = tuple(dict.fromkeys(p for p in parts if p))
    bad = [p for p in wanted if p not in ANALYSE_TYPES]
    if bad or not wanted:
        raise ManifestError(
            "bad_analyse_type",
            f"analyse_type {value!r} is not valid; use one or more of "
            f"{', '.join(ANALYSE_TYPES)} separated by ';'",
        )
    return wanted


def _parse_payload(value: str) -> dict[str, Any]:
    try:
        obj = json.loads(value, parse_constant=_reject_constant)
    except ValueError as exc:
        raise ManifestError(
            "bad_payload",
            f"payload is not valid JSON ({exc}); write a JSON object like "
            '{"key": "value"} (in CSV, double the quotes inside a quoted field)',
        ) from None
    if not isinstance(obj, dict):
        raise ManifestError(
            "bad_payload",
            f"payload must be a JSON object, got {type(obj).__name__}; write it as {{...}}",
        )
    return obj


def _as_text(name: str) -> str:
    """A path from the OS as valid text for ids and output: undecodable bytes as ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


class _Producer:
    """The shared tail of both producers: ids, duplicates, done rows, listing, counting."""

    def __init__(
        self,
        *,
        defaults: RowDefaults,
        max_file_size: int,
        follow_symlinks: bool,
        seen: Callable[[str], bool] | None,
        is_done: Callable[[str], bool] | None,
        stats: ProducerStats | None,
        list_folders: bool = True,
        s3: S3Folders | None = None,
    ) -> None:
        self.defaults = defaults
        self.max_file_size = max_file_size
        self.follow_symlinks = follow_symlinks
        self.seen = seen
        self.is_done = is_done
        self.stats = stats if stats is not None else ProducerStats()
        self.list_folders = list_folders
        self.s3 = s3

    def claim(self, line: int, row_id: str) -> tuple[bool, bool]:
        """(duplicate, already done) for a row id; the caller skips done rows."""
        dup = self.seen(row_id) if self.seen is not None else False
        if self.is_done is not None and self.is_done(row_key(row_id, line, duplicate=dup)):
            self.stats.rows_read += 1
            self.stats.rows_skipped_done += 1
            return dup, True
        return dup, False

    def bad(self, line: int, row_id: str, folder: str, kind: str, message: str) -> BadRow:
        row = BadRow(line=line, id=row_id, folder=folder, kind=kind, message=message)
        self.stats.count(row)
        return row

    def job(
        self,
        line: int,
        row_id: str,
        folder: str,
        path: Path | S3Url,
        *,
        use_case: str | None,
        analyse_type: tuple[str, ...] | None,
        payload: dict[str, Any],
    ) -> Job | BadRow:
        files: tuple[FileEntry, ...] | tuple[S3Entry, ...] = ()
        if self.list_folders:
            try:
                files = (
                    self.bucket().list_folder(path, max_file_size=self.max_file_size)
                    if isinstance(path, S3Url)
                    else list_folder(path, max_file_size=self.max_file_size,
                                     follow_symlinks=self.follow_symlinks)
                )
            except ManifestError as exc:
                return self.bad(line, row_id, folder, exc.kind, exc.message)
        return self.listed(line, row_id, folder, path, files, use_case=use_case,
                           analyse_type=analyse_type, payload=payload)

    def listed(
        self,
        line: int,
        row_id: str,
        folder: str,
        path: Path | S3Url,
        files: tuple[FileEntry, ...] | tuple[S3Entry, ...],
        *,
        use_case: str | None,
        analyse_type: tuple[str, ...] | None,
        payload: dict[str, Any],
    ) -> Job:
        """The Job of a folder whose files are known."""
        job = Job(
            line=line,
            id=row_id,
            folder=folder,
            path=path,
            files=files,
            use_case=use_case,
            analyse_type=analyse_type,
            payload=payload,
            fingerprint=fingerprint_folder(files),
        )
        self.stats.count(job)
        return job

    def bucket(self) -> S3Folders:
        """The run's S3 access; a row stream that meets a bucket folder must have one."""
        if self.s3 is None:
            raise ConfigError("s3:// folders can only be listed through the run's S3 access")
        return self.s3


def _open_manifest(manifest: str) -> IO[str]:
    try:
        return open(manifest, encoding="utf-8-sig", errors="surrogateescape", newline="")
    except OSError as exc:
        raise ConfigError(
            f"cannot read manifest {manifest} ({exc.strerror}); check the path"
        ) from None


def _read_header(reader: Iterator[list[str]], lines: _Lines, manifest: str) -> _Columns:
    """The header row's columns; ConfigError when the manifest cannot be a manifest."""
    try:
        header = next(reader)
        while _blank(header):  # blank lines before the header
            header = next(reader)
    except StopIteration:
        raise ConfigError(
            f"manifest {manifest} is empty; it needs a header row with a 'folder' column, "
            "then one row per folder"
        ) from None
    except (csv.Error, _LineTooLong, OSError) as exc:
        raise ConfigError(
            f"manifest {manifest}: cannot read the header row ({exc}); it must be a CSV "
            "line such as 'id,folder'"
        ) from None
    if lines.take_flags():
        raise ConfigError(
            f"manifest {manifest}: the header row holds NUL bytes or is not UTF-8; "
            "save the file as UTF-8 CSV"
        )
    return _read_columns(header, manifest)


def check_manifest(path: Path) -> None:
    """Raise ConfigError now if ``path`` cannot be read as a manifest (before any state is
    created for it); reads the header only."""
    manifest = os.fspath(path)
    with _open_manifest(manifest) as fh:
        lines = _Lines(fh)
        _read_header(csv.reader(lines, strict=True), lines, manifest)


def iter_manifest(
    path: Path,
    *,
    defaults: RowDefaults,
    max_file_size: int,
    follow_symlinks: bool = False,
    confine_to: Path | None = None,
    seen: Callable[[str], bool] | None = None,
    is_done: Callable[[str], bool] | None = None,
    stats: ProducerStats | None = None,
    list_folders: bool = True,
    s3: S3Folders | None = None,
) -> Iterator[Job | BadRow]:
    """Stream the manifest's rows as Jobs (folder listed) or BadRows, in file order.

    The file is read line by line (UTF-8, BOM accepted, any line ending), never whole. Raises
    ``ConfigError`` on the first ``next()`` if the manifest cannot be read, is empty, or has no
    ``folder`` column; every other problem becomes a BadRow and reading goes on, except an
    unterminated quote, which becomes one ``manifest_parse_error`` and ends the stream.

    ``line`` is the physical line where the row starts (the header is line 1). Relative folders
    resolve against the manifest's directory (``~`` is not expanded); with ``confine_to`` a folder
    whose resolved path leaves that directory is rejected. ``seen(id)`` returns True when the
    id came earlier in this run (the row becomes ``duplicate_id``); ``is_done(key)`` returns True
    for rows already finished, which are skipped before their folder is listed. Both callbacks
    run in the thread that iterates. ``stats`` is updated as rows go by. A row with neither id
    nor folder gets the id ``<line N>``. With ``list_folders=False`` folders are not listed
    (Jobs have no files): the rows as the manifest states them, for a quick check. ``s3`` lists
    the rows whose folder is ``s3://bucket/prefix/`` (needed only when such a row is listed).
    """
    producer = _Producer(
        defaults=defaults,
        max_file_size=max_file_size,
        follow_symlinks=follow_symlinks,
        seen=seen,
        is_done=is_done,
        stats=stats,
        list_folders=list_folders,
        s3=s3,
    )
    st = producer.stats
    manifest = os.fspath(path)
    base = os.path.dirname(os.path.abspath(manifest))
    confine = os.path.realpath(confine_to) if confine_to is not None else None
    fh = _open_manifest(manifest)
    with fh:
        lines = _Lines(fh)
        reader = csv.reader(lines, strict=True)
        cols = _read_header(reader, lines, manifest)

        while True:
            start = lines.lineno + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except (csv.Error, _LineTooLong) as exc:
                row_id = f"<line {start}>"
                if lines.eof or isinstance(exc, _LineTooLong) or "field limit" in str(exc):
                    # The parser lost track of where fields end: nothing after this point can
                    # be trusted, so stop, and say how much was not read.
                    lost = lines.lineno - start + 1 + lines.drain()
                    st.unparsed_lines += lost
                    why = (
                        "a line that long is not a manifest row"
                        if isinstance(exc, _LineTooLong)
                        else "most likely a quote opened there never closes"
                    )
                    fix = (
                        "check that the file is the CSV manifest"
                        if isinstance(exc, _LineTooLong)
                        else "close the quote (double any quote inside a quoted field)"
                    )
                    if not producer.claim(start, row_id)[1]:
                        yield producer.bad(
                            start,
                            row_id,
                            "",
                            "manifest_parse_error",
                            f"manifest cannot be parsed from line {start} on ({exc}): {why}. "
                            f"Lines {start}-{lines.lineno} ({lost} lines) were not read, so an "
                            f"unknown number of rows is missing from this run; {fix} and rerun",
                        )
                    return
                lines.take_flags()
                if not producer.claim(start, row_id)[1]:
                    end = lines.lineno
                    where = f"line {start}" if end == start else f"lines {start}-{end}"
                    yield producer.bad(
                        start,
                        row_id,
                        "",
                        "bad_row",
                        f"{where} cannot be parsed as CSV ({exc}); quote a field that holds "
                        "commas or quotes, and double the quotes inside it",
                    )
                continue

            flags = lines.take_flags()
            if _blank(row):
                st.blank_rows += 1
                continue
            folder = row[cols.folder] if cols.folder < len(row) else ""
            row_id = _cell(row, cols.id) or folder.strip() or f"<line {start}>"
            dup, done = producer.claim(start, row_id)
            if done:
                continue
            if dup:
                yield producer.bad(
                    start,
                    row_id,
                    folder,
                    "duplicate_id",
                    f"duplicate id {row_id!r} (row skipped; ids must be unique)",
                )
                continue
            try:
                spec = _parse_row(row, cols, flags, defaults, base, confine)
            except ManifestError as exc:
                yield producer.bad(start, row_id, folder, exc.kind, exc.message)
                continue
            item = producer.job(
                start,
                row_id,
                folder,
                spec.path,
                use_case=spec.use_case,
                analyse_type=spec.analyse_type,
                payload=spec.payload,
            )
            if (isinstance(item, BadRow) and item.kind == "folder_missing"
                    and not isinstance(spec.path, S3Url)):
                item = _hint_missing(item)
            yield item


@dataclass(frozen=True, slots=True)
class _RowSpec:
    path: Path | S3Url
    use_case: str | None
    analyse_type: tuple[str, ...] | None
    payload: dict[str, Any]


def _parse_row(
    row: list[str],
    cols: _Columns,
    flags: list[tuple[int, str]],
    defaults: RowDefaults,
    base: str,
    confine: str | None,
) -> _RowSpec:
    """Check one parsed row's values; ManifestError names the first problem."""
    if flags:
        nul = [n for n, why in flags if why == "nul"]
        if nul:
            raise ManifestError(
                "bad_row",
                f"line {nul[0]} contains NUL bytes (shown as "
                "U+FFFD); remove them from the manifest",
            )
        raise ManifestError(
            "bad_encoding",
            f"line {flags[0][0]} is not valid UTF-8 (shown as U+FFFD); save the manifest as UTF-8",
        )
    if len(row) > cols.width:
        raise ManifestError(
            "ragged_row",
            f"row has {len(row)} fields but the header has "
            f"{cols.width}; quote a value that holds a comma",
        )
    if cols.folder >= len(row):
        raise ManifestError(
            "ragged_row",
            f"row has {len(row)} field(s) and stops before the "
            f"'folder' column (column {cols.folder + 1}); add the folder",
        )
    folder = row[cols.folder]
    if not folder.strip():
        raise ManifestError("empty_folder", "the folder value is empty; write the folder's path")
    at = _cell(row, cols.analyse_type)
    analyse_type = _parse_analyse_type(at) if at else defaults.analyse_type
    pl = _cell(row, cols.payload)
    payload = {**defaults.payload, **(_parse_payload(pl) if pl else {})}
    use_case = _cell(row, cols.use_case) or defaults.use_case
    return _RowSpec(resolve_folder(folder, base, confine), use_case, analyse_type, payload)


def resolve_folder(folder: str, base: str, confine: str | None) -> Path | S3Url:
    """A manifest's folder value as a path: relative ones against ``base``, the manifest's
    directory; an ``s3://`` one parsed (a bad URL is the row's ``bad_row``). With ``confine``
    (a real path), a folder that resolves outside it raises ManifestError ``outside_root``.
    (``--db`` workers resolve each row they claim with it.)"""
    if is_s3_url(folder.lstrip()):
        return _bucket_folder(folder, confine)
    full = os.path.join(base, folder)
    if confine is not None:
        # Resolve symlinks and '..' first: a lexical check would let a link inside lead out.
        full = os.path.realpath(full)
        if full != confine and not _inside(full, confine):
            raise ManifestError(
                "outside_root",
                f"folder {folder!r} resolves to {full}, "
                f"outside the allowed root {confine}; use a path inside it",
            )
    return Path(full)


def _bucket_folder(folder: str, confine: str | None) -> S3Url:
    """A row's ``s3://`` folder, parsed; a bad URL is the row's ``bad_row``."""
    try:
        url = parse_s3_url(folder)
    except ConfigError as exc:
        raise ManifestError("bad_row", f"folder {exc}") from None
    if confine is not None:
        raise ManifestError(
            "outside_root",
            f"folder {folder!r} is in a bucket, outside the allowed root {confine}: "
            "--confine-to only lets local folders under it through; run without it for "
            "bucket folders",
        )
    return url


def _hint_missing(item: BadRow) -> BadRow:
    """Add a hint for the usual reasons a written folder is not found."""
    folder = item.folder
    hints = []
    if folder != folder.strip():
        hints.append("the value has leading or trailing spaces")
    if "\\" in folder:
        hints.append("use '/' as the path separator")
    if folder.startswith("~"):
        hints.append("'~' is not expanded; write the full path")
    if not hints:
        return item
    return BadRow(
        line=item.line,
        id=item.id,
        folder=folder,
        kind=item.kind,
        message=f"{item.message} (note: {'; '.join(hints)})",
    )


# ───────────────────────────── --root walk ─────────────────────────────


def iter_root(
    root: Path,
    *,
    defaults: RowDefaults,
    max_file_size: int,
    follow_symlinks: bool = False,
    seen: Callable[[str], bool] | None = None,
    is_done: Callable[[str], bool] | None = None,
    stats: ProducerStats | None = None,
    list_folders: bool = True,
) -> Iterator[Job | BadRow]:
    """Stream every leaf folder under ``root`` as a row, in sorted order.

    A leaf is a directory with no subdirectories (symlinked directories are neither followed nor
    counted, hidden ``.*`` directories are skipped). The row id is the leaf's path relative to
    ``root`` in posix form, ``line`` its ordinal (1, 2, ...). A directory that cannot be listed
    becomes a ``folder_unreadable`` row. Raises ConfigError if ``root`` is not a directory.
    """
    producer = _Producer(
        defaults=defaults,
        max_file_size=max_file_size,
        follow_symlinks=follow_symlinks,
        seen=seen,
        is_done=is_done,
        stats=stats,
        list_folders=list_folders,
    )
    top = os.path.abspath(root)
    if not os.path.isdir(top):
        raise ConfigError(f"--root {root} is not a directory; give the archive's top folder")
    errors: list[OSError] = []
    line = 0

    def rows_for_errors() -> Iterator[BadRow]:
        nonlocal line
        while errors:
            exc = errors.pop(0)
            where = exc.filename if isinstance(exc.filename, str) else top
            if os.path.abspath(where) == top:
                raise ConfigError(f"--root {root} cannot be listed ({exc.strerror})")
            line += 1
            row_id = _as_text(PurePath(os.path.relpath(where, top)).as_posix())
            dup, done = producer.claim(line, row_id)
            if done:
                continue
            if dup:  # pragma: no cover - ids from a walk are unique
                yield producer.bad(
                    line,
                    row_id,
                    where,
                    "duplicate_id",
                    f"duplicate id {row_id!r} (row skipped; ids must be unique)",
                )
                continue
            yield producer.bad(
                line,
                row_id,
                where,
                "folder_unreadable",
                f"folder {where} cannot be listed ({exc.strerror}); fix its permissions",
            )

    for dirpath, dirnames, _ in os.walk(top, onerror=errors.append):
        yield from rows_for_errors()
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".") and not os.path.islink(os.path.join(dirpath, d))
        )
        if dirnames:
            continue
        line += 1
        row_id = _as_text(PurePath(os.path.relpath(dirpath, top)).as_posix())
        dup, done = producer.claim(line, row_id)
        if done:
            continue
        if dup:
            yield producer.bad(
                line,
                row_id,
                dirpath,
                "duplicate_id",
                f"duplicate id {row_id!r} (row skipped; ids must be unique)",
            )
            continue
        yield producer.job(
            line,
            row_id,
            _as_text(dirpath),
            Path(dirpath),
            use_case=defaults.use_case,
            analyse_type=defaults.analyse_type,
            payload=dict(defaults.payload),
        )
    yield from rows_for_errors()


# ───────────────────────────── --root s3://bucket/prefix/ walk ─────────────────────────────


def iter_s3_root(
    root: S3Url,
    *,
    s3: S3Folders | None,
    defaults: RowDefaults,
    max_file_size: int,
    seen: Callable[[str], bool] | None = None,
    is_done: Callable[[str], bool] | None = None,
    stats: ProducerStats | None = None,
) -> Iterator[Job | BadRow]:
    """Stream every leaf prefix under ``root`` as a row, as ``iter_root`` does for a directory.

    The walk (``S3Folders.iter_leaf_prefixes``) lists each leaf anyway to know it is one, so
    each row comes with its objects and no second request. The id is the leaf's path relative
    to ``root`` (``.`` for the root itself), ``line`` its ordinal, ``folder`` its URL; leaves
    come in S3's key order, stable from run to run. A leaf that cannot be listed, or is empty,
    becomes a failed row of its kind. Raises ConfigError if ``root`` holds nothing or cannot
    be listed, StoreUnavailableError if the store stops answering.
    """
    producer = _Producer(
        defaults=defaults,
        max_file_size=max_file_size,
        follow_symlinks=False,
        seen=seen,
        is_done=is_done,
        stats=stats,
    )
    if s3 is None:
        raise ConfigError(f"--root {root} can only be walked through the run's S3 access")
    for line, leaf in enumerate(s3.iter_leaf_prefixes(root, max_file_size=max_file_size), 1):
        folder = str(leaf.url)
        dup, done = producer.claim(line, leaf.id)
        if done:
            continue
        if dup:  # pragma: no cover - ids from a walk are unique
            yield producer.bad(line, leaf.id, folder, "duplicate_id",
                               f"duplicate id {leaf.id!r} (row skipped; ids must be unique)")
        elif leaf.error is not None:
            yield producer.bad(line, leaf.id, folder, leaf.error.kind, leaf.error.message)
        else:
            yield producer.listed(line, leaf.id, folder, leaf.url, leaf.entries,
                                  use_case=defaults.use_case,
                                  analyse_type=defaults.analyse_type,
                                  payload=dict(defaults.payload))
