"""Before the first row: make the journal and the output file agree, and send back the failed
rows this run retries.

Where it sits: ``Engine.run`` calls :func:`prepare_output` once, with the output locked and
the journal open, before any stage starts. In order:

1. a ``--retry-failed`` rewrite cut short by a crash is finished;
2. ``writer.reconcile``: a torn last line is cut; lines past the journal's offset are marked
   done; an output changed behind the journal's back is rescanned whole and the rows whose
   line is gone are redone (the output file is the authority for what is done);
3. failed rows this run retries (every failed row with ``--retry-failed``, those of the given
   kinds with ``--retry-failed KINDS``; and always those whose error kind is not final,
   ``vocab.NOT_FINAL_KINDS``) get their lines dropped by an atomic rewrite and go back to
   pending.
"""

from __future__ import annotations

from dataclasses import dataclass

from bulk_engine.config import Settings
from bulk_engine.journal import Journal
from bulk_engine.logs import get_logger
from bulk_engine.vocab import NOT_FINAL_KINDS
from bulk_engine.writer import ReconcileReport, file_tail_digest, reconcile, rewrite_without_failed

__all__ = ["StartupReport", "prepare_output", "retry_kinds"]

log = get_logger()


@dataclass(frozen=True, slots=True)
class StartupReport:
    """What :func:`prepare_output` did."""

    reconcile: ReconcileReport
    retried: int  # failed rows sent back to be submitted again

    @property
    def rows_redone(self) -> int:
        return self.reconcile.rows_redone


def prepare_output(settings: Settings, journal: Journal) -> StartupReport:
    """Steps 1–3 of the module docstring; returns what they found."""
    if journal.rewrite_pending:  # a --retry-failed rewrite cut short by a crash
        _rewrite(settings, journal)
    report = reconcile(settings.output, journal)  # cuts a torn tail first
    if report.repaired_bytes:
        log.warning("output_tail_repaired", bytes_removed=report.repaired_bytes,
                    path=str(settings.output))
    # A plain rerun retries rows that failed for transport reasons (an outage is not the
    # row's fault); --retry-failed retries every failed row, --retry-failed KINDS those kinds
    # (and the transport kinds, as a plain rerun would).
    kinds = retry_kinds(settings)
    retried = journal.begin_retry_failed(kinds)
    if retried:
        _rewrite(settings, journal)
    if retried or settings.retry_failed:
        log.info("retry_failed", rows=retried,
                 kinds="all" if kinds is None else ",".join(sorted(kinds)))
    return StartupReport(report, retried)


def retry_kinds(settings: Settings) -> frozenset[str] | None:
    """The error kinds whose failed rows this run retries (None: every failed row)."""
    if not settings.retry_failed:
        return NOT_FINAL_KINDS
    if not settings.retry_failed_kinds:
        return None
    return NOT_FINAL_KINDS | frozenset(settings.retry_failed_kinds)


def _rewrite(settings: Settings, journal: Journal) -> None:
    out = settings.output
    size = rewrite_without_failed(out, journal)
    journal.finish_retry_failed(size, tail=file_tail_digest(out, size))
