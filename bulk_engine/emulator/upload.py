"""Reading one ``POST /case`` body: a streamed multipart form, validated as the API would.

``read_upload`` walks the parts with ``request.multipart()`` and reads each in chunks, hashing
and counting as it goes, so memory does not depend on file sizes (only JSON forms and the payload
are kept, to be parsed). It returns an ``Upload`` or raises ``UploadError`` carrying the HTTP
status (400, 413, 415) and the ``detail`` message that ``app.py`` sends back.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import BodyPartReader, web

from bulk_engine.emulator.verdict import ANALYSE_TYPES, content_digest

__all__ = [
    "CHUNK_SIZE",
    "MAX_PAYLOAD_BYTES",
    "Payload",
    "Upload",
    "UploadError",
    "UploadedFile",
    "parse_payload",
    "read_upload",
]

CHUNK_SIZE = 64 * 1024
MAX_PAYLOAD_BYTES = 1024 * 1024


class UploadError(Exception):
    """The body is not an acceptable submission; ``status`` and ``detail`` form the answer."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True, slots=True)
class UploadedFile:
    """One ``documents`` part as received: its filename, byte count and sha256 (hex)."""

    name: str
    size: int
    sha256: str
    is_form: bool

    def as_json(self) -> dict[str, Any]:
        """The record shown by ``GET /_emulator/submissions``."""
        return {"name": self.name, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True, slots=True)
class Payload:
    """The validated ``payload`` field (defaults filled in)."""

    analyse_type: tuple[str, ...] = ("decision",)
    use_case: str = "rental"
    asynchronous: bool = False
    share_link_settings: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Upload:
    """A complete, valid submission: payload, every file part (forms included) and its digest."""

    payload: Payload
    files: tuple[UploadedFile, ...]
    digest: str

    @property
    def document_names(self) -> tuple[str, ...]:
        """Names of the parts that are documents (not JSON forms), in upload order."""
        return tuple(f.name for f in self.files if not f.is_form)


async def read_upload(
    request: web.Request, *, max_bytes: int, on_bytes: Callable[[int], None]
) -> Upload:
    """Stream and validate the multipart body of ``request``.

    ``max_bytes`` bounds the total size of all parts' contents (413 beyond it, as soon as it is
    crossed). ``on_bytes`` is called with the size of every chunk read from a ``documents`` part,
    for the emulator's ``bytes_received`` counter.
    """
    if request.content_type != "multipart/form-data":
        raise UploadError(415, "POST /case expects multipart/form-data")
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError) as exc:
        raise UploadError(400, f"malformed multipart body: {exc}") from None

    total = 0
    raw_payload: bytes | None = None
    files: list[UploadedFile] = []
    while True:
        try:
            part = await reader.next()
        except (ValueError, AssertionError) as exc:
            raise UploadError(400, f"malformed multipart body: {exc}") from None
        if part is None:
            break
        if not isinstance(part, BodyPartReader):
            raise UploadError(400, "nested multipart parts are not supported")
        if part.name == "payload":
            if raw_payload is not None:
                raise UploadError(400, "the payload field appears more than once")
            raw_payload = await _read_small(part, limit=MAX_PAYLOAD_BYTES, what="payload")
            total += len(raw_payload)
        elif part.name == "documents":
            uploaded, total = await _read_document(part, total, max_bytes, on_bytes)
            files.append(uploaded)
        else:
            raise UploadError(
                400, f"unexpected form field {part.name!r}: expected 'payload' and 'documents'"
            )
        if total > max_bytes:
            raise UploadError(413, f"request body exceeds {max_bytes} bytes")

    payload = parse_payload(raw_payload)
    if not any(not f.is_form for f in files):
        raise UploadError(400, "no documents: the folder has no file other than JSON forms")
    digest = content_digest((f.name, f.sha256) for f in files)
    return Upload(payload=payload, files=tuple(files), digest=digest)


async def _read_document(
    part: BodyPartReader, total: int, max_bytes: int, on_bytes: Callable[[int], None]
) -> tuple[UploadedFile, int]:
    name = part.filename
    if not name:
        raise UploadError(400, "every documents part needs a filename")
    is_form = name.lower().endswith(".json")
    hasher = hashlib.sha256()
    size = 0
    form = bytearray() if is_form else None
    while chunk := await part.read_chunk(CHUNK_SIZE):
        on_bytes(len(chunk))
        size += len(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise UploadError(413, f"request body exceeds {max_bytes} bytes")
        hasher.update(chunk)
        if form is not None:
            form += chunk
    if form is not None:
        try:
            json.loads(form.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise UploadError(400, f"malformed JSON form {name!r}") from None
    return UploadedFile(name=name, size=size, sha256=hasher.hexdigest(), is_form=is_form), total


async def _read_small(part: BodyPartReader, *, limit: int, what: str) -> bytes:
    data = bytearray()
    while chunk := await part.read_chunk(CHUNK_SIZE):
        data += chunk
        if len(data) > limit:
            raise UploadError(400, f"{what} field exceeds {limit} bytes")
    return bytes(data)


def parse_payload(raw: bytes | None) -> Payload:
    """Validate the ``payload`` field (absent means all defaults); raise ``UploadError`` (400).

    Unknown keys are accepted and ignored: accounts may configure extra ones.
    """
    if raw is None:
        return Payload()
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise UploadError(400, "payload is not valid JSON") from None
    if not isinstance(data, dict):
        raise UploadError(400, "payload must be a JSON object")

    analyse_type = data.get("analyse_type", ["decision"])
    if not isinstance(analyse_type, list) or not all(isinstance(a, str) for a in analyse_type):
        raise UploadError(400, "analyse_type must be a list of strings")
    if not analyse_type:
        raise UploadError(400, "analyse_type must not be empty")
    unknown = [a for a in analyse_type if a not in ANALYSE_TYPES]
    if unknown:
        raise UploadError(
            400,
            f"unknown analyse_type {unknown[0]!r}: expected one of {', '.join(ANALYSE_TYPES)}",
        )
    use_case = data.get("use_case", "rental")
    if not isinstance(use_case, str) or not use_case:
        raise UploadError(400, "use_case must be a non-empty string")
    asynchronous = data.get("asynchronous", False)
    if not isinstance(asynchronous, bool):
        raise UploadError(400, "asynchronous must be true or false")
    settings = data.get("share_link_settings")
    if settings is not None and not isinstance(settings, dict):
        raise UploadError(400, "share_link_settings must be a JSON object")
    return Payload(
        analyse_type=tuple(dict.fromkeys(analyse_type)),
        use_case=use_case,
        asynchronous=asynchronous,
        share_link_settings=settings,
    )
