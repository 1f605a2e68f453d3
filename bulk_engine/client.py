"""HTTP client of the Case Analysis API: one exchange at a time, translated into our terms.

Used by the submitters (``submit``) and the poll scheduler (``retrieve``). Each call takes a rate
token from the run's one ``RateLimiter`` first, then makes exactly one HTTP exchange; retries with
full-jitter backoff wrap it in ``call_with_retries``. This is the only module that sees aiohttp
exceptions: they are translated into ``bulk_engine.errors`` here, with messages that never carry
request headers (where the API key travels).

Uploads stream every file from disk through aiohttp's file payloads (chunked reads in a worker
thread): memory does not grow with file size, and a fresh body is built from freshly opened
files on every attempt, because a multipart body is consumed by the attempt that sends it.
Folders of at most ``SMALL_FOLDER_BYTES`` are read whole in one worker-thread call per attempt
and sent as one bytes body instead: same bytes, less CPU.

A folder in a bucket (``s3://``) goes the same way through the run's ``S3Access``: small ones
read whole before the rate token is taken, larger ones streamed object by object from a fresh
GET under the listed ETag on every attempt (``s3.payload.S3ObjectPayload``). An object that
changed since listing, or a store that stopped answering, fails the upload before the body is
complete: that is never a transport error of the API (``_exchange`` tells them apart with
``s3.body_error``), and never an ambiguous submit.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import mimetypes
import os
import random
import ssl
import stat
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

import aiohttp

from bulk_engine.answers import processing_problem, result_problem, snippet, token_problem
from bulk_engine.backoff import RetryBudget, parse_retry_after
from bulk_engine.clock import Clock
from bulk_engine.config import Settings
from bulk_engine.errors import (
    AmbiguousSubmitError,
    ApiError,
    AuthError,
    BulkEngineError,
    ConfigError,
    FatalRunError,
    PermanentError,
    TransientError,
)
from bulk_engine.health import ApiHealth
from bulk_engine.logs import Redactor, get_logger
from bulk_engine.models import FileEntry, Job
from bulk_engine.ratelimit import PRIORITY_POLL, PRIORITY_SUBMIT, Limiter
from bulk_engine.s3.listing import S3Entry
from bulk_engine.s3.url import S3Url

if TYPE_CHECKING:
    from bulk_engine.s3.access import S3Access

__all__ = [
    "MIN_UPLOAD_BYTES_PER_S",
    "SMALL_FOLDER_BYTES",
    "SYNC_ANALYSIS_ALLOWANCE_S",
    "TRANSIENT_4XX",
    "USER_AGENT",
    "CaseClient",
    "ClientStats",
    "RetrieveAnswer",
    "SubmitAnswer",
    "build_payload",
    "idempotency_key",
    "key_fingerprint",
    "multipart_filename",
    "request_identity",
    "submission_for",
]

log = get_logger()

# Folders up to this size are read in one worker-thread call and sent as one bytes body.
# Streaming them costs two thread hops per file (read, close) and a socket write per part: about
# 0.5 ms of CPU per small folder (benchmarks/bench_client_cost.py). Memory stays bounded by
# concurrency × this, whatever the files' sizes; larger folders stream from disk.
SMALL_FOLDER_BYTES = 256 * 1024

# 409 (a request with the same Idempotency-Key still in flight) and 425 (too early) are worth
# another try; 408 too, but as an ambiguous submit.
TRANSIENT_4XX = frozenset({409, 425})
MIN_UPLOAD_BYTES_PER_S = 1_000_000
# A sync call lasts the whole analysis: it gets this much more than submit_timeout.
SYNC_ANALYSIS_ALLOWANCE_S = 300.0

USER_AGENT = "bulk-engine/0.1"

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class SubmitAnswer:
    """What POST /case gave: a retrieve token (async) or the result itself (sync)."""

    token: str | None = None
    result: Any = None


@dataclass(frozen=True, slots=True)
class RetrieveAnswer:
    """What POST /case/retrieve gave. ``status`` is the HTTP status: 200, 202, 401, 404 or 500."""

    status: int
    body: Any = None
    message: str = ""

    @property
    def run_id(self) -> str | None:
        if isinstance(self.body, dict):
            rid = self.body.get("run_id")
            return rid if isinstance(rid, str) else None
        return None


@dataclass(slots=True)
class ClientStats:
    """Counters the summary and the benchmarks read."""

    calls: int = 0
    submits: int = 0
    polls: int = 0
    throttled: int = 0  # 429 answers
    unavailable: int = 0  # 503 answers
    retries: int = 0
    transport_errors: int = 0
    ambiguous_submits: int = 0
    bytes_uploaded: int = 0
    # Exchanges by (endpoint, HTTP status as text, or "error" when no answer came: connect
    # error, timeout, reset): the metrics' API calls by endpoint and status.
    answers: Counter[tuple[str, str]] = field(default_factory=Counter)


_HEX = frozenset("0123456789abcdefABCDEF")


def multipart_filename(name: str) -> str:
    """The filename sent for a file: its on-disk name, percent-encoded where it must be.

    Deterministic and collision-free (two different names never give the same filename):
    valid UTF-8 goes out as it is stored (NFC and NFD alike); each byte that is not valid UTF-8,
    each control character (CR, LF, ...), ``"`` and ``\\`` is written ``%XX``; a ``%`` is written
    ``%25`` when two hex digits follow it (so it cannot be read as an escape) and kept otherwise.
    Decoding every ``%XX`` gives the name's bytes back.
    """
    text = os.fsencode(name).decode("utf-8", "surrogateescape")
    out: list[str] = []
    for i, ch in enumerate(text):
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that is not valid UTF-8
            out.append(f"%{code - 0xDC00:02X}")
        elif code < 0x20 or code == 0x7F or ch in '"\\':
            out.append(f"%{code:02X}")
        elif ch == "%" and text[i + 1:i + 2] in _HEX and text[i + 2:i + 3] in _HEX:
            out.append("%25")
        else:
            out.append(ch)
    return "".join(out)


def key_fingerprint(api_key: str | None) -> str:
    """A short one-way digest of the API key: tells keys apart, reveals nothing of one."""
    raw = b"bulk-engine/key/v1\x00" + (api_key or "").encode("utf-8", "surrogateescape")
    return hashlib.sha256(raw).hexdigest()[:16]


def request_identity(job: Job, payload: dict[str, Any], key_fp: str) -> str:
    """A digest of everything that decides the API's answer to one submission.

    The row id, the payload exactly as sent (analyse_type, use_case, the row's own keys, the
    mode), the folder's files (names, sizes, mtimes: ``Job.fingerprint``) and the key's
    fingerprint. Two submissions share it only if the API must give them the same answer.
    """
    doc = json.dumps([job.id, payload, job.fingerprint, key_fp], sort_keys=True,
                     ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(doc.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def submission_for(settings: Settings, job: Job, *, asynchronous: bool,
                   key_fp: str | None = None) -> tuple[dict[str, Any], str]:
    """The payload to send for ``job`` and its :func:`request_identity` (with the settings'
    key, or the key whose fingerprint is ``key_fp``)."""
    payload = build_payload(settings, job, asynchronous=asynchronous)
    key_fp = key_fp if key_fp is not None else key_fingerprint(settings.api_key)
    return payload, request_identity(job, payload, key_fp)


def idempotency_key(identity: str, generation: int) -> str:
    """Stable across retries and restarts of one submission of one request identity
    (:func:`request_identity`); new for a deliberate resubmit (a new ``generation``) and for
    any change of what is asked."""
    raw = f"{identity}\x00{generation}".encode()
    return "be-" + hashlib.sha256(raw).hexdigest()[:40]


def _content_disposition(name: str, filename: str | None = None) -> str:
    # Field names are ours (plain ASCII); filenames come through multipart_filename, which
    # leaves no quote, backslash or line break in them.
    value = f'form-data; name="{name}"'
    if filename is not None:
        value += f'; filename="{filename}"'
    return value


def _content_type(f: FileEntry | S3Entry) -> str:
    if f.name.lower().endswith(".json"):
        return "application/json"
    guessed, _ = mimetypes.guess_type(multipart_filename(f.name))
    return guessed or "application/octet-stream"


def build_payload(settings: Settings, job: Job, *, asynchronous: bool) -> dict[str, Any]:
    """The `payload` JSON of one folder: run defaults, then the row's columns, then the mode."""
    payload: dict[str, Any] = {
        "analyse_type": list(job.analyse_type or settings.analyse_type),
        "use_case": job.use_case or settings.use_case,
    }
    if "share_link" in payload["analyse_type"]:
        payload["share_link_settings"] = {"access": "public", "password": ""}
    payload.update(job.payload)
    payload["asynchronous"] = asynchronous
    return payload


