"""A local emulator of the Case Analysis API, for tests, benchmarks and the demo.

Faithful to the API as documented in ``docs/api.md``: streamed multipart ``POST /case`` (sync
200 or async 202 with a Fernet ``retrieve_token`` bound to the key), ``POST /case/retrieve``
with its 200/202/401/403/404/500 table, a per-key cap on parallel analyses, result expiry, a
per-key rate limit (429 + ``Retry-After``), ``Idempotency-Key`` replays and injectable faults.
Verdicts are deterministic from the uploaded content (``verdict.py``), so callers can predict them.

Modules: ``config`` (settings), ``verdict`` (results), ``upload`` (reading one submission),
``state`` (runs, slots, buckets, counters), ``app`` (HTTP handlers), ``server`` (in-process
serving), ``cli`` (``python -m bulk_engine.emulator``).
"""

from bulk_engine.emulator.app import STATE_KEY, create_app
from bulk_engine.emulator.config import EmulatorConfig, load_profile
from bulk_engine.emulator.server import Emulator, run_emulator
from bulk_engine.emulator.state import EmulatorState
from bulk_engine.emulator.verdict import ANALYSE_TYPES, content_digest, expected_result

__all__ = [
    "ANALYSE_TYPES",
    "STATE_KEY",
    "Emulator",
    "EmulatorConfig",
    "EmulatorState",
    "content_digest",
    "create_app",
    "expected_result",
    "load_profile",
    "run_emulator",
]
