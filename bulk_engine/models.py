"""The records that flow between pipeline stages.

producer ─Job/BadRow─▶ submitters ─Submitted─▶ poll scheduler ─Outcome─▶ writer
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bulk_engine.s3.listing import S3Entry
from bulk_engine.s3.listing import fingerprint as s3_fingerprint
from bulk_engine.s3.url import S3Url
from bulk_engine.vocab import Status

__all__ = [
    "BadRow",
    "ErrorInfo",
    "FileEntry",
    "Job",
    "Outcome",
    "Submitted",
    "Ticket",
    "fingerprint_files",
    "fingerprint_folder",
    "iso",
    "row_key",
]


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One regular file of a folder, as listed by the producer."""

    path: Path  # absolute path on disk (after following an allowed symlink)
    name: str  # multipart filename: the file's name inside its folder
    size: int
    mtime_ns: int


def fingerprint_files(files: tuple[FileEntry, ...] | list[FileEntry]) -> str:
    """A short digest of the folder's names, sizes and mtimes: changes when the folder does."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\x00{f.size}\x00{f.mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:32]


def fingerprint_folder(files: tuple[FileEntry, ...] | tuple[S3Entry, ...]) -> str:
    """The folder's fingerprint: :func:`fingerprint_files` on disk, ``s3.fingerprint`` (names,
    sizes, ETags, LastModified) in a bucket. Both change when the folder does."""
    if files and isinstance(files[0], S3Entry):
        return s3_fingerprint(f for f in files if isinstance(f, S3Entry))
    return fingerprint_files([f for f in files if isinstance(f, FileEntry)])


def row_key(row_id: str, line: int, *, duplicate: bool = False) -> str:
    """The journal key of a manifest row. A duplicate id is keyed by its line as well."""
    return f"{row_id}\x00dup@{line}" if duplicate else row_id


@dataclass(frozen=True, slots=True)
class Job:
    """One manifest row whose folder was listed and can be submitted."""

    line: int  # 1-based line of the manifest (header is line 1); ordinal for --root
    id: str
    folder: str  # as written in the manifest
    path: Path | S3Url  # resolved folder, or the prefix of a folder in a bucket
    files: tuple[FileEntry, ...] | tuple[S3Entry, ...]  # S3Entry exactly when path is an S3Url
    use_case: str | None = None
    analyse_type: tuple[str, ...] | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""  # fingerprint_files, or s3.fingerprint (ETags) for a bucket

    @property
    def key(self) -> str:
        return row_key(self.id, self.line)

    @property
    def in_bucket(self) -> bool:
        """True for a folder in an S3 bucket (``path`` is an ``S3Url``)."""
        return isinstance(self.path, S3Url)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True, slots=True)
class BadRow:
    """One manifest row that cannot be submitted; it becomes a `failed` line."""

    line: int
    id: str
    folder: str
    kind: str  # error.kind, e.g. "folder_missing", "symlink_outside", "duplicate_id"
    message: str

    @property
    def key(self) -> str:
        return row_key(self.id, self.line, duplicate=self.kind == "duplicate_id")


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    kind: str
    message: str
    http_status: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "http_status": self.http_status}


@dataclass(slots=True)
class Ticket:
    """A job on its way to a submitter, with the journal's memory of it."""

    job: Job
    attempts: int  # the submission generation (1 = first); keys the Idempotency-Key
    possible_duplicate: bool = False


@dataclass(slots=True)
class Submitted:
    """A folder the API accepted; the scheduler polls its token until a final answer."""

    job: Job
    token: str
    submitted_at: float  # wall clock (time.time()) of the 202
    submitted_mono: float  # scheduler clock of the 202
    attempts: int = 1
    polls: int = 0
    last_pending_mono: float | None = None  # last time a poll answered 202
    run_id: str | None = None
    resumed: bool = False
    possible_duplicate: bool = False  # sent again after a crash mid-POST: carried to its line
    analyse_type: tuple[str, ...] = ()  # what the submission asked for: the result must match
    stuck: bool = False  # reported as a stuck analysis (stuck.StuckWatch): once per token


@dataclass(slots=True)
class Outcome:
    """The final word on one manifest row: exactly one output line."""

    key: str
    line: int
    id: str
    folder: str
    status: str  # a vocab.Status value
    result: Any = None
    error: ErrorInfo | None = None
    run_id: str | None = None
    attempts: int = 0
    polls: int = 0
    submitted_at: float | None = None
    completed_at: float | None = None
    files: int = 0
    total_bytes: int = 0
    possible_duplicate: bool = False
    path: str | None = None  # the folder as resolved (absolute, or s3://...), when it was
    _json: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        """The output line as a dict; built once (the log, the writer and the summary share it)."""
        if self._json is None:
            self._json = self._build_json()
        return self._json

    def _build_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "folder": self.folder,
            "status": self.status,
            "result": self.result,
            "error": self.error.to_json() if self.error else None,
            "run_id": self.run_id,
            "attempts": self.attempts,
            "polls": self.polls,
            "submitted_at": iso(self.submitted_at),
            "completed_at": iso(self.completed_at),
            "line": self.line,
            "files": self.files,
            "bytes": self.total_bytes,
            "latency_s": (
                round(self.completed_at - self.submitted_at, 3)
                if self.completed_at is not None and self.submitted_at is not None
                else None
            ),
            "path": self.path,
            "possible_duplicate": self.possible_duplicate,
        }

    def to_line(self) -> bytes:
        text = json.dumps(self.to_json(), ensure_ascii=False, separators=(",", ":"))
        # Surrogates (an undecodable file name, a lone half of an emoji in a result) can only
        # stand inside JSON strings, where "\udcff" written out is the JSON escape of the same
        # character: the line stays valid JSON, readable UTF-8, and round-trips exactly.
        return (text + "\n").encode("utf-8", "backslashreplace")

    @classmethod
    def for_job(cls, job: Job, *, status: str, attempts: int, polls: int = 0, result: Any = None,
                error: ErrorInfo | None = None, submitted_at: float | None = None,
                run_id: str | None = None, possible_duplicate: bool = False) -> Outcome:
        """The final word on a row that reached the API (its folder was listed)."""
        return cls(
            key=job.key, line=job.line, id=job.id, folder=job.folder, status=status,
            result=result, error=error, run_id=run_id, attempts=attempts, polls=polls,
            submitted_at=submitted_at, completed_at=time.time(), files=len(job.files),
            total_bytes=job.total_bytes, possible_duplicate=possible_duplicate,
            path=str(job.path),
        )

    @classmethod
    def from_bad_row(cls, row: BadRow) -> Outcome:
        return cls(
            key=row.key, line=row.line, id=row.id, folder=row.folder, status=Status.FAILED,
            error=ErrorInfo(row.kind, row.message), completed_at=time.time(),
        )


def iso(ts: float | None) -> str | None:
    """UTC ISO-8601 with milliseconds, or None."""
    if ts is None:
        return None
    t = time.gmtime(ts)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int((ts % 1) * 1000):03d}Z"
