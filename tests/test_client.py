"""The client's status mapping, one exchange at a time, against aioresponses (no server).

Every row of the error-policy table (README; docs/architecture.md) that the client decides
(POST /case and retrieve),
``Retry-After`` into the shared limiter's pause, 429 into its AIMD decrease, the retry budget of
``call_with_retries``, and the rule that no exception text ever carries the key or headers.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
from collections.abc import AsyncIterator
from email.utils import formatdate
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from bulk_engine.client import CaseClient, multipart_filename
from bulk_engine.config import Settings
from bulk_engine.errors import (
    AmbiguousSubmitError,
    ApiError,
    AuthError,
    BulkEngineError,
    FatalRunError,
    PermanentError,
    TransientError,
)
from bulk_engine.models import FileEntry, Job
from bulk_engine.ratelimit import RateLimiter

pytestmark = pytest.mark.timeout(10)

KEY = "CANARY-KEY-client-7d1e"
BASE = "http://api.test"
CASE = BASE + "/case"
RETRIEVE = BASE + "/case/retrieve"
TOKEN = "gAAAAABtoken-0123456789abcdef"
HEADER_RE = re.compile(r"api-key['\"]?\s*[:=]|<CIMultiDict", re.IGNORECASE)


class InstantClock:
    """Real ``now``; ``sleep`` returns at once and records the delay (backoff assertions)."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await asyncio.sleep(0)


@pytest.fixture
def job(tmp_path: Path) -> Job:
    p = tmp_path / "payslip.pdf"
    p.write_bytes(b"%PDF-1.4 test\n")
    st = p.stat()
    return Job(line=2, id="row-1", folder="f", path=tmp_path,
               files=(FileEntry(p, p.name, st.st_size, st.st_mtime_ns),), fingerprint="fp")


@pytest.fixture
def clock() -> InstantClock:
    return InstantClock()


@pytest.fixture
def limiter(clock: InstantClock) -> RateLimiter:
    return RateLimiter(1000.0, 100, clock=clock)


@pytest.fixture
async def client(limiter: RateLimiter, clock: InstantClock) -> AsyncIterator[CaseClient]:
    settings = Settings(base_url=BASE, api_key=KEY, max_retries=3, retry_base=0.5, retry_cap=4.0)
    async with CaseClient(settings, limiter=limiter, clock=clock, rng=random.Random(7)) as c:
        yield c


class _Response(aiohttp.ClientResponse):
    """aioresponses 0.7.9 predates aiohttp 3.14's ``stream_writer`` argument: supply one."""

    def __init__(self, method: str, url: URL, **kw: Any) -> None:
        kw.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(method, url, **kw)


