"""S3 failures in bulk_engine's terms: the one place that reads botocore and aiohttp exceptions.

``classify`` is a pure function from an error code and HTTP status to what it means for us
(a table, like botocore's own retry tables); ``fault_of`` pulls the code and status out of an
exception; ``S3Source`` retries what is ``TRANSIENT`` with the project's backoff and hands the
rest to ``to_error``, which builds our exception:

    transient (5xx, SlowDown/throttling, resets, timeouts) ─ retried, then S3UnavailableError
    missing (NoSuchBucket, nothing under the prefix)        ─ ManifestError folder_missing
    denied (AccessDenied, ...)                              ─ ManifestError folder_unreadable
                                                              (file_unreadable for one object)
    changed (PreconditionFailed: ETag differs, NoSuchKey)   ─ ManifestError file_changed
    credentials (InvalidAccessKeyId, SignatureDoesNotMatch,
      expired token, no credentials found, bad profile)    ─ ConfigError naming what to fix
    region (PermanentRedirect, AuthorizationHeaderMalformed) ─ ConfigError (AWS_REGION)
    TLS (certificate not trusted)                            ─ ConfigError (AWS_CA_BUNDLE)

Messages are built from the error *code* only, never from the server's message text (a
SignatureDoesNotMatch message carries the canonical request) nor from the exception's repr;
credentials never appear, not even the access key id.
"""

from __future__ import annotations

import asyncio
import enum
from urllib.parse import urlsplit

import aiohttp
from botocore import exceptions as bx

from bulk_engine.errors import BulkEngineError, ConfigError, ManifestError, TransientError

__all__ = [
    "Fault",
    "S3UnavailableError",
    "classify",
    "credentials_where",
    "endpoint_shown",
    "fault_of",
    "to_error",
]


class S3UnavailableError(TransientError):
    """S3 kept failing in a way a retry could help (5xx, throttling, network), retries spent.

    ``kind`` is ``network``, ``timeout`` or ``server_error``, as for the API, so a plain rerun
    retries the row. ``isolated`` is True when other S3 requests of the same source were
    answered while this one kept failing (one object or prefix in trouble, not the store): the
    engine fails only that row then, and stops the run otherwise (``S3Access``).
    """

    isolated: bool = False


class Fault(enum.Enum):
    """What an S3 error means to us."""

    TRANSIENT = "transient"
    MISSING = "missing"
    DENIED = "denied"
    CHANGED = "changed"
    ARCHIVED = "archived"  # InvalidObjectState: in Glacier, not readable until restored
    TLS = "tls"  # the endpoint's certificate is not trusted: every call would fail alike
    CREDENTIALS = "credentials"
    REGION = "region"
    OTHER = "other"


_CODES: dict[str, Fault] = {
    # retry
    "SlowDown": Fault.TRANSIENT,
    "Throttling": Fault.TRANSIENT,
    "ThrottlingException": Fault.TRANSIENT,
    "RequestThrottled": Fault.TRANSIENT,
    "RequestLimitExceeded": Fault.TRANSIENT,
    "BandwidthLimitExceeded": Fault.TRANSIENT,
    "TooManyRequestsException": Fault.TRANSIENT,
    "RequestTimeout": Fault.TRANSIENT,
    "RequestTimeoutException": Fault.TRANSIENT,
    "InternalError": Fault.TRANSIENT,
    "ServiceUnavailable": Fault.TRANSIENT,
    "OperationAborted": Fault.TRANSIENT,
    # the folder or object
    "NoSuchBucket": Fault.MISSING,
    "NoSuchKey": Fault.CHANGED,  # listed a moment ago, gone now
    "PreconditionFailed": Fault.CHANGED,
    "AccessDenied": Fault.DENIED,
    "AllAccessDisabled": Fault.DENIED,
    "AccountProblem": Fault.DENIED,
    "InvalidObjectState": Fault.ARCHIVED,
    # configuration
    "InvalidAccessKeyId": Fault.CREDENTIALS,
    "SignatureDoesNotMatch": Fault.CREDENTIALS,
    "InvalidToken": Fault.CREDENTIALS,
    "ExpiredToken": Fault.CREDENTIALS,
    "TokenRefreshRequired": Fault.CREDENTIALS,
    "InvalidSecurity": Fault.CREDENTIALS,
    "RequestTimeTooSkewed": Fault.CREDENTIALS,
    "MissingSecurityHeader": Fault.CREDENTIALS,
    "PermanentRedirect": Fault.REGION,
    "AuthorizationHeaderMalformed": Fault.REGION,
    "IllegalLocationConstraintException": Fault.REGION,
}