class CaseClient:
    """One aiohttp session for the run, every call gated by the shared limiter (the run's
    ``RateLimiter``, or with ``--db`` the key's ``pg.governor.Governor``)."""

    def __init__(
        self,
        settings: Settings,
        *,
        limiter: Limiter,
        clock: Clock,
        rng: random.Random,
        max_connections: int = 100,
        health: ApiHealth | None = None,
        s3: S3Access | None = None,
    ) -> None:
        self._settings = settings
        self._s3 = s3
        self._limiter = limiter
        self._clock = clock
        self._rng = rng
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._base = settings.base_url.rstrip("/")
        self._redactor = Redactor([settings.api_key or ""])
        self.health = health if health is not None else ApiHealth(clock)
        self.stats = ClientStats()

    async def __aenter__(self) -> CaseClient:
        ssl_ctx: ssl.SSLContext | bool = True
        if self._settings.ca_bundle is not None:
            ssl_ctx = ssl.create_default_context(cafile=str(self._settings.ca_bundle))
        connector = aiohttp.TCPConnector(limit=self._max_connections, ssl=ssl_ctx)
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers={"User-Agent": USER_AGENT},
            raise_for_status=False,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _headers(self) -> dict[str, str]:
        return {"api-key": self._settings.api_key or ""}

    # --- one exchange each -------------------------------------------------------------------

    async def submit_once(
        self,
        job: Job,
        *,
        payload: dict[str, Any],
        idem_key: str | None,
        before_send: Callable[[], Awaitable[None]] | None = None,
    ) -> SubmitAnswer:
        """One POST /case: stream the folder's files; translate the answer or raise ApiError.

        ``payload`` is sent as is (``build_payload``); its ``asynchronous`` and ``analyse_type``
        say which answer fits: a 202 with a token, or a 200 holding exactly the requested keys.
        ``before_send`` runs once the rate token is taken, right before the request goes out:
        the engine journals "submitting" there, so a crash while waiting for the rate limiter
        does not make a row look like a possible duplicate.
        """
        assert self._session is not None, "use CaseClient as an async context manager"
        s3 = self._bucket(job)
        # A small folder is read before the rate token is taken, so that the call leaves as soon
        # as it has its token (a thread hop in between would add jitter at the server's bucket).
        contents: list[bytes] | None = None
        if job.total_bytes <= SMALL_FOLDER_BYTES:
            contents = (await s3.read_small([f for f in job.files if isinstance(f, S3Entry)])
                        if s3 is not None else await _read_small_folder(job))
        await self._limiter.acquire(PRIORITY_SUBMIT)
        if before_send is not None:
            await before_send()
        self.stats.calls += 1
        self.stats.submits += 1
        asynchronous = bool(payload.get("asynchronous"))
        headers = self._headers()
        if idem_key is not None:
            headers["Idempotency-Key"] = idem_key
        # The whole exchange may take submit_timeout plus the upload at 1 MB/s at least, so a
        # large folder on a modest link is not cut off (and retried) forever.
        timeout = aiohttp.ClientTimeout(
            total=(self._settings.submit_timeout + job.total_bytes / MIN_UPLOAD_BYTES_PER_S
                   + (0.0 if asynchronous else SYNC_ANALYSIS_ALLOWANCE_S)),
            sock_connect=self._settings.connect_timeout,
        )
        handles = []
        try:
            with aiohttp.MultipartWriter("form-data") as mp:
                part = mp.append(json.dumps(payload), {"Content-Type": "application/json"})
                part.headers["Content-Disposition"] = _content_disposition("payload")
                entries: tuple[FileEntry | S3Entry, ...] = job.files
                for i, f in enumerate(entries):
                    if contents is not None:
                        fh: Any = contents[i]
                    elif isinstance(f, S3Entry):
                        assert s3 is not None
                        fh = await s3.payload(f)  # a fresh GET when aiohttp writes it
                    else:
                        # The reads happen in a worker thread inside aiohttp.
                        fh = _open_regular(f.path)
                        handles.append(fh)
                    # Content-Disposition is given up front: otherwise aiohttp derives one from
                    # fh.name, and a name that is not UTF-8 on disk makes it raise.
                    mp.append(fh, {
                        "Content-Type": _content_type(f),
                        "Content-Disposition": _content_disposition(
                            "documents", multipart_filename(f.name)
                        ),
                    })
            body: Any = mp
            if contents is not None:
                body = await mp.as_bytes()  # one write instead of one per part
                headers["Content-Type"] = mp.content_type
            status, retry_after, text = await self._exchange(
                "/case", "submit", ambiguous=True, data=body, headers=headers, timeout=timeout
            )
        except OSError as exc:
            raise PermanentError(
                f"cannot read a file of the folder: {exc.strerror or exc}", kind="file_unreadable"
            ) from None
        finally:
            for fh in handles:
                fh.close()
        self.stats.bytes_uploaded += job.total_bytes
        return self._submit_answer(status, text, retry_after, payload)

    def _bucket(self, job: Job) -> S3Access | None:
        """The run's S3 access for a folder in a bucket; None for a local folder."""
        if not isinstance(job.path, S3Url):
            return None
        if self._s3 is None:
            raise ConfigError(f"folder {job.path} is in a bucket, and this client has no S3 "
                              "access (CaseClient(s3=...))")
        return self._s3

    def _submit_answer(self, status: int, text: str, retry_after: float | None,
                       payload: dict[str, Any]) -> SubmitAnswer:
        body = _json_or_none(text)
        asynchronous = bool(payload.get("asynchronous"))
        if status == 202:
            problem = (token_problem(body) if asynchronous
                       else "a sync request was answered 202 (not documented)")
            if problem is not None:
                # The server accepted something: a run may exist, so this is ambiguous.
                self.stats.ambiguous_submits += 1
                raise AmbiguousSubmitError(self._malformed("POST /case", 202, problem, text),
                                           http_status=202, kind="malformed_response")
            return SubmitAnswer(token=str(body["retrieve_token"]))
        if status == 200:
            problem = (
                "an asynchronous request was answered 200 instead of 202 with a retrieve_token"
                if asynchronous else self._result_problem(body, text, payload["analyse_type"]))
            if problem is not None:
                raise TransientError(self._malformed("POST /case", 200, problem, text),
                                     http_status=200, kind="malformed_response")
            return SubmitAnswer(result=body)
        text = self._scrub(text)  # an error message may echo the key: keep it out of outputs
        body = _json_or_none(text)
        if status in (401, 403):
            raise AuthError(
                f"the API refused the key (HTTP {status}: {_detail(body, text)}). "
                "Check --api-key / BULK_ENGINE_API_KEY and --base-url.",
                http_status=status,
            )
        _refuse_redirect(status)
        self._throttle_bookkeeping(status, retry_after)
        if status == 408:
            # The server gave up reading or answering: a run may or may not exist.
            self.stats.ambiguous_submits += 1
            raise AmbiguousSubmitError(f"POST /case answered 408: {_detail(body, text)}",
                                       http_status=408, kind="timeout")
        if status in TRANSIENT_4XX or status == 429 or status >= 500:
            raise TransientError(
                f"POST /case answered {status}: {_detail(body, text)}",
                http_status=status, retry_after=retry_after,
                kind="rate_limited" if status == 429 else "server_error",
            )
        raise PermanentError(
            f"POST /case answered {status}: {_detail(body, text)}",
            http_status=status, kind="rejected",
        )

    async def retrieve_once(self, token: str, analyse_type: Sequence[str]) -> RetrieveAnswer:
        """One POST /case/retrieve. 200/202/401/404/500 are answers; the rest raise.

        A 200 must hold exactly the ``analyse_type`` keys the submission asked for, a 202 must
        be an object: anything else is a ``malformed_response`` (retried, never a result).
        """
        assert self._session is not None, "use CaseClient as an async context manager"
        await self._limiter.acquire(PRIORITY_POLL)
        self.stats.calls += 1
        self.stats.polls += 1
        timeout = aiohttp.ClientTimeout(
            total=self._settings.poll_timeout, sock_connect=self._settings.connect_timeout
        )
        status, retry_after, text = await self._exchange(
            "/case/retrieve", "retrieve", ambiguous=False,
            json={"retrieve_token": token}, headers=self._headers(), timeout=timeout,
        )
        body = _json_or_none(text)
        if status in (200, 202):
            problem = (self._result_problem(body, text, analyse_type) if status == 200
                       else processing_problem(body))
            if problem is not None:
                raise TransientError(self._malformed("retrieve", status, problem, text),
                                     http_status=status, kind="malformed_response")
            return RetrieveAnswer(status, body)
        text = self._scrub(text)  # an error message may echo the key: keep it out of outputs
        body = _json_or_none(text)
        if status in (401, 404, 500):
            return RetrieveAnswer(status, body, _detail(body, text))
        _refuse_redirect(status)
        if status == 403:
            raise AuthError(
                "the API says a retrieve token belongs to another key (HTTP 403): the journal "
                "was written with a different API key. Use the same key, or another --output.",
                http_status=403,
            )
        self._throttle_bookkeeping(status, retry_after)
        if status == 429 or status >= 500:
            raise TransientError(
                f"retrieve answered {status}: {_detail(body, text)}",
                http_status=status, retry_after=retry_after,
                kind="rate_limited" if status == 429 else "server_error",
            )
        raise PermanentError(f"retrieve answered {status}: {_detail(body, text)}",
                             http_status=status, kind="rejected")

    async def _exchange(
        self, path: str, what: str, *, ambiguous: bool, **kwargs: Any
    ) -> tuple[int, float | None, str]:
        """One POST: (status, Retry-After seconds, body text). aiohttp errors end here."""
        assert self._session is not None, "use CaseClient as an async context manager"
        answered = False
        try:
            async with self._session.post(
                self._base + path,
                allow_redirects=False,  # a redirect would carry the api-key header along
                **kwargs,
            ) as resp:
                answered = True
                self.stats.answers[what, str(resp.status)] += 1
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                return resp.status, retry_after, await resp.text(errors="replace")
        except BulkEngineError as exc:  # an S3 object of the body, if aiohttp did not wrap it
            raise (_upload_source_error(exc) or exc) from None
        except aiohttp.ClientConnectorCertificateError as exc:
            self.stats.answers[what, "error"] += 1
            raise self._tls_error(exc) from None
        except aiohttp.ClientConnectorError as exc:
            self.stats.answers[what, "error"] += 1
            raise self._transport_error("connect", exc) from None  # nothing reached the server
        except (TimeoutError, aiohttp.ClientError) as exc:
            source_error = _upload_source_error(exc)
            if source_error is not None:  # an S3 object failed the body: the API saw no request
                raise source_error from None
            if not answered:  # else counted under its status, then cut short
                self.stats.answers[what, "error"] += 1
            if ambiguous:  # the body may have reached the server: a run may exist
                self.stats.ambiguous_submits += 1
            raise self._transport_error(what, exc, ambiguous=ambiguous) from None

    def _throttle_bookkeeping(self, status: int, retry_after: float | None) -> None:
        if status == 429:
            self.stats.throttled += 1
            self._limiter.on_throttled()
        elif status == 503:
            self.stats.unavailable += 1
        if status in (429, 503) and retry_after is not None:
            before = self._limiter.paused_until
            self._limiter.pause_for(retry_after)
            if self._limiter.paused_until > before + 0.5:  # a new or longer pause: say so once
                log.info("paused_by_server", http_status=status, seconds=round(retry_after, 1),
                         hint="Retry-After: every call waits")

    def _scrub(self, text: str) -> str:
        """The key removed and retrieve tokens cut short: safe for messages and outputs."""
        return self._redactor.redact_text(text)

    def _result_problem(self, body: Any, text: str, analyse_type: Sequence[str]) -> str | None:
        if body is None and text.strip() != "null":
            return "the body is not JSON"
        return result_problem(body, analyse_type)

    def _malformed(self, what: str, status: int, problem: str, text: str) -> str:
        return (f"{what} answered {status} with something that is not the documented answer: "
                f"{problem}; body starts {snippet(self._scrub(text))}")

    def _tls_error(self, exc: aiohttp.ClientConnectorCertificateError) -> FatalRunError:
        # Fatal, not transient: every call would fail the same way, and retrying each row for
        # minutes hides a configuration problem (private CA, wrong host).
        cert_err = exc.certificate_error
        reason = getattr(cert_err, "verify_message", None) or type(cert_err).__name__
        return FatalRunError(
            f"TLS certificate verification failed for {exc.host} ({reason}). If the API uses "
            "a private CA, pass its PEM file with --ca-bundle; check --base-url."
        )

    def _transport_error(
        self, what: str, exc: BaseException, *, ambiguous: bool = False
    ) -> TransientError:
        self.stats.transport_errors += 1
        # Only the exception's class and OS error text: never repr(exc), which can carry headers.
        detail = type(exc).__name__
        if isinstance(exc, OSError) and exc.strerror:
            detail += f": {exc.strerror}"
        elif isinstance(exc, asyncio.TimeoutError):
            detail = "timed out"
        cls = AmbiguousSubmitError if ambiguous else TransientError
        return cls(f"{what} failed ({detail})", kind="timeout" if "timed out" in detail
                   else "ambiguous_submit" if ambiguous else "network")

    # --- retries -------------------------------------------------------------------------------

    async def call_with_retries(
        self,
        op: Callable[[], Awaitable[_T]],
        *,
        endpoint: str,
        source: str | None = None,
        on_retry: Callable[[ApiError], None] | None = None,
    ) -> _T:
        """Run ``op`` again on TransientError with full-jitter backoff, up to max_retries times.

        Every outcome is reported to ``health`` for ``endpoint`` (``submit`` or ``retrieve``)
        and ``source`` (the row): a 429 or any documented answer is a success (the API
        answered), other transient errors are failures. A ``Retry-After`` already paused the
        shared limiter for everyone; the backoff sleep here only spreads this caller's next
        attempt. A timed-out call is logged at
        warning: it already cost its whole timeout.
        """
        s = self._settings
        budget = RetryBudget(s.max_retries, s.retry_base, s.retry_cap, self._rng)
        while True:
            try:
                result = await op()
            except TransientError as exc:
                if exc.kind == "rate_limited":
                    self.health.record_success(endpoint)
                else:
                    self.health.record_failure(endpoint, exc.kind, source, exc.message)
                delay = budget.next_delay()
                if exc.kind == "timeout":
                    log.warning("call_timed_out", endpoint=endpoint, attempt=budget.retries,
                                retries_left=s.max_retries - budget.retries
                                if delay is not None else 0)
                if delay is None:
                    raise
                if on_retry is not None:
                    on_retry(exc)
                self.stats.retries += 1
                await self._clock.sleep(delay)
                continue
            except ApiError:
                self.health.record_success(endpoint)  # a permanent answer is still an answer
                raise
            self.health.record_success(endpoint)
            self._limiter.on_success()
            return result