class _Mock(aioresponses):
    def add(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        kwargs.setdefault("response_class", _Response)
        super().add(*args, **kwargs)


@pytest.fixture
def mock() -> Any:
    with _Mock() as m:
        yield m


def assert_clean(exc: BaseException) -> None:
    """Neither str nor repr of an error carries the key or a rendered header."""
    for text in (str(exc), repr(exc), getattr(exc, "message", "")):
        assert KEY not in text
        assert not HEADER_RE.search(text), text


DECISION = ("decision",)
ASYNC_PAYLOAD = {"analyse_type": ["decision"], "use_case": "rental", "asynchronous": True}
SYNC_PAYLOAD = {**ASYNC_PAYLOAD, "asynchronous": False}


async def submit(client: CaseClient, job: Job) -> Any:
    return await client.submit_once(job, payload=ASYNC_PAYLOAD, idem_key="be-idem")


# ---- POST /case --------------------------------------------------------------------------


async def test_submit_202_gives_the_token_and_sends_key_and_idempotency_key(
    client: CaseClient, job: Job, mock: Any
) -> None:
    """202 → the retrieve token; the request carries api-key and Idempotency-Key headers."""
    mock.post(CASE, status=202, payload={"retrieve_token": TOKEN})
    answer = await submit(client, job)
    assert answer.token == TOKEN and answer.result is None
    (call,) = mock.requests[("POST", URL(CASE))]
    assert call.kwargs["headers"]["api-key"] == KEY
    assert call.kwargs["headers"]["Idempotency-Key"] == "be-idem"
    assert client.stats.submits == 1 and client.stats.bytes_uploaded == job.total_bytes


async def test_submit_202_without_token_is_ambiguous(client: CaseClient, job: Job,
                                                     mock: Any) -> None:
    """A 202 whose body has no token may still have created a run: AmbiguousSubmitError."""
    mock.post(CASE, status=202, body="<html>accepted</html>", content_type="text/html")
    with pytest.raises(AmbiguousSubmitError) as ei:
        await submit(client, job)
    assert ei.value.kind == "malformed_response" and ei.value.http_status == 202
    assert client.stats.ambiguous_submits == 1


async def test_submit_200_sync_gives_the_result(client: CaseClient, job: Job, mock: Any) -> None:
    """200 (sync mode) → the result body verbatim."""
    body = {"decision": {"status": "approved"}, "run_id": "r1"}
    mock.post(CASE, status=200, payload=body)
    answer = await client.submit_once(job, payload=SYNC_PAYLOAD, idem_key=None)
    assert answer.result == body and answer.token is None


async def test_submit_200_not_json_is_transient(client: CaseClient, job: Job, mock: Any) -> None:
    """A sync 200 with an unreadable body is retried (malformed_response), not a result."""
    mock.post(CASE, status=200, body="{trunc", content_type="application/json")
    with pytest.raises(TransientError) as ei:
        await submit(client, job)
    assert ei.value.kind == "malformed_response"


@pytest.mark.parametrize("status", [401, 403])
async def test_submit_bad_key_is_fatal(client: CaseClient, job: Job, mock: Any,
                                       status: int) -> None:
    """401/403 on POST /case: AuthError (fatal for the run), message names the fix, not the key."""
    mock.post(CASE, status=status, payload={"detail": "invalid api-key"})
    with pytest.raises(AuthError) as ei:
        await submit(client, job)
    assert isinstance(ei.value, FatalRunError) and ei.value.http_status == status
    assert "BULK_ENGINE_API_KEY" in str(ei.value)
    assert_clean(ei.value)


@pytest.mark.parametrize("status", [400, 404, 413, 415, 422])
async def test_submit_other_4xx_is_permanent_with_the_server_message(
    client: CaseClient, job: Job, mock: Any, status: int
) -> None:
    """Other 4xx on POST /case: PermanentError kind rejected with the server's detail."""
    mock.post(CASE, status=status, payload={"detail": f"nope {status}"})
    with pytest.raises(PermanentError) as ei:
        await submit(client, job)
    assert (ei.value.kind, ei.value.http_status) == ("rejected", status)
    assert f"nope {status}" in ei.value.message
    assert_clean(ei.value)


@pytest.mark.parametrize("status", [409, 425])
async def test_submit_409_and_425_are_transient(
    client: CaseClient, job: Job, mock: Any, status: int
) -> None:
    """409 (same Idempotency-Key still in flight) and 425 on POST /case are worth a retry."""
    mock.post(CASE, status=status, payload={"detail": "busy"})
    with pytest.raises(TransientError) as ei:
        await submit(client, job)
    assert ei.value.http_status == status
    assert not isinstance(ei.value, AmbiguousSubmitError)


async def test_submit_408_is_an_ambiguous_submit(client: CaseClient, job: Job, mock: Any) -> None:
    """408 on POST /case: the server gave up mid-exchange, a run may exist: ambiguous, retried."""
    mock.post(CASE, status=408, payload={"detail": "slow"})
    with pytest.raises(AmbiguousSubmitError) as ei:
        await submit(client, job)
    assert ei.value.http_status == 408
    assert client.stats.ambiguous_submits == 1


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_submit_5xx_is_transient(client: CaseClient, job: Job, mock: Any,
                                       status: int) -> None:
    """5xx on POST /case: TransientError kind server_error (retried under policy)."""
    mock.post(CASE, status=status, body="upstream broke", content_type="text/plain")
    with pytest.raises(TransientError) as ei:
        await submit(client, job)
    assert (ei.value.kind, ei.value.http_status) == ("server_error", status)
    assert "upstream broke" in ei.value.message
    assert not isinstance(ei.value, AmbiguousSubmitError)


async def test_submit_429_halves_the_rate_and_pauses_everyone(
    client: CaseClient, job: Job, mock: Any, limiter: RateLimiter, clock: InstantClock
) -> None:
    """429 + Retry-After: on_throttled (AIMD halves) and pause_for(Retry-After) on the limiter."""
    mock.post(CASE, status=429, payload={"detail": "slow down"}, headers={"Retry-After": "2"})
    before = clock.now()
    with pytest.raises(TransientError) as ei:
        await submit(client, job)
    assert (ei.value.kind, ei.value.http_status, ei.value.retry_after) == ("rate_limited", 429, 2.0)
    assert limiter.throttled_events == 1 and limiter.current_rate == pytest.approx(500.0)
    assert limiter.paused_until == pytest.approx(before + 2.0, abs=0.5)
    assert limiter.paused_seconds_total == pytest.approx(2.0, abs=0.5)
    assert client.stats.throttled == 1


async def test_429_without_retry_after_still_slows_down(
    client: CaseClient, job: Job, mock: Any, limiter: RateLimiter
) -> None:
    """A gateway 429 without Retry-After (nginx): AIMD decrease, no pause."""
    mock.post(CASE, status=429, body="<html>429</html>", content_type="text/html")
    with pytest.raises(TransientError):
        await submit(client, job)
    assert limiter.rate_decreases == 1 and limiter.paused_seconds_total == 0.0


async def test_503_retry_after_http_date_pauses_without_halving(
    client: CaseClient, job: Job, mock: Any, limiter: RateLimiter
) -> None:
    """503 with an HTTP-date Retry-After: global pause of about that long, rate unchanged."""
    mock.post(CASE, status=503, payload={"detail": "maintenance"},
              headers={"Retry-After": formatdate(time.time() + 5, usegmt=True)})
    with pytest.raises(TransientError) as ei:
        await submit(client, job)
    assert ei.value.retry_after == pytest.approx(5.0, abs=1.5)
    assert limiter.paused_seconds_total == pytest.approx(5.0, abs=1.5)
    assert limiter.throttled_events == 0 and limiter.current_rate == 1000.0
    assert client.stats.unavailable == 1


async def test_unreadable_retry_after_is_ignored(
    client: CaseClient, job: Job, mock: Any, limiter: RateLimiter
) -> None:
    """A garbage Retry-After is no pause (and no crash)."""
    mock.post(CASE, status=503, payload={}, headers={"Retry-After": "soon-ish"})
    with pytest.raises(TransientError) as ei:
        await submit(client, job)
    assert ei.value.retry_after is None and limiter.paused_seconds_total == 0.0


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (aiohttp.ServerDisconnectedError(), "ambiguous_submit"),
        (aiohttp.ClientOSError(104, "Connection reset by peer"), "ambiguous_submit"),
        (aiohttp.ClientPayloadError("Response payload is not completed"), "ambiguous_submit"),
        (TimeoutError(), "timeout"),
        (aiohttp.ServerTimeoutError("Timeout on reading data from socket"), "timeout"),
    ],
)
async def test_submit_lost_answer_is_ambiguous(
    client: CaseClient, job: Job, mock: Any, exc: Exception, kind: str
) -> None:
    """A reset, disconnect or timeout on POST /case: AmbiguousSubmitError (a run may exist)."""
    mock.post(CASE, exception=exc)
    with pytest.raises(AmbiguousSubmitError) as ei:
        await submit(client, job)
    assert ei.value.kind == kind and client.stats.ambiguous_submits == 1
    assert client.stats.transport_errors == 1
    assert_clean(ei.value)


