"""bulk_engine: backfill document archives through the submit-then-poll Case Analysis API."""

from bulk_engine.config import Settings, load_settings
from bulk_engine.errors import (
    ApiError,
    AuthError,
    BulkEngineError,
    ConfigError,
    FatalRunError,
    ManifestError,
    MassFailureError,
    PermanentError,
    TransientError,
)

__all__ = [
    "ApiError",
    "AuthError",
    "BulkEngineError",
    "ConfigError",
    "Engine",
    "FatalRunError",
    "ManifestError",
    "MassFailureError",
    "PermanentError",
    "RunResult",
    "Settings",
    "TransientError",
    "load_settings",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # The engine pulls in every stage; import it on first use so that light imports
    # (the emulator, the config) stay light.
    if name in ("Engine", "RunResult"):
        from bulk_engine import engine

        return getattr(engine, name)
    raise AttributeError(name)
