"""Folders in S3-compatible stores: ``s3://bucket/prefix/`` listed and streamed like local ones.

    manifest row / --root s3://…  ─▶  S3Source.list_folder / iter_leaf_prefixes  (producer)
                                          │ S3Entry (name, size, ETag, LastModified)
    submitter's multipart POST /case ◀── S3Source.payload(entry)  (one fresh GET per attempt,
                                          IfMatch=ETag, chunked, Range-resumed)

Install with ``pip install 'bulk-engine[s3]'`` (aiobotocore). Credentials and endpoint come
from the standard AWS sources (``AWS_*`` variables including ``AWS_ENDPOINT_URL``, the shared
config and credentials files, profiles, SSO, container and instance roles) or
``S3Options(endpoint_url=...)``. See ``docs/s3.md``.

The URL and listing rules (``url``, ``listing``) are pure standard-library code and imported at
once: the engine recognises an ``s3://`` folder without the extra installed. The names that need
aiobotocore or aiohttp (the client, its errors, the payload) are imported on first use
(PEP 562), so that ``import bulk_engine.s3.url`` never pulls in botocore; the ``TYPE_CHECKING``
block is the list type checkers read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bulk_engine.s3.listing import S3Entry, S3Leaf, fingerprint
from bulk_engine.s3.url import S3Url, is_s3_url, parse_s3_url

if TYPE_CHECKING:
    from bulk_engine.s3.errors import S3UnavailableError
    from bulk_engine.s3.payload import S3ObjectPayload, body_error
    from bulk_engine.s3.source import BlockingS3Source, S3Options, S3Source, S3Stats

__all__ = [
    "BlockingS3Source",
    "S3Entry",
    "S3Leaf",
    "S3ObjectPayload",
    "S3Options",
    "S3Source",
    "S3Stats",
    "S3UnavailableError",
    "S3Url",
    "body_error",
    "fingerprint",
    "is_s3_url",
    "parse_s3_url",
]

_LAZY = {
    "BlockingS3Source": "bulk_engine.s3.source",
    "S3ObjectPayload": "bulk_engine.s3.payload",
    "S3Options": "bulk_engine.s3.source",
    "S3Source": "bulk_engine.s3.source",
    "S3Stats": "bulk_engine.s3.source",
    "S3UnavailableError": "bulk_engine.s3.errors",
    "body_error": "bulk_engine.s3.payload",
}


def __getattr__(name: str) -> object:
    import importlib

    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # imported once: later lookups are plain attributes
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
