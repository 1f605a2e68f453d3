"""The run's S3 access: one ``S3Source``, opened on first use, for every stage that meets a bucket.

Where it sits::

    Engine._run_stages ── async with S3Access ── closed (shielded) when the run ends
        ├─ producer's worker thread: S3Folders.list_folder / iter_leaf_prefixes
        │    (each call runs on the event loop through anyio.from_thread)
        ├─ submitters: CaseClient.submit_once → read_small / payload (one fresh GET per attempt)
        └─ first use: aiobotocore imported, credentials resolved (ConfigError: exit 1), and the
           store bound to the journal (the same s3:// URL on another endpoint is other objects)

Nothing is imported, no client is made and no credential is looked up until a row names an
``s3://`` folder, so a run of local folders never needs the ``s3`` extra or AWS settings. The
dry run, which has no event loop of its own, gets the same access through
:func:`blocking_s3` (a loop in a thread, started on first use).

Every S3 failure leaves this module in the engine's terms (one place):

- ``ManifestError`` (``folder_missing``, ``folder_unreadable``, ``folder_empty``,
  ``file_too_large``, ``file_changed``, ``file_unreadable``): the row's `failed` line;
- ``S3UnavailableError`` (the layer spent its retries): when the store went on answering other
  calls meanwhile (``isolated``), only this row is in trouble: a ``ManifestError`` with the
  transport kind (``network``, ``timeout``, ``server_error``), which a plain rerun retries;
  otherwise the store is down: ``StoreUnavailableError`` stops the run with the rows in flight
  unfailed, as an API outage does. A ``--root`` walk cannot skip a prefix it could not list, so
  there every ``S3UnavailableError`` stops the run;
- ``ConfigError`` (credentials, region, TLS, the extra not installed, another store than the
  journal's): fatal, exit 1, with what to fix and never a secret.
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import anyio
import anyio.from_thread

from bulk_engine.clock import Clock
from bulk_engine.errors import BulkEngineError, ConfigError, ManifestError, StoreUnavailableError
from bulk_engine.s3.listing import LeafWalk, ListPage, ListRequest, S3Entry, S3Leaf
from bulk_engine.s3.url import S3Url

if TYPE_CHECKING:
    from aiohttp.payload import Payload

    from bulk_engine.config import Settings
    from bulk_engine.s3.source import S3Source, S3Stats

__all__ = [
    "EXTRA_HINT",
    "STORE_META_KEY",
    "S3Access",
    "S3Folders",
    "bind_store",
    "blocking_s3",
    "check_store",
    "engine_error",
    "s3_options",
    "store_identity",
]

EXTRA_HINT = (
    "s3:// folders need the s3 extra (aiobotocore): pip install 'bulk-engine[s3]'"
)
STORE_META_KEY = "s3_store"  # the journal's record of the store its s3:// rows were read from


def s3_options(settings: Settings) -> dict[str, Any]:
    """``S3Options`` keyword arguments for a run: its endpoint, retry policy and timeouts."""
    return {
        "endpoint_url": settings.s3_endpoint_url,
        "max_retries": settings.max_retries,
        "retry_base": settings.retry_base,
        "retry_cap": settings.retry_cap,
        "connect_timeout": settings.connect_timeout,
        # Every upload may stream several objects at once, and the producer lists meanwhile.
        "max_connections": settings.concurrency * 4 + 4,
    }


def store_identity(endpoint: str | None) -> str:
    """Which store an endpoint is, for the journal: ``aws`` for any AWS endpoint (bucket names
    are global: the region does not change which objects a URL names), else
    ``scheme://host:port`` (never a user or password of the URL)."""
    if not endpoint:
        return "aws"
    parts = urlsplit(endpoint)
    host = (parts.hostname or "").lower()
    if host == "amazonaws.com" or host.endswith((".amazonaws.com", ".amazonaws.com.cn")):
        return "aws"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


class _Meta(Protocol):
    def get_meta(self, key: str) -> str | None: ...

    def set_meta(self, key: str, value: str) -> None: ...


