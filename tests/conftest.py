"""Shared fixtures: run the engine against the in-process emulator and check its output."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from bulk_engine.client import idempotency_key, multipart_filename, submission_for
from bulk_engine.config import Settings
from bulk_engine.emulator.verdict import content_digest, expected_result
from bulk_engine.manifest import list_folder
from bulk_engine.models import Job, fingerprint_files

API_KEY = "test-key-0123456789"


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Every output line, parsed; fails on a torn or invalid line."""
    with path.open("rb") as fh:
        return [json.loads(line) for line in fh]


def expected_for_folder(
    folder: Path, analyse_type: Sequence[str] = ("decision",)
) -> dict[str, Any]:
    """The result the emulator must give for this folder, computed from the files on disk."""
    files = list_folder(folder, max_file_size=1 << 40, follow_symlinks=False)
    pairs = [(multipart_filename(f.name), hashlib.sha256(f.path.read_bytes()).hexdigest())
             for f in files]
    return expected_result(content_digest(pairs), analyse_type,
                           [multipart_filename(f.name) for f in files])


def expected_for_contents(
    files: Mapping[str, bytes], analyse_type: Sequence[str] = ("decision",)
) -> dict[str, Any]:
    """The result the emulator must give for a folder holding ``files`` (name → bytes), computed
    from the bytes themselves: the equivalent of :func:`expected_for_folder` for a folder in a
    bucket (hidden names are not part of a folder, as on disk)."""
    names = sorted(n for n in files if not n.startswith("."))
    pairs = [(multipart_filename(n), hashlib.sha256(files[n]).hexdigest()) for n in names]
    return expected_result(content_digest(pairs), analyse_type,
                           [multipart_filename(n) for n in names])


def key_for(row_id: str, folder: Path, generation: int, **settings: Any) -> str:
    """The Idempotency-Key the engine must send for this folder's async submission
    ``generation``, with the test key and default options (or ``settings``)."""
    files = list_folder(folder, max_file_size=1 << 40, follow_symlinks=False)
    job = Job(line=0, id=row_id, folder=str(folder), path=folder, files=files,
              fingerprint=fingerprint_files(files))
    _, identity = submission_for(Settings(api_key=API_KEY, **settings), job, asynchronous=True)
    return idempotency_key(identity, generation)


def folder_bytes(folder: Path) -> int:
    return sum(f.size for f in list_folder(folder, max_file_size=1 << 40, follow_symlinks=False))


def engine_settings(base_url: str, out: Path, **kw: Any) -> Settings:
    """Fast settings for tests: short polls, high rate, no progress panel."""
    base: dict[str, Any] = dict(
        base_url=base_url, api_key=API_KEY, output=out, concurrency=8, rate_limit=500.0,
        burst=50, poll_min=0.02, poll_max=0.2, progress=False, seed=1, retry_base=0.01,
        retry_cap=0.1, fsync_interval=0.05,
        # Tests pin the outstanding bound (max_outstanding) they reason about; the adaptive
        # window has tests of its own (test_tuning.py, test_selftuning.py).
        adaptive_window=False,
    )
    base.update(kw)
    return Settings(**base)


@pytest.fixture
def api_key() -> str:
    return API_KEY


@pytest.fixture(autouse=True)
def _own_state_dir(tmp_path_factory: pytest.TempPathFactory,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    """What runs learn about a key (bulk_engine.learned) goes to a directory of the test's
    own, never the user's ~/.local/state (children inherit it through the environment)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