async def test_connect_error_is_transient_not_ambiguous(
    client: CaseClient, job: Job, mock: Any
) -> None:
    """Connection refused before anything was sent: plain TransientError kind network."""
    key = aiohttp.client_reqrep.ConnectionKey("api.test", 80, False, True, None, None, None)
    mock.post(CASE, exception=aiohttp.ClientConnectorError(key, OSError(111, "refused")))
    with pytest.raises(TransientError) as ei:
        await submit(client, job)
    assert not isinstance(ei.value, AmbiguousSubmitError)
    assert ei.value.kind == "network" and client.stats.ambiguous_submits == 0


async def test_client_response_error_with_headers_never_leaks(
    client: CaseClient, job: Job, mock: Any
) -> None:
    """aiohttp's ClientResponseError can carry request headers (aiohttp #8402): ours does not."""
    headers = CIMultiDictProxy(CIMultiDict({"api-key": KEY}))
    info = aiohttp.RequestInfo(URL(CASE), "POST", headers, URL(CASE))
    raw = aiohttp.ClientResponseError(info, (), status=400, message="bad", headers=headers)
    assert KEY in repr(raw) or KEY in repr(raw.request_info)  # the hazard is real
    mock.post(CASE, exception=raw)
    with pytest.raises(ApiError) as ei:
        await submit(client, job)
    assert_clean(ei.value)
    assert ei.value.__cause__ is None and ei.value.__suppress_context__


async def test_unreadable_file_is_permanent(client: CaseClient, job: Job, mock: Any) -> None:
    """A file that vanished between listing and upload fails the row, no request sent."""
    job.files[0].path.unlink()
    with pytest.raises(PermanentError) as ei:
        await submit(client, job)
    assert ei.value.kind == "file_unreadable"
    assert not mock.requests


