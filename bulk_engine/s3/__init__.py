"""Folders in S3-compatible stores: ``s3://bucket/prefix/`` listed and streamed like local ones.

    manifest row / --root s3://…  ─▶  S3Source.list_folder / iter_leaf_prefixes  (producer)
                                          │ S3Entry (name, size, ETag, LastModified)
    submitter's multipart POST /case ◀── S3Source.payload(entry)  (one fresh GET per attempt,
                                          IfMatch=ETag, chunked, Range-resumed)

Install with ``pip install 'bulk-engine[s3]'`` (aiobotocore). Credentials and endpoint come
from the standard AWS sources (``AWS_*`` variables including ``AWS_ENDPOINT_URL``, the shared
config and credentials files, profiles, SSO, container and instance roles) or
``S3Options(endpoint_url=...)``. See ``docs/s3.md``.
"""

from __future__ import annotations

from bulk_engine.s3.errors import S3UnavailableError
from bulk_engine.s3.listing import S3Entry, S3Leaf, fingerprint
from bulk_engine.s3.payload import S3ObjectPayload, body_error
from bulk_engine.s3.source import BlockingS3Source, S3Options, S3Source, S3Stats
from bulk_engine.s3.url import S3Url, is_s3_url, parse_s3_url

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