def _upload_source_error(exc: BaseException) -> BulkEngineError | None:
    """What an S3 object of the body raised, if that is why the request failed (in the
    engine's terms: ``s3.access.engine_error``); None for any other failure."""
    found: BulkEngineError | None
    if isinstance(exc, BulkEngineError):
        found = exc
    else:
        from bulk_engine.s3.payload import body_error

        found = body_error(exc)
    if found is None:
        return None
    from bulk_engine.s3.access import engine_error

    return engine_error(found)


async def _read_small_folder(job: Job) -> list[bytes] | None:
    """Every file of a small folder, read in one worker-thread call; None if the folder grew
    past ``SMALL_FOLDER_BYTES`` since it was listed (it is streamed instead)."""

    def read() -> list[bytes] | None:
        out: list[bytes] = []
        left = SMALL_FOLDER_BYTES
        for f in job.files:
            assert isinstance(f, FileEntry), "a folder on disk"
            with _open_regular(f.path) as fh:
                data = fh.read(left + 1)
            left -= len(data)
            if left < 0:
                return None
            out.append(data)
        return out

    try:
        return await asyncio.to_thread(read)
    except OSError as exc:
        raise PermanentError(
            f"cannot read a file of the folder: {exc.strerror or exc}", kind="file_unreadable"
        ) from None


def _open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a listed file for reading without ever blocking on a FIFO or device.

    Between listing and upload a file may have been swapped for a FIFO (opening one blocks until
    a writer comes) or a symlink: open non-blocking, without following links (listed paths are
    already resolved), and refuse anything that is not a regular file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "no longer a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _refuse_redirect(status: int) -> None:
    """A 3xx is a configuration problem; following it would send the key to another place."""
    if 300 <= status < 400:
        raise FatalRunError(
            f"the API answered a redirect (HTTP {status}); redirects are not followed, so the "
            "key is never sent elsewhere. Set --base-url to the API's final address."
        )


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, TypeError):
        return None


def _detail(body: Any, text: str) -> str:
    """The server's own message: `detail` of a JSON error body, else the text (cut short)."""
    if isinstance(body, dict):
        for key in ("detail", "message", "error"):
            if key in body:
                val = body[key]
                return val if isinstance(val, str) else json.dumps(val)[:300]
    return (text or "no body").strip()[:300]