# ---- POST /case/retrieve ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body"),
    [(200, {"decision": {"status": "approved"}}), (202, {"status": "processing", "run_id": "r9"})],
)
async def test_retrieve_200_and_202_are_answers(
    client: CaseClient, mock: Any, status: int, body: dict[str, Any]
) -> None:
    """200 (result) and 202 (reschedule) come back as answers, the body verbatim."""
    mock.post(RETRIEVE, status=status, payload=body)
    answer = await client.retrieve_once(TOKEN, DECISION)
    assert (answer.status, answer.body) == (status, body)
    (call,) = mock.requests[("POST", URL(RETRIEVE))]
    assert call.kwargs["json"] == {"retrieve_token": TOKEN}
    assert call.kwargs["headers"]["api-key"] == KEY


async def test_retrieve_202_run_id(client: CaseClient, mock: Any) -> None:
    """The run_id of a 202 is readable from the answer."""
    mock.post(RETRIEVE, status=202, payload={"status": "processing", "run_id": "r9"})
    assert (await client.retrieve_once(TOKEN, DECISION)).run_id == "r9"


@pytest.mark.parametrize("status", [401, 404, 500])
async def test_retrieve_401_404_500_are_answers_for_the_engine(
    client: CaseClient, mock: Any, status: int
) -> None:
    """401 (token invalid), 404 (expired), 500 (folder failed): answers with the message."""
    mock.post(RETRIEVE, status=status, payload={"detail": f"said {status}"})
    answer = await client.retrieve_once(TOKEN, DECISION)
    assert answer.status == status and answer.message == f"said {status}"


async def test_retrieve_403_is_fatal(client: CaseClient, mock: Any) -> None:
    """403 on retrieve: the token belongs to another key, a configuration error: AuthError."""
    mock.post(RETRIEVE, status=403, payload={"detail": "another user"})
    with pytest.raises(AuthError) as ei:
        await client.retrieve_once(TOKEN, DECISION)
    assert ei.value.http_status == 403
    assert_clean(ei.value)


@pytest.mark.parametrize(
    ("status", "kind"), [(429, "rate_limited"), (502, "server_error"), (503, "server_error")]
)
async def test_retrieve_throttle_and_5xx_are_transient(
    client: CaseClient, mock: Any, limiter: RateLimiter, status: int, kind: str
) -> None:
    """429 and 5xx other than 500 on retrieve are retried; 429/503 honour Retry-After globally."""
    mock.post(RETRIEVE, status=status, payload={"detail": "busy"}, headers={"Retry-After": "1"})
    with pytest.raises(TransientError) as ei:
        await client.retrieve_once(TOKEN, DECISION)
    assert (ei.value.kind, ei.value.http_status) == (kind, status)
    paused = 1.0 if status in (429, 503) else 0.0
    assert limiter.paused_seconds_total == pytest.approx(paused, abs=0.3)
    assert limiter.throttled_events == (1 if status == 429 else 0)


@pytest.mark.parametrize("status", [200, 202])
async def test_retrieve_malformed_json_is_transient(client: CaseClient, mock: Any,
                                                    status: int) -> None:
    """A 200/202 whose body is not JSON is retried, never stored as a result."""
    mock.post(RETRIEVE, status=status, body='{"decision": "appr', content_type="application/json")
    with pytest.raises(TransientError) as ei:
        await client.retrieve_once(TOKEN, DECISION)
    assert ei.value.kind == "malformed_response"


async def test_retrieve_other_4xx_is_permanent(client: CaseClient, mock: Any) -> None:
    """A 4xx outside the documented table on retrieve: PermanentError (the row fails)."""
    mock.post(RETRIEVE, status=400, payload={"detail": "bad body"})
    with pytest.raises(PermanentError) as ei:
        await client.retrieve_once(TOKEN, DECISION)
    assert ei.value.kind == "rejected" and "bad body" in ei.value.message


async def test_retrieve_transport_error_is_transient_not_ambiguous(
    client: CaseClient, mock: Any
) -> None:
    """A reset on retrieve is a plain retryable error: polling creates nothing."""
    mock.post(RETRIEVE, exception=aiohttp.ServerDisconnectedError())
    with pytest.raises(TransientError) as ei:
        await client.retrieve_once(TOKEN, DECISION)
    assert not isinstance(ei.value, AmbiguousSubmitError)
    assert client.stats.ambiguous_submits == 0
    assert_clean(ei.value)


# ---- retries ---------------------------------------------------------------------------------