# The exceptions of a request that never got a full answer: worth another try.
_TRANSIENT_EXC: tuple[type[BaseException], ...] = (
    bx.HTTPClientError,  # ConnectionClosedError, ReadTimeoutError, ResponseStreamingError
    bx.ConnectionError,  # EndpointConnectionError, ConnectTimeoutError, ProxyConnectionError
    bx.ResponseStreamingError,
    bx.IncompleteReadError,
    aiohttp.ClientError,
    asyncio.TimeoutError,
    ConnectionError,
)

_CREDENTIAL_EXC: tuple[type[BaseException], ...] = (
    bx.NoCredentialsError,
    bx.PartialCredentialsError,
    bx.ProfileNotFound,
    bx.CredentialRetrievalError,
    bx.NoAuthTokenError,
    bx.TokenRetrievalError,
    bx.SSOError,
    bx.UnauthorizedSSOTokenError,
    bx.InvalidConfigError,
    bx.ConfigParseError,
    bx.ConfigNotFound,
)


def classify(code: str | None, status: int | None) -> Fault:
    """What an S3 answer means: by its error code first, by its HTTP status otherwise."""
    if code and code in _CODES:
        return _CODES[code]
    if status is None:
        return Fault.OTHER
    if status >= 500 or status == 429:
        return Fault.TRANSIENT
    if status == 403:
        return Fault.DENIED
    if status == 404:
        return Fault.MISSING
    if status == 412:
        return Fault.CHANGED
    if status in (301, 307):
        return Fault.REGION
    return Fault.OTHER


def fault_of(exc: BaseException) -> tuple[Fault, str | None, int | None]:
    """(fault, error code, HTTP status) of an exception from botocore or aiohttp."""
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code = err.get("Code")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return classify(code, status), code, status
    if isinstance(exc, _CREDENTIAL_EXC):
        return Fault.CREDENTIALS, type(exc).__name__, None
    if isinstance(exc, (bx.SSLError, aiohttp.ClientConnectorCertificateError)):
        return Fault.TLS, type(exc).__name__, None
    if isinstance(exc, bx.FlexibleChecksumError):
        return Fault.TRANSIENT, "ChecksumMismatch", None
    if isinstance(exc, _TRANSIENT_EXC):
        return Fault.TRANSIENT, type(exc).__name__, None
    return Fault.OTHER, type(exc).__name__, None


_SOURCES = {
    "env": "the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN)",
    "explicit": "the credentials given to the S3 source",
    "shared-credentials-file": "the shared credentials file (AWS_SHARED_CREDENTIALS_FILE, "
    "default ~/.aws/credentials)",
    "config-file": "the AWS config file (AWS_CONFIG_FILE, default ~/.aws/config)",
    "assume-role": "an assumed role of the AWS config file",
    "sso": "AWS SSO (run `aws sso login` again)",
    "custom-process": "the credential_process of the AWS config file",
    "container-role": "the container's role (AWS_CONTAINER_CREDENTIALS_*)",
    "iam-role": "the instance's IAM role (EC2 metadata)",
    "assume-role-with-web-identity": "the web identity token (AWS_WEB_IDENTITY_TOKEN_FILE)",
}


def credentials_where(method: str | None, profile: str | None) -> str:
    """Where the credentials came from, in words an operator can act on."""
    where = _SOURCES.get(method or "", f"the AWS credential chain ({method or 'unknown'})")
    if profile and method in ("shared-credentials-file", "config-file", "assume-role", "sso",
                              "custom-process"):
        where += f", profile {profile!r} (AWS_PROFILE)"
    return where


def endpoint_shown(endpoint: str | None) -> str:
    """The endpoint as scheme://host:port only (a URL with user:password@ loses it)."""
    if not endpoint:
        return "AWS's own S3 endpoint"
    parts = urlsplit(endpoint)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


_CREDENTIAL_FIX = {
    "InvalidAccessKeyId": "S3 does not know the access key id (InvalidAccessKeyId)",
    "SignatureDoesNotMatch": "the secret access key does not match the access key id "
    "(SignatureDoesNotMatch)",
    "InvalidToken": "the session token is not valid (InvalidToken); refresh AWS_SESSION_TOKEN",
    "ExpiredToken": "the session token has expired (ExpiredToken); get new credentials",
    "TokenRefreshRequired": "the session token must be refreshed (TokenRefreshRequired)",
    "RequestTimeTooSkewed": "this machine's clock is more than 15 minutes off "
    "(RequestTimeTooSkewed); fix the clock",
}