def _other_store(before: str, now: str) -> ConfigError:
    return ConfigError(
        f"the output and its journal hold rows read from the S3 store {before}; this run reads "
        f"from {now} (--s3-endpoint-url / AWS_ENDPOINT_URL / the AWS profile's endpoint_url), "
        "where the same s3:// URLs name other objects. To resume, rerun with the original "
        "endpoint; to start a new run, choose another --output"
    )


def bind_store(journal: _Meta) -> Callable[[str], None]:
    """The hook that binds a journal to the first store its run reads from, and refuses
    another one later (part of the run's identity, like ``journal.settings_fingerprint``)."""

    def on_open(identity: str) -> None:
        before = journal.get_meta(STORE_META_KEY)
        if before is None:
            journal.set_meta(STORE_META_KEY, identity)
        elif before != identity:
            raise _other_store(before, identity)

    return on_open


def check_store(recorded: str | None) -> Callable[[str], None]:
    """The read-only form of :func:`bind_store` (the dry run writes nothing)."""

    def on_open(identity: str) -> None:
        if recorded is not None and recorded != identity:
            raise _other_store(recorded, identity)

    return on_open


def engine_error(exc: BulkEngineError, *, walk: bool = False) -> BulkEngineError:
    """What an error of the S3 layer means for the run (see the module docstring)."""
    from bulk_engine.s3.errors import S3UnavailableError

    if not isinstance(exc, S3UnavailableError):
        return exc  # ManifestError: the row; ConfigError: the run
    if exc.isolated and not walk:
        return ManifestError(
            exc.kind,
            f"{exc.message}; other S3 requests succeeded meanwhile, so only this row failed: "
            "a plain rerun retries it",
        )
    return StoreUnavailableError(
        f"S3 is unavailable: {exc.message}. No other S3 request succeeded meanwhile, so the "
        "run stops rather than failing rows for it: the rows in flight are saved, not failed; "
        "rerun the same command once the store answers"
    )


class S3Access:
    """The run's ``S3Source``, entered on first use, closed with the run.

    Use as ``async with S3Access(...) as s3:``; every method translates the layer's errors
    (:func:`engine_error`). ``on_open(store_identity)`` runs once, on the event loop, when the
    source is opened (the engine binds the journal there; a ConfigError from it is fatal).
    """

    def __init__(
        self,
        options: Mapping[str, Any] | None = None,
        *,
        rng: random.Random | None = None,
        clock: Clock | None = None,
        on_open: Callable[[str], None] | None = None,
    ) -> None:
        self._options = dict(options or {})
        self._rng = rng
        self._clock = clock
        self._on_open = on_open
        self._source: S3Source | None = None
        self._final: S3Stats | None = None  # the counters, once closed
        self._lock: anyio.Lock | None = None
        self._stack = contextlib.AsyncExitStack()

    @classmethod
    def for_settings(cls, settings: Settings, *, rng: random.Random | None = None,
                     clock: Clock | None = None,
                     on_open: Callable[[str], None] | None = None) -> S3Access:
        """The access a run of ``settings`` uses (:func:`s3_options`)."""
        return cls(s3_options(settings), rng=rng, clock=clock, on_open=on_open)

    async def __aenter__(self) -> S3Access:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._source is not None:
            self._final = self._source.statistics()
        with anyio.CancelScope(shield=True):
            await self._stack.aclose()
        self._source = None

    @property
    def opened(self) -> bool:
        """True once a row needed S3 (the source is open)."""
        return self._source is not None

    def statistics(self) -> S3Stats | None:
        """The source's counters (kept once closed), or None when no row needed S3."""
        return self._source.statistics() if self._source is not None else self._final

    async def source(self) -> S3Source:
        """The open source (opened now if needed: ConfigError when it cannot be)."""
        if self._source is not None:
            return self._source
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            if self._source is None:
                try:
                    from bulk_engine.s3.source import S3Options, S3Source
                except ImportError:
                    raise ConfigError(EXTRA_HINT) from None
                source = S3Source(S3Options(**self._options), rng=self._rng, clock=self._clock)
                await self._stack.enter_async_context(source)
                if self._on_open is not None:
                    self._on_open(store_identity(source.endpoint))
                self._source = source
        return self._source

    # ---- listing -------------------------------------------------------------------------

    async def list_folder(self, url: S3Url, *, max_file_size: int) -> tuple[S3Entry, ...]:
        """The folder's objects (``S3Source.list_folder``), errors in the engine's terms."""
        source = await self.source()
        try:
            return await source.list_folder(url, max_file_size=max_file_size)
        except BulkEngineError as exc:
            raise engine_error(exc) from None

    async def list_page(self, bucket: str, request: ListRequest) -> ListPage:
        """One page of a ``--root`` walk; an unavailable store stops the run."""
        source = await self.source()
        try:
            return await source.list_page(bucket, request)
        except BulkEngineError as exc:
            raise engine_error(exc, walk=True) from None

    async def count_leaves(self, url: S3Url) -> int:
        """How many rows ``--root url`` has (``S3Source.count_leaf_prefixes``: listing only)."""
        source = await self.source()
        try:
            return await source.count_leaf_prefixes(url)
        except BulkEngineError as exc:
            raise engine_error(exc, walk=True) from None

    # ---- objects -------------------------------------------------------------------------

    async def read_small(self, entries: Sequence[S3Entry]) -> list[bytes]:
        """Every object of a small folder, whole, each checked against its listing."""
        source = await self.source()
        try:
            return [await source.read_object(e) for e in entries]
        except BulkEngineError as exc:
            raise engine_error(exc) from None

    async def payload(self, entry: S3Entry) -> Payload:
        """A multipart part streaming ``entry`` (a fresh GET under its ETag on every write)."""
        source = await self.source()
        payload: Payload = source.payload(entry)
        return payload

    def blocking(self, call: Callable[..., Any] = anyio.from_thread.run) -> S3Folders:
        """This access for synchronous code in a worker thread started by anyio."""
        return S3Folders(self, call)