async def test_retries_stay_within_budget_with_growing_jitter(
    client: CaseClient, mock: Any, clock: InstantClock
) -> None:
    """Always 502: exactly 1 + max_retries calls, each sleep within its full-jitter ceiling."""
    mock.post(RETRIEVE, status=502, payload={}, repeat=True)
    retried: list[ApiError] = []
    with pytest.raises(TransientError):
        await client.call_with_retries(lambda: client.retrieve_once(TOKEN, DECISION),
                                       endpoint="retrieve", on_retry=retried.append)
    assert len(mock.requests[("POST", URL(RETRIEVE))]) == 4
    assert client.stats.retries == 3 and len(retried) == 3
    assert len(clock.sleeps) == 3
    for attempt, delay in enumerate(clock.sleeps):
        assert 0.0 <= delay <= min(4.0, 0.5 * 2**attempt)


async def test_retry_then_success(client: CaseClient, mock: Any, limiter: RateLimiter) -> None:
    """Two transient failures, then a 200: the answer, two retries, the limiter told of success."""
    mock.post(RETRIEVE, status=503, payload={})
    mock.post(RETRIEVE, exception=aiohttp.ServerDisconnectedError())
    mock.post(RETRIEVE, status=200, payload={"decision": {"status": "approved"}})
    answer = await client.call_with_retries(lambda: client.retrieve_once(TOKEN, DECISION),
                                            endpoint="retrieve")
    assert answer.status == 200 and client.stats.retries == 2


@pytest.mark.parametrize(("status", "exc_type"), [(400, PermanentError), (401, AuthError)])
async def test_no_retry_on_permanent_or_fatal(
    client: CaseClient, job: Job, mock: Any, status: int, exc_type: type[Exception]
) -> None:
    """Permanent and fatal answers are not retried: one request only."""
    mock.post(CASE, status=status, payload={"detail": "no"}, repeat=True)
    with pytest.raises(exc_type):
        await client.call_with_retries(lambda: submit(client, job), endpoint="submit")
    assert len(mock.requests[("POST", URL(CASE))]) == 1 and client.stats.retries == 0


def test_multipart_filename_keeps_utf8_and_percent_encodes_undecodable_bytes() -> None:
    """NFD stays NFD; an undecodable byte is written %XX (no longer U+FFFD, which let two names
    collide), and so are quotes, backslashes and line breaks."""
    nfd = "cafe\u0301.pdf"
    assert multipart_filename(nfd) == nfd
    assert multipart_filename("caf\udce9.pdf") == "caf%E9.pdf"
    assert multipart_filename('a"b\\c\r\n.pdf') == "a%22b%5Cc%0D%0A.pdf"
    assert multipart_filename("100%.pdf") == "100%.pdf"  # a lone % stays as it is
    assert multipart_filename("a%22b.pdf") == "a%2522b.pdf"  # never read as an escape


def _percent_decode(sent: str) -> bytes:
    """The inverse of multipart_filename: every %XX back to its byte."""
    return re.sub(rb"%([0-9A-Fa-f]{2})", lambda m: bytes([int(m.group(1), 16)]),
                  sent.encode("utf-8"))


@given(st.binary(min_size=1, max_size=40).filter(lambda b: b"/" not in b and b"\0" not in b))
def test_multipart_filename_is_collision_free(raw: bytes) -> None:
    """Any on-disk name (any bytes) is sent as text whose %-decoding gives the name back: two
    different names never travel as the same filename, and nothing breaks the header."""
    name = os.fsdecode(raw)
    sent = multipart_filename(name)
    assert _percent_decode(sent) == raw
    assert not any(c in sent for c in '"\\\r\n')


@pytest.mark.parametrize("status", [400, 401, 422, 502])
async def test_a_server_message_echoing_the_key_is_scrubbed(
    client: CaseClient, job: Job, mock: Any, status: int
) -> None:
    """An error body that echoes the key never carries it into our messages (nor the output)."""
    mock.post(CASE, status=status, payload={"detail": f"bad request for key {KEY}"})
    with pytest.raises(BulkEngineError) as ei:
        await submit(client, job)
    assert_clean(ei.value)
    assert "[REDACTED]" in str(ei.value)


@pytest.mark.parametrize("status", [401, 404, 500])
async def test_a_retrieve_message_echoing_the_key_is_scrubbed(
    client: CaseClient, mock: Any, status: int
) -> None:
    """retrieve 401/404/500 messages end up in `failed` lines: scrubbed of the key."""
    mock.post(RETRIEVE, status=status, body=f"no run for {KEY}", content_type="text/plain")
    answer = await client.retrieve_once(TOKEN, DECISION)
    assert KEY not in answer.message and "[REDACTED]" in answer.message