def to_error(
    exc: BaseException,
    *,
    url: str,
    one_object: bool = False,
    endpoint: str | None = None,
    creds_method: str | None = None,
    profile: str | None = None,
) -> BulkEngineError:
    """The bulk_engine exception for a failed S3 call on ``url`` (a folder, or one object).

    A TRANSIENT fault given here means its retries are spent.
    """
    fault, code, status = fault_of(exc)
    at = f"{code or 'error'}" + (f", HTTP {status}" if status else "")
    if fault is Fault.CREDENTIALS:
        return ConfigError(_credentials_message(exc, code, endpoint, creds_method, profile))
    if fault is Fault.TLS:
        return ConfigError(
            f"TLS to the S3 endpoint {endpoint_shown(endpoint)} failed ({code}): if the store "
            "uses a private CA, set AWS_CA_BUNDLE to its PEM file; check --s3-endpoint-url / "
            "AWS_ENDPOINT_URL"
        )
    if fault is Fault.REGION:
        return ConfigError(
            f"S3 answered {at} for {url}: the bucket is in another region than the one "
            "configured, or the endpoint is not its store; set AWS_REGION (or region in the "
            "AWS config file) to the bucket's region, or fix --s3-endpoint-url / "
            f"AWS_ENDPOINT_URL (now {endpoint_shown(endpoint)})"
        )
    if fault is Fault.TRANSIENT:
        kind = "timeout" if "Timeout" in (code or "") else (
            "server_error" if status is not None or code == "ChecksumMismatch" else "network")
        return S3UnavailableError(
            f"S3 kept failing for {url} ({at}) after every retry; check the store "
            f"({endpoint_shown(endpoint)})",
            http_status=status, kind=kind,
        )
    if fault is Fault.CHANGED:
        return ManifestError(
            "file_changed",
            f"object {url} changed or vanished since its folder was listed ({at}); it was "
            "not uploaded as the listed object. Rerun to send the folder as it is now",
        )
    if fault is Fault.ARCHIVED:
        return ManifestError(
            "file_unreadable",
            f"object {url} is archived (InvalidObjectState: Glacier or Deep Archive) and cannot "
            "be read until it is restored",
        )
    if fault is Fault.MISSING:
        if one_object:
            return ManifestError("file_changed", f"object {url} no longer exists ({at})")
        return ManifestError(
            "folder_missing",
            f"folder {url} does not exist: the bucket does not exist or is not visible to "
            f"these credentials ({at}); check the bucket name",
        )
    if fault is Fault.DENIED:
        kind, what = ("file_unreadable", "object") if one_object else ("folder_unreadable",
                                                                         "folder")
        return ManifestError(
            kind,
            f"{what} {url} cannot be read with these credentials ({at}); grant "
            f"{'s3:GetObject' if one_object else 's3:ListBucket'} on it to the identity from "
            f"{credentials_where(creds_method, profile)}",
        )
    kind = "file_unreadable" if one_object else "folder_unreadable"
    return ManifestError(kind, f"S3 refused to {'read' if one_object else 'list'} {url} ({at})")


def _credentials_message(
    exc: BaseException, code: str | None, endpoint: str | None, method: str | None,
    profile: str | None,
) -> str:
    if isinstance(exc, bx.NoCredentialsError):
        return (
            "no AWS credentials found for S3: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or AWS_PROFILE naming a profile of ~/.aws/credentials or ~/.aws/config "
            "(AWS_SHARED_CREDENTIALS_FILE / AWS_CONFIG_FILE), or run with an instance or "
            "container role"
        )
    if isinstance(exc, bx.PartialCredentialsError):
        return (
            f"incomplete AWS credentials for S3 ({_cred_detail(exc)}): set both "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or both keys of the profile)"
        )
    if isinstance(exc, bx.ProfileNotFound):
        return (
            f"the AWS profile {profile or ''!r} is not defined (AWS_PROFILE): add it to "
            "~/.aws/config or ~/.aws/credentials (AWS_CONFIG_FILE / "
            "AWS_SHARED_CREDENTIALS_FILE), or unset AWS_PROFILE"
        )
    if code in _CREDENTIAL_FIX:
        return (
            f"S3 refused the credentials: {_CREDENTIAL_FIX[code]}. They came from "
            f"{credentials_where(method, profile)}; fix them there, and check that "
            f"--s3-endpoint-url / AWS_ENDPOINT_URL ({endpoint_shown(endpoint)}) is the store "
            "they belong to"
        )
    return (
        f"the AWS credentials for S3 cannot be used ({code}); check "
        f"{credentials_where(method, profile)} and AWS_PROFILE"
    )


def _cred_detail(exc: BaseException) -> str:
    # PartialCredentialsError names the provider and the missing variable, never a value.
    provider = getattr(exc, "kwargs", {}).get("provider", "?")
    missing = getattr(exc, "kwargs", {}).get("cred_var", "?")
    return f"{missing} missing from {provider}"
