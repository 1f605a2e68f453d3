"""``s3://bucket/prefix/`` folder URLs: parsed and checked once, before anything is listed.

A folder URL names the objects directly under a prefix, as a folder path names the files
directly inside a directory. The prefix is always treated as a folder: ``s3://b/cases/42`` and
``s3://b/cases/42/`` are the same folder (``cases/42/``), never every key starting with
``cases/42`` (which would take in ``cases/421/`` too). ``s3://b`` and ``s3://b/`` are the bucket's
top level. The text after the bucket is taken literally, as the AWS CLI does: no percent-decoding,
and ``?`` or ``#`` are part of the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bulk_engine.errors import ConfigError

__all__ = [
    "MAX_KEY_BYTES",
    "SCHEME",
    "S3Url",
    "is_s3_url",
    "parse_s3_url",
]

SCHEME = "s3://"
MAX_KEY_BYTES = 1024  # S3's limit on a key's length, in UTF-8 bytes

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IPV4 = re.compile(r"\d{1,3}(\.\d{1,3}){3}")


@dataclass(frozen=True, slots=True, order=True)
class S3Url:
    """A folder in a bucket: ``bucket`` and ``prefix`` ("" for the top, else ending in "/")."""

    bucket: str
    prefix: str = ""

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}"

    def key_url(self, key: str) -> str:
        """The ``s3://bucket/key`` URL of one object of this bucket."""
        return f"{SCHEME}{self.bucket}/{key}"

    def child(self, prefix: str) -> S3Url:
        """The folder at ``prefix`` (a full prefix ending in "/") in the same bucket."""
        return S3Url(self.bucket, prefix)


def is_s3_url(text: str) -> bool:
    """True when ``text`` is meant as an S3 URL (it starts with ``s3://``, any case)."""
    return text[:5].lower() == SCHEME


def parse_s3_url(text: str) -> S3Url:
    """``s3://bucket/prefix/`` as an ``S3Url``; ``ConfigError`` saying what is wrong otherwise."""
    if not is_s3_url(text):
        raise ConfigError(f"{text!r} is not an S3 URL; write it as s3://bucket/prefix/")
    rest = text[len(SCHEME):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ConfigError(f"S3 URL {text!r} has no bucket; write it as s3://bucket/prefix/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket or _IPV4.fullmatch(bucket):
        raise ConfigError(
            f"S3 URL {text!r}: {bucket!r} is not a valid bucket name (3 to 63 lowercase "
            "letters, digits, '.' or '-', starting and ending with a letter or digit)"
        )
    try:
        size = len(prefix.encode("utf-8"))
    except UnicodeEncodeError:
        raise ConfigError(
            f"S3 URL {text!r} is not valid UTF-8; S3 keys are UTF-8 text"
        ) from None
    if prefix:
        segments = prefix.removesuffix("/").split("/")
        bad = next((s for s in segments if s in ("", ".", "..")), None)
        if bad is not None:
            what = "an empty segment ('//')" if bad == "" else f"a {bad!r} segment"
            raise ConfigError(
                f"S3 URL {text!r} has {what}; S3 does not resolve those, so the folder would "
                "not be the one meant. Write the prefix without it"
            )
        if any(ord(c) < 0x20 or c == "\x7f" for c in prefix):
            raise ConfigError(f"S3 URL {text!r} contains control characters; remove them")
        prefix = prefix if prefix.endswith("/") else prefix + "/"
        size += 0 if text.endswith("/") else 1
    if size > MAX_KEY_BYTES:
        raise ConfigError(
            f"S3 URL {text[:80]!r}...: the prefix is {size} bytes, above S3's {MAX_KEY_BYTES}"
        )
    return S3Url(bucket, prefix)
