"""The project's vocabularies, each defined once: row states, output statuses, exit codes and
the registry of error kinds with their properties.

Every list elsewhere (the manifest's bad-row kinds, the kinds that count toward the mass-failure
stop, the kinds ``report --failed-manifest`` leaves out, the kinds a plain rerun retries) is
derived from :data:`ERROR_KINDS`; the README's tables are checked against it by a test.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

__all__ = [
    "BAD_COLUMN_KINDS",
    "BAD_ROW_KINDS",
    "ERROR_KINDS",
    "MASS_FAILURE_KINDS",
    "NOT_FINAL_KINDS",
    "NOT_RERUNNABLE_KINDS",
    "ErrorKind",
    "ExitCode",
    "Origin",
    "Rerun",
    "RowState",
    "Status",
    "error_kind",
]


class RowState(enum.StrEnum):
    """Where a row stands in the journal (see ``docs/architecture.md``)."""

    PENDING = "pending"  # known, to be submitted (again)
    SUBMITTING = "submitting"  # its POST /case may be on the wire: a run may exist server-side
    SUBMITTED = "submitted"  # the API accepted it: a live retrieve token is journaled
    DONE = "done"  # its line is durably in the output
    RETRYING = "retrying"  # done+failed, its line being dropped for a rerun (--retry-failed)


class Status(enum.StrEnum):
    """The ``status`` of an output line."""

    COMPLETED = "completed"
    FAILED = "failed"


class ExitCode(enum.IntEnum):
    """Process exit codes (``2`` always means "finished, some rows failed")."""

    OK = 0  # every row completed (--dry-run: every row can be submitted)
    FATAL = 1  # bad configuration or usage, bad key, I/O error, mass failure
    SOME_FAILED = 2  # finished, but some rows failed
    INTERRUPTED = 130  # Ctrl-C: state saved, a rerun resumes
    TERMINATED = 143  # SIGTERM: state saved, a rerun resumes


class Origin(enum.StrEnum):
    """Whose fault a failed row is."""

    ROW = "row"  # the manifest row or its folder: fix the input (never uploaded)
    API = "api"  # the API's answer, or the way to it


class Rerun(enum.StrEnum):
    """How ``report --failed-manifest`` treats a failed row of this kind."""

    YES = "yes"  # written to the failed manifest
    WITH_MANIFEST = "with_manifest"  # only when copied from the original row (--manifest)
    NO = "no"  # its manifest line itself is broken: fix the original manifest first


@dataclass(frozen=True, slots=True)
class ErrorKind:
    """One ``error.kind`` of a failed output line, and what the engine does about it.

    ``mass_failure``: counts toward the mass-failure stop (the API is failing, not the input).
    ``final``: a plain rerun keeps the row failed; when False (transport trouble, an outage),
    a plain rerun retries it. ``rerun``: see :class:`Rerun`.
    """

    name: str
    origin: Origin
    meaning: str
    mass_failure: bool = False
    final: bool = True
    rerun: Rerun = Rerun.YES


def _row(name: str, meaning: str, rerun: Rerun = Rerun.YES) -> ErrorKind:
    return ErrorKind(name, Origin.ROW, meaning, rerun=rerun)


def _api(name: str, meaning: str, *, final: bool = True) -> ErrorKind:
    return ErrorKind(name, Origin.API, meaning, mass_failure=True, final=final)


ERROR_KINDS: Final[dict[str, ErrorKind]] = {
    k.name: k
    for k in (
        # Bad rows: the manifest line or the folder it names (never uploaded).
        _row("empty_folder", "the folder value is empty", Rerun.NO),
        _row("folder_missing", "the folder (or bucket prefix) does not exist"),
        _row("not_a_directory", "the folder value names a file, not a folder"),
        _row("folder_unreadable", "the folder cannot be listed (permissions, access denied)"),
        _row("folder_empty", "the folder has no file to upload"),
        _row("symlink_outside", "a symlink leads outside its folder"),
        _row("symlink_dangling", "a symlink points to nothing (or loops)"),
        _row("special_file", "a FIFO, socket or device in the folder"),
        _row("file_unreadable", "a file cannot be read"),
        _row("file_too_large", "a file is above --max-file-size"),
        _row("file_changed", "a file changed between listing and upload"),
        _row("outside_root", "the folder resolves outside --confine-to"),
        _row("ragged_row", "the row has more or fewer fields than the header", Rerun.NO),
        _row("bad_row", "the line cannot be parsed as CSV (or holds NUL bytes)", Rerun.NO),
        _row("bad_encoding", "the line is not UTF-8", Rerun.NO),
        _row("bad_analyse_type", "the analyse_type column names an unknown type",
             Rerun.WITH_MANIFEST),
        _row("bad_payload", "the payload column is not a JSON object", Rerun.WITH_MANIFEST),
        _row("duplicate_id", "an earlier row has the same id", Rerun.NO),
        _row("manifest_parse_error", "the manifest cannot be parsed from this line on", Rerun.NO),
        _row("journal_incomplete", "the journal lost this row's folder (resume only)"),
        # The API's answers.
        _api("analysis_failed", "retrieve answered 500: the API could not analyse the folder"),
        _api("rejected", "POST /case answered a 4xx other than 401/403, or retrieve an odd 4xx"),
        _api("token_expired", "retrieve answered 404 and the attempt budget is spent"),
        _api("token_invalid", "retrieve answered 401 and the attempt budget is spent"),
        # Transport trouble: retried within --max-retries, then failed; a plain rerun retries.
        # For a folder in a bucket, also S3 failing for that row alone (s3.access.engine_error).
        _api("network", "the API (or S3, for this row alone) could not be reached",
             final=False),
        _api("timeout", "the API (or S3, for this row alone) did not answer in time",
             final=False),
        _api("server_error", "the API answered 5xx (or 502/503 from a gateway), or S3 kept "
             "failing for this row alone", final=False),
        _api("rate_limited", "the API kept answering 429", final=False),
        _api("ambiguous_submit", "POST /case lost its answer after the body was sent",
             final=False),
        _api("malformed_response", "the API answered something that is not the documented shape",
             final=False),
    )
}


def error_kind(name: str) -> ErrorKind:
    """The registered kind ``name``; KeyError names the unknown kind (a bug, not bad input)."""
    try:
        return ERROR_KINDS[name]
    except KeyError:
        raise KeyError(f"unregistered error kind {name!r}: add it to bulk_engine.vocab") from None


BAD_ROW_KINDS: Final = frozenset(k.name for k in ERROR_KINDS.values() if k.origin is Origin.ROW)
MASS_FAILURE_KINDS: Final = frozenset(k.name for k in ERROR_KINDS.values() if k.mass_failure)
NOT_FINAL_KINDS: Final = frozenset(k.name for k in ERROR_KINDS.values() if not k.final)
NOT_RERUNNABLE_KINDS: Final = frozenset(
    k.name for k in ERROR_KINDS.values() if k.rerun is Rerun.NO)
BAD_COLUMN_KINDS: Final = frozenset(
    k.name for k in ERROR_KINDS.values() if k.rerun is Rerun.WITH_MANIFEST)