class S3Folders:
    """``S3Access`` for the producer's synchronous row stream, in a worker thread.

    Each call runs on the access's event loop through ``call`` (``anyio.from_thread.run`` in
    a thread started by anyio, a blocking portal's ``call`` in the dry run); the walk fetches
    one page per call, so the thread streams leaves with flat memory.
    """

    def __init__(self, access: S3Access, call: Callable[..., Any]) -> None:
        self._access = access
        self._call = call

    def list_folder(self, url: S3Url, *, max_file_size: int) -> tuple[S3Entry, ...]:
        """See ``S3Access.list_folder``."""
        entries: tuple[S3Entry, ...] = self._call(
            functools.partial(self._access.list_folder, url, max_file_size=max_file_size))
        return entries

    def iter_leaf_prefixes(self, url: S3Url, *, max_file_size: int) -> Iterator[S3Leaf]:
        """Every leaf under ``url`` with its listing (``S3Source.iter_leaf_prefixes``)."""
        walk = LeafWalk(url, max_file_size=max_file_size)
        while True:
            request = walk.next_request()
            yield from walk.take_ready()
            if request is None:
                return
            try:
                page: ListPage = self._call(self._access.list_page, url.bucket, request)
            except ManifestError as exc:
                walk.fail(exc)
            else:
                walk.feed(page)


class _LazyPortal:
    """An event loop in a thread for synchronous callers, started on the first call."""

    def __init__(self, access: S3Access) -> None:
        self._access = access
        self._stack = contextlib.ExitStack()
        self._portal: anyio.from_thread.BlockingPortal | None = None

    def call(self, func: Callable[..., Any], *args: Any) -> Any:
        if self._portal is None:
            portal = self._stack.enter_context(anyio.from_thread.start_blocking_portal())
            self._stack.enter_context(portal.wrap_async_context_manager(self._access))
            self._portal = portal
        return self._portal.call(func, *args)

    def close(self) -> None:
        self._stack.close()


@contextlib.contextmanager
def blocking_s3(settings: Settings, *, on_open: Callable[[str], None] | None = None
                ) -> Iterator[tuple[S3Folders, S3Access]]:
    """S3 access for synchronous code outside any event loop (the dry run): a loop in a
    thread is started when a row first needs S3, and stopped (the source closed) on exit."""
    access = S3Access.for_settings(settings, on_open=on_open)
    portal = _LazyPortal(access)
    try:
        yield S3Folders(access, portal.call), access
    finally:
        portal.close()
