"""The emulator's memory: runs, per-key analysis slots, rate buckets, tokens and counters.

``app.py`` translates HTTP into calls on ``EmulatorState``; everything here is plain code with
no I/O, driven by an injected clock and a seeded ``random.Random``. Analyses are bookkept
lazily: when a run is created it is given a start time (the moment one of its key's
``max_parallel_analyses`` slots frees, FIFO) and a finish time, and its status is computed from
those timestamps whenever asked. No task runs in the background, yet queued runs really wait and
the per-key cap really holds.

The cap and the rate limit may change mid-run (``set_limits``), as when another job on the same
key takes some of its slots: runs already given a start keep it, later ones follow the new cap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from cryptography.fernet import Fernet, InvalidToken

from bulk_engine.clock import Clock, MonotonicClock
from bulk_engine.emulator.config import EmulatorConfig
from bulk_engine.emulator.upload import Upload, UploadedFile
from bulk_engine.emulator.verdict import expected_result

__all__ = [
    "FAULT_KINDS",
    "EmulatorState",
    "FaultKind",
    "IdempotencyConflict",
    "Run",
    "RunStatus",
    "Submission",
    "TokenBucket",
]

RunStatus = Literal["queued", "running", "completed", "failed", "expired"]
FaultKind = Literal["reset_before_body", "drop_after_create", "stall", "malformed_json"]
FAULT_KINDS: tuple[FaultKind, ...] = (
    "reset_before_body",
    "drop_after_create",
    "stall",
    "malformed_json",
)


@dataclass(slots=True)
class Run:
    """One analysis: who asked (key index), what (digest, analyse_type, names) and when."""

    run_id: str
    key_index: int
    digest: str
    analyse_type: tuple[str, ...]
    filenames: tuple[str, ...]
    created_at: float
    started_at: float
    finished_at: float
    fails: bool

    def status(self, now: float, result_ttl: float) -> RunStatus:
        """Where the run stands at ``now`` (clock seconds)."""
        if now < self.started_at:
            return "queued"
        if now < self.finished_at:
            return "running"
        if now >= self.finished_at + result_ttl:
            return "expired"
        return "failed" if self.fails else "completed"

    def result(self) -> dict[str, Any]:
        """The 200 body, computed from the content (see ``verdict.expected_result``)."""
        return expected_result(self.digest, self.analyse_type, self.filenames)


@dataclass(slots=True)
class Submission:
    """A ``POST /case`` that created a run, as listed by ``GET /_emulator/submissions``."""

    run: Run
    files: tuple[UploadedFile, ...]
    use_case: str
    asynchronous: bool
    idempotency_key: str | None
    http_status: int | str | None = None  # what the first answer was; "aborted" if cut
    replays: int = 0


@dataclass(slots=True)
class TokenBucket:
    """A token bucket: ``rate`` tokens per second, at most ``burst`` stored."""

    rate: float
    burst: int
    tokens: float
    updated: float

    def refill(self, now: float) -> None:
        """Account the tokens earned up to ``now``."""
        if now > self.updated:
            self.tokens = min(float(self.burst), self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def take(self, now: float) -> float:
        """Take one token; return 0 when granted, else the seconds until one is available."""
        self.refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclass(slots=True)
class _Idempotent:
    submission: Submission
    expires_at: float


class IdempotencyConflict(Exception):
    """An ``Idempotency-Key`` was reused, within its lifetime, for a different content."""


@dataclass(eq=False)
class EmulatorState:
    """Everything the emulator remembers; ``app.py`` calls it, tests inspect it.

    Key indexes (positions in ``config.api_keys``) stand for keys everywhere, so nothing stored
    or reported here contains a key.
    """

    config: EmulatorConfig
    clock: Clock = field(default_factory=MonotonicClock)
    rng: random.Random = field(init=False, repr=False)
    runs: dict[str, Run] = field(init=False, default_factory=dict, repr=False)
    submissions: list[Submission] = field(init=False, default_factory=list, repr=False)
    _fernet: Fernet = field(init=False, repr=False)
    _key_index: dict[str, int] = field(init=False, repr=False)
    _key_hashes: tuple[str, ...] = field(init=False, repr=False)
    _slots: list[list[float]] = field(init=False, repr=False)
    _buckets: list[TokenBucket | None] = field(init=False, repr=False)
    _idempotency: dict[tuple[int, str], _Idempotent] = field(
        init=False, repr=False, default_factory=dict
    )
    _seen_digests: set[tuple[int, str]] = field(init=False, repr=False, default_factory=set)
    _counters: Counter[str] = field(init=False, repr=False, default_factory=Counter)
    _submissions_by_status: Counter[str] = field(init=False, repr=False, default_factory=Counter)
    _polls_by_status: Counter[str] = field(init=False, repr=False, default_factory=Counter)
    _faults: Counter[str] = field(init=False, repr=False, default_factory=Counter)
    _in_flight: int = field(init=False, repr=False, default=0)

    def __post_init__(self) -> None:
        config = self.config
        self.rng = random.Random(config.seed)
        self._fernet = Fernet(Fernet.generate_key())
        self._key_index = {key: i for i, key in enumerate(config.api_keys)}
        self._key_hashes = tuple(_key_hash(key) for key in config.api_keys)
        self._slots = [[] for _ in config.api_keys]
        now = self.clock.now()
        self._buckets = [
            TokenBucket(config.rate_limit, config.burst, float(config.burst), now)
            if config.rate_limit is not None
            else None
            for _ in config.api_keys
        ]

    # -- requests -------------------------------------------------------------------------

    def authenticate(self, api_key: str | None) -> int | None:
        """The index of ``api_key`` in the config, or None when missing or unknown."""
        return None if api_key is None else self._key_index.get(api_key)

    def take_rate_token(self, key_index: int) -> float:
        """Charge one API call to the key's bucket: 0 when allowed, else seconds to wait."""
        bucket = self._buckets[key_index]
        return 0.0 if bucket is None else bucket.take(self.clock.now())

    def roll(self, rate: float) -> bool:
        """Draw a per-request event of probability ``rate`` (no draw when the rate is 0)."""
        return rate > 0.0 and self.rng.random() < rate

    def request_started(self) -> None:
        """Count an API request entering the server (for ``max_in_flight_requests``)."""
        self._in_flight += 1
        if self._in_flight > self._counters["max_in_flight_requests"]:
            self._counters["max_in_flight_requests"] = self._in_flight

    def request_finished(self, endpoint: Literal["submit", "poll"], status: str) -> None:
        """Count an API request leaving, with its answer (an HTTP code or ``"aborted"``)."""
        self._in_flight -= 1
        if endpoint == "submit":
            self._counters["submissions"] += 1
            self._submissions_by_status[status] += 1
        else:
            self._counters["polls"] += 1
            self._polls_by_status[status] += 1

    def count(self, name: str, amount: int = 1) -> None:
        """Add to a plain counter (``rate_limited``, ``errors_injected``, ``bytes_received``)."""
        self._counters[name] += amount

    def count_fault(self, kind: FaultKind) -> None:
        """Record that a fault of ``kind`` was injected."""
        self._faults[kind] += 1

    # -- runs -----------------------------------------------------------------------------

    def submit(self, key_index: int, upload: Upload, idempotency_key: str | None) -> Submission:
        """Create the run for an accepted upload, or return the one its idempotency key names.

        Raises ``IdempotencyConflict`` when the key was used for another content.
        """
        now = self.clock.now()
        if idempotency_key is not None:
            entry = self._idempotency.get((key_index, idempotency_key))
            if entry is not None and entry.expires_at > now:
                if entry.submission.run.digest != upload.digest:
                    raise IdempotencyConflict(idempotency_key)
                entry.submission.replays += 1
                self._counters["idempotent_replays"] += 1
                return entry.submission

        if (key_index, upload.digest) in self._seen_digests:
            self._counters["duplicate_submissions"] += 1
        self._seen_digests.add((key_index, upload.digest))

        low, high = self.config.processing_time
        duration = self.rng.uniform(low, high)
        fails = self.roll(self.config.fail_rate)
        started, running = self._assign_slot(key_index, now, duration)
        if running > self._counters["max_parallel_observed"]:
            self._counters["max_parallel_observed"] = running
        run = Run(
            run_id=self._new_run_id(),
            key_index=key_index,
            digest=upload.digest,
            analyse_type=upload.payload.analyse_type,
            filenames=tuple(f.name for f in upload.files),
            created_at=now,
            started_at=started,
            finished_at=started + duration,
            fails=fails,
        )
        self.runs[run.run_id] = run
        submission = Submission(
            run=run,
            files=upload.files,
            use_case=upload.payload.use_case,
            asynchronous=upload.payload.asynchronous,
            idempotency_key=idempotency_key,
        )
        self.submissions.append(submission)
        self._counters["runs_created"] += 1
        if idempotency_key is not None:
            self._idempotency[(key_index, idempotency_key)] = _Idempotent(
                submission, now + self.config.idempotency_ttl
            )
        return submission

    def _assign_slot(self, key_index: int, now: float, duration: float) -> tuple[float, int]:
        """Give a new run the key's earliest free slot; return its start and how many run then.

        Each key's heap holds the finish time of the last run of each slot in use. Starts are
        non-decreasing in submission order, so at a run's start the runs still going are exactly
        the heap entries finishing later.
        """
        heap = self._slots[key_index]
        start = now
        # Slots whose run is over now are free for this run and every later one (starts never
        # go back in time): drop them first, so that the heap holds only runs still going (it
        # used to keep every run made while the cap was not reached, and the count below
        # scanned them all: quadratic with a high cap).
        while heap and heap[0] <= now:
            heapq.heappop(heap)
        # Usually pops one slot (or none while the cap is not reached). After the cap was
        # lowered, the new run waits until enough slots are free: by the time the k-th earliest
        # of them finishes, fewer than the new cap are still running.
        while len(heap) >= self.config.max_parallel_analyses:
            start = max(start, heapq.heappop(heap))
        # Every run left in the heap is still going at ``now``; past a lowered cap, count those
        # still going at the later start.
        running = 1 + (len(heap) if start == now else sum(1 for f in heap if f > start))
        heapq.heappush(heap, start + duration)
        return start, running

    def _new_run_id(self) -> str:
        stamp = datetime.now(UTC).strftime("%m_%d_%H_%M_%S")
        while True:
            run_id = f"{stamp}_{self.rng.getrandbits(48):012x}"
            if run_id not in self.runs:
                return run_id

    def set_limits(
        self,
        *,
        max_parallel_analyses: int | None = None,
        rate_limit: float | Literal["keep"] | None = "keep",
        burst: int | None = None,
    ) -> EmulatorConfig:
        """Change the per-key cap and rate limit from now on; returns the new config.

        ``max_parallel_analyses``: runs created from now on start only while fewer than this many
        of the key's runs are running (runs already started or given a start keep it).
        ``rate_limit`` (``None`` turns the limit off) and ``burst`` apply to every key's bucket
        at once: tokens earned so far count at the old rate, and a smaller burst trims the
        bucket. Invalid values raise ``ValueError`` and change nothing.
        """
        changes: dict[str, Any] = {}
        if max_parallel_analyses is not None:
            changes["max_parallel_analyses"] = max_parallel_analyses
        if rate_limit != "keep":
            changes["rate_limit"] = rate_limit
        if burst is not None:
            changes["burst"] = burst
        config = dataclasses.replace(self.config, **changes)  # validates
        now = self.clock.now()
        buckets: list[TokenBucket | None] = []
        for bucket in self._buckets:
            if config.rate_limit is None:
                buckets.append(None)
            elif bucket is None:
                buckets.append(TokenBucket(config.rate_limit, config.burst, 0.0, now))
            else:
                bucket.refill(now)
                bucket.rate = config.rate_limit
                bucket.burst = config.burst
                bucket.tokens = min(bucket.tokens, float(config.burst))
                buckets.append(bucket)
        self._buckets = buckets
        self.config = config
        return config

    def limits(self) -> dict[str, Any]:
        """The limits in force, as served by ``GET``/``POST /_emulator/limits``."""
        c = self.config
        return {
            "max_parallel_analyses": c.max_parallel_analyses,
            "rate_limit": c.rate_limit,
            "burst": c.burst,
        }

    def run_status(self, run: Run) -> RunStatus:
        """The status of ``run`` now."""
        return run.status(self.clock.now(), self.config.result_ttl)

    # -- tokens ---------------------------------------------------------------------------

    def issue_token(self, run_id: str, key_index: int) -> str:
        """A Fernet retrieve token binding ``run_id`` to the key (by a hash, never the key)."""
        plain = json.dumps({"run_id": run_id, "kh": self._key_hashes[key_index]})
        return self._fernet.encrypt(plain.encode()).decode()

    def open_token(self, token: str) -> tuple[str, str] | None:
        """``(run_id, key hash)`` from a token this emulator issued, or None if it is invalid."""
        try:
            data = json.loads(self._fernet.decrypt(token.encode()))
        except (InvalidToken, ValueError, TypeError):
            return None
        if not isinstance(data, dict):
            return None
        run_id, key_hash = data.get("run_id"), data.get("kh")
        if not isinstance(run_id, str) or not isinstance(key_hash, str):
            return None
        return run_id, key_hash

    def key_hash(self, key_index: int) -> str:
        """The key hash that tokens issued to this key carry."""
        return self._key_hashes[key_index]

    # -- reporting ------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The counters served by ``GET /_emulator/stats``.

        ``submissions`` / ``polls``: ``POST /case`` / ``POST /case/retrieve`` calls answered, by
        HTTP status in ``*_by_status`` (``"aborted"`` when a fault cut the connection);
        ``rate_limited``: 429 answers; ``errors_injected``: 503 answers from ``error_rate``;
        ``faults_injected``: per fault kind; ``bytes_received``: bytes of ``documents`` parts
        (documents and forms); ``duplicate_submissions``: new runs whose content the same key had
        already sent; ``idempotent_replays``: submissions answered with an existing run;
        ``runs_created`` and ``runs`` (by status now); ``max_parallel_observed``: most analyses
        running at once for any key; ``in_flight_requests`` / ``max_in_flight_requests``:
        concurrent API requests now / at most.
        """
        now = self.clock.now()
        runs: Counter[str] = Counter(
            run.status(now, self.config.result_ttl) for run in self.runs.values()
        )
        c = self._counters
        return {
            "submissions": c["submissions"],
            "submissions_by_status": dict(sorted(self._submissions_by_status.items())),
            "polls": c["polls"],
            "polls_by_status": dict(sorted(self._polls_by_status.items())),
            "rate_limited": c["rate_limited"],
            "errors_injected": c["errors_injected"],
            "faults_injected": {kind: self._faults[kind] for kind in FAULT_KINDS},
            "bytes_received": c["bytes_received"],
            "duplicate_submissions": c["duplicate_submissions"],
            "idempotent_replays": c["idempotent_replays"],
            "runs_created": c["runs_created"],
            "runs": {
                status: runs[status]
                for status in ("queued", "running", "completed", "failed", "expired")
            },
            "max_parallel_observed": c["max_parallel_observed"],
            "in_flight_requests": self._in_flight,
            "max_in_flight_requests": c["max_in_flight_requests"],
        }

    def submissions_json(self) -> list[dict[str, Any]]:
        """Every recorded submission, oldest first, as served by ``GET /_emulator/submissions``."""
        now = self.clock.now()
        return [
            {
                "run_id": s.run.run_id,
                "key_index": s.run.key_index,
                "files": [f.as_json() for f in s.files],
                "idempotency_key": s.idempotency_key,
                "digest": s.run.digest,
                "analyse_type": list(s.run.analyse_type),
                "use_case": s.use_case,
                "asynchronous": s.asynchronous,
                "status": s.run.status(now, self.config.result_ttl),
                "http_status": s.http_status,
                "replays": s.replays,
            }
            for s in self.submissions
        ]


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]
