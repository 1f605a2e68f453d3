"""One S3 object as a part of the multipart ``POST /case``, streamed with bounded memory.

The submitter appends ``S3ObjectPayload`` to its ``aiohttp.MultipartWriter`` as it appends
file objects for local folders. Its size is the listed size, so the request keeps a
``Content-Length``. Every ``write`` (every upload attempt, and any resend aiohttp makes) opens a
fresh GET through ``S3Source.iter_object``: under ``IfMatch`` with the listed ETag, in chunks,
resumed by Range after a cut. A multipart body is consumed by the attempt that sends it, so
nothing is cached between attempts and memory does not grow with the object.

When the object changed since listing, the write raises ``ManifestError('file_changed')``.
aiohttp reports a failure inside a body write as a ``ClientConnectionError`` whose
``__cause__`` is that error: ``body_error(exc)`` finds it so the submitter fails the row with
``file_changed`` (or retries an ``S3UnavailableError``) instead of blaming the API.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload

from bulk_engine.errors import BulkEngineError
from bulk_engine.s3.listing import S3Entry

if TYPE_CHECKING:
    from bulk_engine.s3.source import S3Source

__all__ = ["S3ObjectPayload", "body_error"]


class S3ObjectPayload(Payload):
    """An S3 object streamed into a request body; re-readable (one fresh GET per write)."""

    _autoclose = True  # no handle is held between writes

    def __init__(self, source: S3Source, entry: S3Entry, **kwargs: Any) -> None:
        kwargs.setdefault("content_type", "application/octet-stream")
        super().__init__(entry, **kwargs)
        self._source = source
        self._entry = entry
        self._size = entry.size
        self.error: BulkEngineError | None = None  # what stopped the last write, if we did

    @property
    def entry(self) -> S3Entry:
        """The listed object this payload sends."""
        return self._entry

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        """Send the object (at most ``content_length`` bytes) from a fresh GET."""
        left = content_length
        self.error = None
        chunks = self._source.iter_object(self._entry)
        async with contextlib.aclosing(chunks):
            try:
                async for chunk in chunks:
                    if left is not None:
                        if left <= 0:
                            break
                        chunk = chunk[:left]
                        left -= len(chunk)
                    await writer.write(chunk)
            except BulkEngineError as exc:
                self.error = exc
                raise

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("an S3 object payload is streamed, not decoded; use as_bytes()")

    async def as_bytes(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        """The whole object (small folders only: it is held in memory)."""
        return await self._source.read_object(self._entry)


def body_error(exc: BaseException) -> BulkEngineError | None:
    """The bulk_engine error an S3 payload raised inside a failed request, if any.

    Looks through ``__cause__`` / ``__context__`` (aiohttp wraps body-write failures).
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, BulkEngineError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None
