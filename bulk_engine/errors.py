"""The exception tree of bulk_engine.

Split by cause, and by whether a retry can help::

    BulkEngineError                     base of everything raised on purpose
    ├── ConfigError                     bad settings, flags or files: fix and rerun (exit 1)
    ├── StorageError                    the journal or the output cannot be written (exit 1)
    ├── FatalRunError                   the whole run must stop (exit 1)
    │   ├── AuthError                   401/403 on POST /case, 403 on retrieve: the key is wrong
    │   ├── MassFailureError            too many recent rows failed server-side
    │   ├── ApiUnavailableError         the API stopped answering: stop before failing rows
    │   └── StoreUnavailableError       the S3 store stopped answering: stop before failing rows
    ├── ManifestError                   one bad manifest row or folder (becomes a `failed` line)
    └── ApiError                        one HTTP exchange that did not give what we wanted
        ├── TransientError              a retry can help: connect errors, timeouts, 429, 5xx
        │   └── AmbiguousSubmitError    POST /case lost after the body was sent: a run may exist
        └── PermanentError              a retry cannot help: 4xx on POST /case, retrieve 500

aiohttp exceptions are translated into this tree in exactly one place, ``client.py``; botocore's
(S3 folders) in ``s3/errors.py``, whose ``S3UnavailableError`` is a ``TransientError``.
No exception text ever carries the API key or request headers.
"""

from __future__ import annotations

__all__ = [
    "AmbiguousSubmitError",
    "ApiError",
    "ApiUnavailableError",
    "AuthError",
    "BulkEngineError",
    "ConfigError",
    "FatalRunError",
    "ManifestError",
    "MassFailureError",
    "PermanentError",
    "StorageError",
    "StoreUnavailableError",
    "TransientError",
    "first_error",
]


class BulkEngineError(Exception):
    """Base class of every error bulk_engine raises on purpose."""

    exit_code = 1


class ConfigError(BulkEngineError):
    """A setting, flag or file is wrong; the message says what to fix."""


class StorageError(BulkEngineError):
    """The journal or the output cannot be read or written (disk full, I/O error, corrupt).

    The message names the file and what to do; the state already committed is safe.
    """


class FatalRunError(BulkEngineError):
    """The run cannot go on (state is saved; a rerun resumes)."""


class AuthError(FatalRunError):
    """The API key was refused (401/403 on POST /case, or 403 on retrieve)."""

    def __init__(self, message: str, *, http_status: int | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status


class MassFailureError(FatalRunError):
    """Most recent rows failed server-side: stop instead of burning the archive."""


class ApiUnavailableError(FatalRunError):
    """The API stopped answering (an outage): stop with the rows in flight unfailed."""


class StoreUnavailableError(FatalRunError):
    """The S3 store of the run's folders stopped answering (an outage): stop with the rows in
    flight unfailed, as for an API outage."""


class ManifestError(BulkEngineError):
    """One manifest row or its folder cannot be submitted.

    ``kind`` is the machine-readable ``error.kind`` of the row's `failed` line.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class ApiError(BulkEngineError):
    """One HTTP exchange with the API failed."""

    kind = "api_error"

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        retry_after: float | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status
        self.retry_after = retry_after
        if kind is not None:
            self.kind = kind

    def __repr__(self) -> str:  # never the request: only what we chose to keep
        return f"{type(self).__name__}({self.message!r}, http_status={self.http_status!r})"


class TransientError(ApiError):
    """A retry may succeed (connect error, timeout, 429, 503, other 5xx)."""

    kind = "transient"


class AmbiguousSubmitError(TransientError):
    """The POST /case body was sent but the answer was lost: a run may exist server-side."""

    kind = "ambiguous_submit"


class PermanentError(ApiError):
    """A retry cannot help for this row (4xx on POST /case, retrieve 500)."""

    kind = "permanent"


def first_error(
    exc: BaseException, types: tuple[type[BaseException], ...]
) -> BaseException | None:
    """The first exception of ``types`` in ``exc`` or, depth first, in its (nested) groups."""
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = first_error(sub, types)
            if found is not None:
                return found
        return None
    return exc if isinstance(exc, types) else None
