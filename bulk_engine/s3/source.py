"""Reading folders from an S3-compatible store: list, walk, and stream objects with retries.

Where it sits: the producer lists each ``s3://`` folder (``list_folder``) or walks ``--root
s3://...`` (``iter_leaf_prefixes``); the submitters stream each object into the multipart
``POST /case`` (``payload``, or ``read_object`` for small folders). One ``S3Source`` per run,
entered as an async context manager on the run's event loop; the producer's worker thread uses
it through ``blocking()`` (``anyio.from_thread``), so there is one client, one connection pool
and one set of counters.

The client is aiobotocore (botocore's credential chain and request signing on aiohttp, the
stack the API client already uses; see docs/s3.md for the measured comparison). Its own retries
are off: every transient failure (5xx, SlowDown and other throttling, resets, timeouts) is
retried here with ``backoff.full_jitter``, an injected ``random.Random`` and ``Clock``, up to
``max_retries`` times, then raised as ``S3UnavailableError``. An object is read with
``IfMatch=<listed ETag>``: if it changed since its folder was listed, S3 answers 412 and the
read raises ``ManifestError('file_changed')`` before a byte of the new content is sent; a read
cut mid-body resumes from where it stopped with a ``Range`` request under the same ``IfMatch``.

When a call's retries are spent, ``S3UnavailableError.isolated`` tells whether the store went on
answering other calls meanwhile: calls **sent after this one first failed** (a LIST page, a
whole object read, or a definite refusal such as AccessDenied counts; this call's own partial
reads do not, nor does a read sent before the trouble began that happens to finish during it):
the engine fails just that row when it did, and stops the run when the store answered nothing
(``S3Access``).
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio.from_thread
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession

from bulk_engine.backoff import full_jitter
from bulk_engine.clock import Clock, MonotonicClock
from bulk_engine.errors import BulkEngineError, ConfigError, ManifestError
from bulk_engine.logs import get_logger
from bulk_engine.s3.errors import Fault, S3UnavailableError, endpoint_shown, fault_of, to_error
from bulk_engine.s3.listing import (
    FolderListing,
    LeafCounter,
    LeafWalk,
    ListPage,
    ListRequest,
    RawObject,
    S3Entry,
    S3Leaf,
    mtime_ns,
)
from bulk_engine.s3.url import S3Url, parse_s3_url

__all__ = ["BlockingS3Source", "S3Options", "S3Source", "S3Stats"]

_T = TypeVar("_T")
log = get_logger()


@dataclass(frozen=True, kw_only=True, slots=True)
class S3Options:
    """How to reach the store. Unset values come from the standard AWS sources.

    ``endpoint_url``: an S3-compatible store (``--s3-endpoint-url``); when None, botocore reads
    ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` / the config file's ``endpoint_url``, else AWS.
    ``profile``: a profile of the AWS config files; when None, ``AWS_PROFILE`` or ``default``.
    ``region``: when None, ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` / the profile's region.
    Credentials are never given here: they come from the chain (environment, shared
    credentials and config files, SSO, assumed roles, container and instance roles).
    """

    endpoint_url: str | None = None
    profile: str | None = None
    region: str | None = None
    max_retries: int = 8
    retry_base: float = 0.5
    retry_cap: float = 30.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_connections: int = 32
    page_size: int = 1000
    chunk_size: int = 256 * 1024

    def __post_init__(self) -> None:
        if self.endpoint_url is not None and not self.endpoint_url.startswith(
            ("http://", "https://")
        ):
            raise ConfigError(
                f"--s3-endpoint-url must start with http:// or https://, got "
                f"{endpoint_shown(self.endpoint_url)!r}"
            )
        if self.max_retries < 0:
            raise ConfigError(f"S3 max_retries must be 0 or more, got {self.max_retries}")
        if not 0 < self.retry_base <= self.retry_cap:
            raise ConfigError(
                f"S3 retries need 0 < retry_base <= retry_cap, got {self.retry_base} and "
                f"{self.retry_cap}"
            )
        if not 1 <= self.page_size <= 1000:
            raise ConfigError(f"S3 page_size must be 1 to 1000, got {self.page_size}")
        if self.chunk_size < 1024 or self.max_connections < 1:
            raise ConfigError("S3 chunk_size must be at least 1024 and max_connections 1")
        if self.connect_timeout <= 0 or self.read_timeout <= 0:
            raise ConfigError("S3 timeouts must be positive")


@dataclass(frozen=True, slots=True)
class S3Stats:
    """What one S3Source did (``statistics()``): calls, retries, bytes and changed objects."""

    list_calls: int = 0
    get_calls: int = 0
    retries: int = 0
    bytes_read: int = 0
    changed_objects: int = 0


@dataclass(slots=True)
class _Call:
    """One logical call's retries: how many so far, and the store's answer count when it first
    failed (to tell an isolated failure from an outage)."""

    attempts: int = 0
    sent_at_first_failure: int | None = None  # requests the source had sent by then
    seq: int = 0  # the send number of this call's latest request


class S3Source:
    """One S3 client for the run: folder listings, the ``--root`` walk, object streams.

    Use as ``async with S3Source(S3Options(...)) as s3:``. Entering resolves the credentials
    (``ConfigError`` naming what to set when there are none) and opens the client; leaving
    closes its connections.
    """

    def __init__(
        self,
        options: S3Options | None = None,
        *,
        rng: random.Random | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.options = options or S3Options()
        self._rng = rng or random.Random()
        self._clock = clock or MonotonicClock()
        self._client: Any = None
        self._stack = contextlib.AsyncExitStack()
        self._creds_method: str | None = None
        self._profile: str | None = None
        self._endpoint: str | None = None
        self._counts = {"list_calls": 0, "get_calls": 0, "retries": 0, "bytes_read": 0,
                        "changed_objects": 0}
        self._sent = 0  # requests sent so far (each gets the next number)
        self._answered_seq = 0  # the latest-sent request the store answered in full

    # ---- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> S3Source:
        o = self.options
        try:
            session = AioSession(profile=o.profile)
            self._profile = session.get_config_variable("profile")
            creds = await session.get_credentials()
            if creds is None:
                from botocore.exceptions import NoCredentialsError

                raise NoCredentialsError()
            self._creds_method = getattr(creds, "method", None)
            config = AioConfig(
                retries={"total_max_attempts": 1},  # one retry policy: ours
                connect_timeout=o.connect_timeout,
                read_timeout=o.read_timeout,
                max_pool_connections=o.max_connections,
            )
            creator = session.create_client(
                "s3", endpoint_url=o.endpoint_url, region_name=o.region, config=config
            )
            self._client = await self._stack.enter_async_context(creator)
        except BulkEngineError:
            raise
        except ValueError as exc:  # botocore: "Invalid endpoint: ..."
            raise ConfigError(
                f"the S3 endpoint is not a valid URL ({type(exc).__name__}); fix "
                "--s3-endpoint-url / AWS_ENDPOINT_URL"
            ) from None
        except Exception as exc:
            err = self._error(exc, url="s3://")
            if not isinstance(err, ConfigError):
                err = ConfigError(f"the S3 client cannot be set up ({type(exc).__name__}); "
                                  "check the AWS configuration (AWS_PROFILE, AWS_CONFIG_FILE)")
            raise err from None
        self._endpoint = self._client.meta.endpoint_url
        return self

    async def __aexit__(self, *exc: object) -> None:
        with anyio.CancelScope(shield=True):  # the pool must be closed, even when cancelled
            await self._stack.aclose()
        self._client = None

    def statistics(self) -> S3Stats:
        """The counters so far."""
        return S3Stats(**self._counts)

    @property
    def endpoint(self) -> str | None:
        """The endpoint the client talks to (resolved by botocore), once entered."""
        return self._endpoint

    def blocking(self) -> BlockingS3Source:
        """This source for a worker thread started by ``anyio.to_thread.run_sync``."""
        return BlockingS3Source(self)

    # ---- listing -------------------------------------------------------------------------

    async def list_folder(
        self, url: str | S3Url, *, max_file_size: int | None
    ) -> tuple[S3Entry, ...]:
        """The folder's objects directly under the prefix, sorted by name (see ``listing``).

        Raises ManifestError ``folder_missing``, ``folder_unreadable``, ``folder_empty``,
        ``file_too_large``; ConfigError for a bad URL or credentials; S3UnavailableError once
        retries are spent.
        """
        folder = url if isinstance(url, S3Url) else parse_s3_url(url)
        listing = FolderListing(folder)
        token: str | None = None
        while True:
            page = await self._list_page(folder.bucket, ListRequest(folder.prefix, token))
            listing.add(page)
            token = page.next_token
            if token is None:
                return listing.entries(max_file_size)

    async def iter_leaf_prefixes(
        self, url: str | S3Url, *, max_file_size: int | None = None
    ) -> AsyncIterator[S3Leaf]:
        """Every leaf folder under ``url``, depth first in S3 key order, while pages arrive.

        Each leaf comes with its listing (entries, or the ManifestError of that folder); a
        sub-prefix that cannot be listed comes as a leaf with ``folder_unreadable``. Raises
        ConfigError when ``url`` itself cannot be listed or holds nothing.
        """
        root = url if isinstance(url, S3Url) else parse_s3_url(url)
        walk = LeafWalk(root, max_file_size=max_file_size)
        while True:
            request = walk.next_request()
            for leaf in walk.take_ready():
                yield leaf
            if request is None:
                return
            try:
                page = await self._list_page(root.bucket, request)
            except ManifestError as exc:
                walk.fail(exc)
            else:
                walk.feed(page)

    async def list_page(self, bucket: str, request: ListRequest) -> ListPage:
        """One page of a walk (``LeafWalk.next_request``), for drivers of the walk elsewhere."""
        return await self._list_page(bucket, request)

    async def _list_page(self, bucket: str, request: ListRequest) -> ListPage:
        """One ListObjectsV2 page (delimiter "/"), retried; errors translated."""
        kwargs: dict[str, Any] = {
            "Bucket": bucket, "Prefix": request.prefix, "Delimiter": "/",
            "MaxKeys": self.options.page_size,
        }
        if request.token is not None:
            kwargs["ContinuationToken"] = request.token

        async def call() -> Any:
            self._counts["list_calls"] += 1
            return await self._client.list_objects_v2(**kwargs)

        answer = await self._retrying(call, url=str(S3Url(bucket, request.prefix)),
                                      completes=True)
        objects = tuple(
            RawObject(o["Key"], int(o["Size"]), str(o.get("ETag", "")),
                      mtime_ns(o["LastModified"]))
            for o in answer.get("Contents", ())
        )
        prefixes = tuple(p["Prefix"] for p in answer.get("CommonPrefixes", ()))
        truncated = bool(answer.get("IsTruncated"))
        token = answer.get("NextContinuationToken") if truncated else None
        if truncated and not token:
            raise to_error(  # a store that says "more" without saying where: cannot go on
                RuntimeError("IsTruncated without NextContinuationToken"),
                url=str(S3Url(bucket, request.prefix)),
            )
        return ListPage(objects, prefixes, token)

    async def count_leaf_prefixes(self, url: str | S3Url) -> int:
        """How many leaves ``iter_leaf_prefixes`` would yield, from the flat key listing.

        Listing without a delimiter returns up to ``page_size`` keys a request, whatever the
        folders, so counting a tree of folders of a few files costs about one request per
        few hundred folders, where the walk costs one per folder (``listing.LeafCounter``).
        Raises ConfigError when nothing is stored under ``url`` (as the walk does).
        """
        root = url if isinstance(url, S3Url) else parse_s3_url(url)
        counter = LeafCounter(root)
        token: str | None = None
        while True:
            keys, token = await self._list_keys_page(root, token)
            counter.feed(keys)
            if token is None:
                return counter.finish()

    async def _list_keys_page(self, root: S3Url, token: str | None
                              ) -> tuple[list[str], str | None]:
        """One ListObjectsV2 page of every key under ``root`` (no delimiter), retried."""
        kwargs: dict[str, Any] = {"Bucket": root.bucket, "Prefix": root.prefix,
                                  "MaxKeys": self.options.page_size}
        if token is not None:
            kwargs["ContinuationToken"] = token

        async def call() -> Any:
            self._counts["list_calls"] += 1
            return await self._client.list_objects_v2(**kwargs)

        answer = await self._retrying(call, url=str(root), completes=True)
        keys = [o["Key"] for o in answer.get("Contents", ())]
        more = bool(answer.get("IsTruncated"))
        return keys, (answer.get("NextContinuationToken") or None) if more else None

    # ---- objects -------------------------------------------------------------------------

    def payload(self, entry: S3Entry, **kwargs: Any) -> Any:
        """An aiohttp payload streaming ``entry`` (see ``S3ObjectPayload``)."""
        from bulk_engine.s3.payload import S3ObjectPayload

        return S3ObjectPayload(self, entry, **kwargs)

    async def read_object(self, entry: S3Entry) -> bytes:
        """The whole object in memory (for small folders), checked against the listing."""
        return b"".join([chunk async for chunk in self.iter_object(entry)])

    async def iter_object(self, entry: S3Entry) -> AsyncGenerator[bytes, None]:
        """The object's bytes in chunks of at most ``chunk_size``: exactly the listed object.

        Every call opens a fresh GET with ``IfMatch=entry.etag``. ManifestError
        ``file_changed`` if the object changed (or vanished, or its size differs from the
        listing); a transfer cut mid-body resumes with a Range GET under the same ETag, within
        the retry budget. Memory: one chunk plus aiohttp's read buffer, whatever the size.
        """
        offset = 0
        state = _Call()
        chunk_size = self.options.chunk_size
        while True:
            body = await self._open(entry, offset, state)
            try:
                while offset < entry.size:
                    try:
                        chunk = await body.read(min(chunk_size, entry.size - offset))
                    except Exception as exc:
                        fault, _, _ = fault_of(exc)
                        if fault is not Fault.TRANSIENT or _is_checksum(exc):
                            raise self._error(exc, url=entry.url, one_object=True) from None
                        await self._backoff(state, exc, url=entry.url)
                        break  # reopen from ``offset``
                    if not chunk:  # the server ended the body early
                        await self._backoff(
                            state, ConnectionResetError("body ended early"), url=entry.url)
                        break
                    offset += len(chunk)
                    self._counts["bytes_read"] += len(chunk)
                    yield chunk
                else:
                    self._answered(state)  # the whole object: the store answered this call
                    return
            finally:
                body.close()

    async def _open(self, entry: S3Entry, offset: int, state: _Call) -> Any:
        """GET the object from ``offset`` under IfMatch; the body, its length checked."""
        kwargs: dict[str, Any] = {"Bucket": entry.bucket, "Key": entry.key, "IfMatch": entry.etag}
        if offset:
            kwargs["Range"] = f"bytes={offset}-"

        async def call() -> Any:
            self._counts["get_calls"] += 1
            return await self._client.get_object(**kwargs)

        answer = await self._retrying(call, url=entry.url, one_object=True, state=state)
        length = answer.get("ContentLength")
        if length is not None and int(length) != entry.size - offset:
            answer["Body"].close()
            self._answered(state)
            self._counts["changed_objects"] += 1
            raise ManifestError(
                "file_changed",
                f"object {entry.url} is {int(length) + offset} bytes now, {entry.size} when its "
                "folder was listed; it was not uploaded. Rerun to send the folder as it is now",
            )
        return answer["Body"]

    # ---- retries -------------------------------------------------------------------------

    async def _retrying(
        self,
        call: Callable[[], Awaitable[_T]],
        *,
        url: str,
        one_object: bool = False,
        state: _Call | None = None,
        completes: bool = False,
    ) -> _T:
        """``call()`` until it succeeds; transient faults retried with full jitter.

        ``completes``: a success ends the logical call (a LIST page), so it counts as the
        store answering; an object's GET only counts once its body is read whole.
        """
        state = state if state is not None else _Call()
        while True:
            self._sent += 1
            state.seq = self._sent
            try:
                result = await call()
            except Exception as exc:
                fault, _, _ = fault_of(exc)
                if fault is not Fault.TRANSIENT:
                    self._answered(state)  # a definite answer (AccessDenied, 412...): it is up
                    if fault is Fault.CHANGED:
                        self._counts["changed_objects"] += 1
                    raise self._error(exc, url=url, one_object=one_object) from None
                await self._backoff(state, exc, url=url, one_object=one_object)
                continue
            if completes:
                self._answered(state)
            return result

    def _answered(self, state: _Call) -> None:
        """The store answered ``state``'s latest request in full."""
        self._answered_seq = max(self._answered_seq, state.seq)

    async def _backoff(
        self, state: _Call, exc: BaseException, *, url: str, one_object: bool = True
    ) -> None:
        """Sleep before the next retry of ``state``; raise the translated error when none is
        left (an ``S3UnavailableError`` says whether the store answered others meanwhile)."""
        if state.sent_at_first_failure is None:
            state.sent_at_first_failure = self._sent
        if state.attempts >= self.options.max_retries:
            err = self._error(exc, url=url, one_object=one_object)
            if isinstance(err, S3UnavailableError):
                # Only an answer to a request sent after this call's first failure shows the
                # store up meanwhile: one sent before may finish late, during an outage.
                err.isolated = self._answered_seq > state.sent_at_first_failure
            raise err from None
        _, code, status = fault_of(exc)
        delay = full_jitter(state.attempts, base=self.options.retry_base,
                            cap=self.options.retry_cap, rng=self._rng)
        self._counts["retries"] += 1
        state.attempts += 1
        log.debug("s3_retry", url=url, error=code, http_status=status, attempt=state.attempts,
                  delay_s=round(delay, 3))
        await self._clock.sleep(delay)

    def _error(self, exc: BaseException, *, url: str, one_object: bool = False) -> Exception:
        return to_error(exc, url=url, one_object=one_object, endpoint=self._endpoint
                        or self.options.endpoint_url, creds_method=self._creds_method,
                        profile=self._profile)


