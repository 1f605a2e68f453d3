"""What a run learned about a key's limits, kept for the next run with the same key.

Where it sits: ``Engine.run`` loads a ``tuning.TuningSnapshot`` before the stages start (the
rate controller, the outstanding window and the poll policy start from it instead of from
zero) and saves one when the run ends. A snapshot is kept per API base URL and key
fingerprint (``client.key_fingerprint``, never the key), in two places:

- the run's journal (meta ``tuning:<base URL>:<key fingerprint>``): a rerun of the same
  output starts where it stopped;
- a small per-user file, ``$XDG_STATE_HOME/bulk_engine/learned.json`` (default
  ``~/.local/state/...``): the next backfill with the same key starts from it too.

A snapshot older than ``MAX_AGE_S`` is ignored (limits change: another job on the key, a new
plan); a warm start is re-validated by the controllers anyway. Failing to read or write the
file is logged and never stops a run.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from bulk_engine.errors import StorageError
from bulk_engine.journal import Journal
from bulk_engine.logs import get_logger
from bulk_engine.tuning import TuningSnapshot

__all__ = ["MAX_AGE_S", "LearnedLimits", "state_file"]

log = get_logger()

MAX_AGE_S = 7 * 24 * 3600.0


def state_file() -> Path:
    """The per-user file of learned limits (``$XDG_STATE_HOME``, else ``~/.local/state``)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"),
                                                            ".local", "state")
    return Path(base) / "bulk_engine" / "learned.json"


class LearnedLimits:
    """Load and save the snapshot of one base URL + key fingerprint."""

    def __init__(self, base_url: str, key_fp: str, *, path: Path | None = None) -> None:
        self.slot = f"{base_url.rstrip('/')}|{key_fp}"
        self.path = path if path is not None else state_file()

    def load(self, journal: Journal | None) -> TuningSnapshot | None:
        """The freshest usable snapshot: the journal's, else the per-user file's; None if none."""
        found: list[TuningSnapshot] = []
        if journal is not None:
            text = journal.get_meta(self._meta_key)
            if text:
                found += self._parse(text, f"journal {journal.path}")
        stored = self._read_file().get(self.slot)
        if isinstance(stored, str):
            found += self._parse(stored, str(self.path))
        fresh = [s for s in found if 0 <= s.age() <= MAX_AGE_S]
        if not fresh:
            return None
        best = max(fresh, key=lambda s: s.saved_at)
        log.info("learned_limits_loaded", age_s=round(best.age()),
                 hint="the rate and window start from what the last run with this key learned")
        return best

    def save(self, journal: Journal | None, snapshot: TuningSnapshot) -> None:
        """Keep ``snapshot`` in the journal and in the per-user file (errors only logged)."""
        text = snapshot.to_json()
        if journal is not None:
            try:
                journal.set_meta(self._meta_key, text)
            except StorageError as exc:  # never fail a run over this
                log.warning("learned_limits_not_saved", where="journal", error=str(exc))
        data = self._read_file()
        data[self.slot] = text
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".learned-")
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("learned_limits_not_saved", where=str(self.path), error=exc.strerror)

    @property
    def _meta_key(self) -> str:
        return f"tuning:{self.slot}"

    def _read_file(self) -> dict[str, object]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("learned_limits_unreadable", path=str(self.path), error=str(exc))
            return {}
        return data if isinstance(data, dict) else {}

    @staticmethod
    def _parse(text: str, where: str) -> list[TuningSnapshot]:
        try:
            return [TuningSnapshot.from_json(text)]
        except ValueError as exc:
            log.warning("learned_limits_unreadable", where=where, error=str(exc))
            return []