def _is_checksum(exc: BaseException) -> bool:
    # A checksum mismatch is only found at the end of the body, after its bytes were sent:
    # resuming cannot repair what was sent, so the whole upload attempt must fail.
    from botocore.exceptions import FlexibleChecksumError

    return isinstance(exc, FlexibleChecksumError)


class BlockingS3Source:
    """``S3Source`` for the producer's worker thread: the same client, called through the loop.

    Valid in a thread started by ``anyio.to_thread.run_sync`` from the event loop that entered
    the source (the engine's producer thread is one). Each call runs on that loop with
    ``anyio.from_thread.run``; the walk fetches one page per call, so the thread streams leaves
    with the same flat memory as the async walk.
    """

    def __init__(self, source: S3Source) -> None:
        self._source = source

    def list_folder(self, url: str | S3Url, *, max_file_size: int | None) -> tuple[S3Entry, ...]:
        """See ``S3Source.list_folder``."""
        return anyio.from_thread.run(
            functools.partial(self._source.list_folder, url, max_file_size=max_file_size)
        )

    def iter_leaf_prefixes(
        self, url: str | S3Url, *, max_file_size: int | None = None
    ) -> Iterator[S3Leaf]:
        """See ``S3Source.iter_leaf_prefixes``."""
        root = url if isinstance(url, S3Url) else parse_s3_url(url)
        walk = LeafWalk(root, max_file_size=max_file_size)
        while True:
            request = walk.next_request()
            yield from walk.take_ready()
            if request is None:
                return
            try:
                page = anyio.from_thread.run(self._source._list_page, root.bucket, request)
            except ManifestError as exc:
                walk.fail(exc)
            else:
                walk.feed(page)

