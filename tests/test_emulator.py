"""The emulator of the Case Analysis API, exercised through real HTTP clients.

Every test starts an in-process emulator on port 0 (``run_emulator``) and talks to it with
aiohttp, or with ``requests`` in a thread for the documented example. Time-dependent behaviour
(queueing, expiry, rate buckets) runs on a ``FakeClock`` so nothing waits for real.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
import trustme
from multidict import CIMultiDictProxy

from bulk_engine.clock import FakeClock
from bulk_engine.emulator import (
    Emulator,
    EmulatorConfig,
    EmulatorState,
    content_digest,
    expected_result,
    load_profile,
    run_emulator,
)
from bulk_engine.emulator.cli import build_parser, config_from_args, main

REPO = Path(__file__).resolve().parents[1]
KEY = "demo"
FOLDER: list[tuple[str, bytes]] = [
    ("payslip.pdf", b"%PDF-1.4\npayslip of Julien Moreau\n%%EOF\n"),
    ("tax_notice.pdf", b"%PDF-1.4\ntax notice 2024\n%%EOF\n"),
    ("form.json", b'{"applicant": {"name": "Julien Moreau", "income": 3200}}'),
]
ALL_TYPES = ["decision", "explanation", "share_link"]
RUN_ID = re.compile(r"^\d{2}_\d{2}_\d{2}_\d{2}_\d{2}_[0-9a-f]{12}$")
FAST = (0.01, 0.03)

pytestmark = pytest.mark.timeout(10)


# -- helpers ---------------------------------------------------------------------------------


@asynccontextmanager
async def serve(
    clock: FakeClock | None = None, **settings: Any
) -> AsyncIterator[tuple[Emulator, aiohttp.ClientSession]]:
    """An emulator with ``settings`` and a client session pointed at it."""
    settings.setdefault("processing_time", FAST)
    settings.setdefault("seed", 1)
    async with (
        run_emulator(EmulatorConfig(**settings), clock=clock) as emu,
        aiohttp.ClientSession(emu.base_url) as session,
    ):
        yield emu, session


def digest_of(files: Sequence[tuple[str, bytes]]) -> str:
    return content_digest((name, hashlib.sha256(data).hexdigest()) for name, data in files)


def make_form(
    files: Sequence[tuple[str, bytes]], payload: dict[str, Any] | str | None
) -> aiohttp.FormData:
    form = aiohttp.FormData(default_to_multipart=True)
    if payload is not None:
        form.add_field("payload", payload if isinstance(payload, str) else json.dumps(payload))
    for name, data in files:
        form.add_field("documents", data, filename=name, content_type="application/octet-stream")
    return form


async def submit(
    session: aiohttp.ClientSession,
    files: Sequence[tuple[str, bytes]] = FOLDER,
    payload: dict[str, Any] | str | None = None,
    *,
    key: str | None = KEY,
    headers: dict[str, str] | None = None,
    asynchronous: bool = True,
) -> tuple[int, Any, CIMultiDictProxy[str]]:
    """POST /case; return (status, JSON body, headers). ``payload`` None: async decision."""
    if payload is None:
        payload = {"analyse_type": ["decision"], "asynchronous": asynchronous}
    all_headers = dict(headers or {})
    if key is not None:
        all_headers["api-key"] = key
    async with session.post("/case", data=make_form(files, payload), headers=all_headers) as resp:
        return resp.status, await resp.json(), resp.headers


async def retrieve(
    session: aiohttp.ClientSession, token: Any, *, key: str = KEY
) -> tuple[int, Any, CIMultiDictProxy[str]]:
    async with session.post(
        "/case/retrieve", json={"retrieve_token": token}, headers={"api-key": key}
    ) as resp:
        return resp.status, await resp.json(), resp.headers


async def submit_async(session: aiohttp.ClientSession, **kwargs: Any) -> str:
    status, body, _ = await submit(session, **kwargs)
    assert status == 202, body
    token: str = body["retrieve_token"]
    return token


async def poll_until_final(
    session: aiohttp.ClientSession, token: str, *, key: str = KEY, limit: float = 5.0
) -> tuple[int, Any]:
    """Poll until the answer is not 202, for at most ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        status, body, _ = await retrieve(session, token, key=key)
        if status != 202:
            return status, body
        await asyncio.sleep(0.005)
    raise AssertionError(f"still processing after {limit} s")


async def get_json(session: aiohttp.ClientSession, path: str) -> Any:
    async with session.get(path) as resp:
        assert resp.status == 200
        return await resp.json()


# -- verdicts (pure) --------------------------------------------------------------------------


def test_content_digest_ignores_order_but_not_names_or_bytes() -> None:
    """The digest is the same for any file order and changes with a name or a byte."""
    assert digest_of(FOLDER) == digest_of(list(reversed(FOLDER)))
    assert digest_of(FOLDER) != digest_of([("other.pdf", FOLDER[0][1]), *FOLDER[1:]])
    assert digest_of(FOLDER) != digest_of([("payslip.pdf", b"x"), *FOLDER[1:]])


def test_expected_result_follows_the_documented_rules() -> None:
    """Approved only for low + compliant; links and explanations have the documented shape."""
    names = [name for name, _ in FOLDER]
    seen = set()
    for i in range(300):
        result = expected_result(hashlib.sha256(str(i).encode()).hexdigest(), ALL_TYPES, names)
        decision = result["decision"]
        seen.add(decision["status"])
        assert decision["status_fraud"] in ("low", "medium", "high")
        assert decision["status_validation"] in ("compliant", "non_compliant")
        approved = (
            decision["status_fraud"] == "low" and decision["status_validation"] == "compliant"
        )
        assert decision["status"] == ("approved" if approved else "rejected")
        assert result["share_link"]["url"].startswith(
            "https://app.finovox.com/share/case-management/"
        )
        for item in result["explanation"]:
            assert item["source"] in ("fraud", "compliance", "cross_document")
            assert set(item["data"]) == {"en", "fr"}
            assert set(item["source_documents"]) <= {"payslip.pdf", "tax_notice.pdf"}
    assert seen == {"approved", "rejected"}
    with pytest.raises(ValueError, match="unknown analyse_type"):
        expected_result("00", ["verdict"], names)


# -- config and profiles ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"api_keys": ()}, "api_keys must be a non-empty"),
        ({"api_keys": ("a", "a")}, "duplicates"),
        ({"api_keys": ("a,b",)}, r"api_keys\[0\]"),
        ({"processing_time": (2.0, 1.0)}, "min <= max"),
        ({"max_parallel_analyses": 0}, "max_parallel_analyses must be >= 1"),
        ({"fail_rate": 1.5}, "fail_rate must be between 0 and 1"),
        ({"stall_rate": -0.1}, "stall_rate must be between 0 and 1"),
        ({"rate_limit": 0}, "rate_limit must be > 0"),
        ({"burst": True}, "burst must be an integer"),
        ({"result_ttl": float("inf")}, "result_ttl must be finite"),
    ],
)
def test_config_rejects_invalid_values(settings: dict[str, Any], message: str) -> None:
    """Each invalid setting raises ValueError naming the setting."""
    with pytest.raises(ValueError, match=message):
        EmulatorConfig(**settings)


def test_config_repr_hides_keys_and_profiles_load() -> None:
    """Keys never appear in repr; both shipped profiles are valid; unknown names are refused."""
    assert "s3cret" not in repr(EmulatorConfig(api_keys=("s3cret",)))
    fast = EmulatorConfig.from_mapping(load_profile(REPO / "config/fast.toml"))
    realistic = EmulatorConfig.from_mapping(load_profile(REPO / "config/realistic.toml"))
    assert fast.processing_time[1] < 1 and realistic.processing_time == (30.0, 120.0)
    assert realistic.max_parallel_analyses == 10 and realistic.rate_limit is not None
    with pytest.raises(ValueError, match="unknown emulator setting"):
        EmulatorConfig.from_mapping({"fail_rat": 0.1})


def test_cli_flags_override_the_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    """--profile values apply, flags win over them, keys may come from the environment."""
    monkeypatch.setenv("BULK_ENGINE_EMULATOR_API_KEYS", "k1,k2")
    args = build_parser().parse_args(
        ["--profile", str(REPO / "config/fast.toml"), "--seed", "7", "--rate-limit", "none"]
    )
    config = config_from_args(args)
    assert config.seed == 7 and config.rate_limit is None
    assert config.processing_time == (0.05, 0.2) and config.api_keys == ("k1", "k2")


def test_cli_help_and_bad_values(capsys: pytest.CaptureFixture[str]) -> None:
    """--help documents the knobs; an invalid value exits 2 with a message."""
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--processing-time" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["--max-parallel-analyses", "0"])
    assert exc.value.code == 2
    assert "max_parallel_analyses must be >= 1" in capsys.readouterr().err


# -- retrieve status table --------------------------------------------------------------------


async def test_retrieve_answers_202_while_processing_then_200() -> None:
    """202 with the run_id while queued/running, then 200 with the deterministic result."""
    clock = FakeClock()
    async with serve(clock, processing_time=(1.0, 1.0)) as (emu, session):
        payload = {"analyse_type": ALL_TYPES, "asynchronous": True}
        token = await submit_async(session, payload=payload)
        assert token.startswith("gAAAAA")
        status, body, _ = await retrieve(session, token)
        assert status == 202 and body["status"] == "processing"
        assert RUN_ID.match(body["run_id"])
        await clock.advance(1.0)
        status, body, _ = await retrieve(session, token)
        assert status == 200
        assert body == expected_result(digest_of(FOLDER), ALL_TYPES, [n for n, _ in FOLDER])
        stats = emu.stats()
        assert stats["polls_by_status"] == {"200": 1, "202": 1}


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", b"{}", b'{"retrieve_token": 5}', b'{"retrieve_token": "gAAAAAgarbage"}'],
)
async def test_retrieve_401_for_invalid_token_or_body(body: bytes) -> None:
    """A body that is not JSON, lacks the token or holds an undecryptable one gives 401."""
    async with serve() as (_, session):
        headers = {"api-key": KEY, "Content-Type": "application/json"}
        async with session.post("/case/retrieve", data=body, headers=headers) as resp:
            assert resp.status == 401
            assert "retrieve_token" in (await resp.json())["detail"]


async def test_retrieve_401_for_a_token_of_another_emulator() -> None:
    """Tokens are encrypted with a per-instance key: another instance's token is invalid."""
    other = EmulatorState(EmulatorConfig())
    async with serve() as (_, session):
        status, _, _ = await retrieve(session, other.issue_token("01_01_00_00_00_0123456789ab", 0))
        assert status == 401


async def test_retrieve_403_for_a_token_of_another_key() -> None:
    """A token issued to one key is refused (403) to another valid key."""
    async with serve(api_keys=("alpha", "bravo")) as (_, session):
        token = await submit_async(session, key="alpha")
        status, body, _ = await retrieve(session, token, key="bravo")
        assert status == 403 and "another user" in body["detail"]
        status, _ = await poll_until_final(session, token, key="alpha")
        assert status == 200


async def test_retrieve_404_for_unknown_run() -> None:
    """A valid token naming a run the emulator never had gives 404."""
    async with serve() as (emu, session):
        token = emu.state.issue_token("01_01_00_00_00_0123456789ab", 0)
        status, body, _ = await retrieve(session, token)
        assert status == 404 and "detail" in body


async def test_retrieve_404_once_the_result_expired() -> None:
    """The result is served until result_ttl after completion, then 404."""
    clock = FakeClock()
    async with serve(clock, processing_time=(1.0, 1.0), result_ttl=10.0) as (emu, session):
        token = await submit_async(session)
        await clock.advance(1.0)
        assert (await retrieve(session, token))[0] == 200
        await clock.advance(9.5)
        assert (await retrieve(session, token))[0] == 200
        await clock.advance(0.5)
        status, body, _ = await retrieve(session, token)
        assert status == 404 and "expired" in body["detail"]
        assert emu.stats()["runs"]["expired"] == 1


async def test_retrieve_500_when_the_folder_fails() -> None:
    """With fail_rate=1 every folder ends 500 with a detail; sync mode answers 500 too."""
    async with serve(fail_rate=1.0) as (_, session):
        token = await submit_async(session)
        status, body = await poll_until_final(session, token)
        assert status == 500 and "failed" in body["detail"]
        status, body, _ = await submit(session, asynchronous=False)
        assert status == 500 and "failed" in body["detail"]


# -- POST /case -------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, "wrong-key"])
async def test_submit_401_without_a_valid_key(key: str | None) -> None:
    """A missing or unknown api-key gives 401, creates nothing and echoes no key."""
    async with serve() as (emu, session):
        status, body, _ = await submit(session, key=key)
        assert status == 401 and "api-key" in body["detail"]
        assert "wrong-key" not in body["detail"]
        assert emu.stats()["runs_created"] == 0


@pytest.mark.parametrize(
    ("files", "payload", "message"),
    [
        (FOLDER, "{not json", "payload is not valid JSON"),
        (FOLDER, "[1, 2]", "payload must be a JSON object"),
        (FOLDER, {"analyse_type": ["verdict"]}, "unknown analyse_type 'verdict'"),
        (FOLDER, {"analyse_type": "decision"}, "analyse_type must be a list"),
        (FOLDER, {"analyse_type": []}, "analyse_type must not be empty"),
        (FOLDER, {"asynchronous": "yes"}, "asynchronous must be true or false"),
        (FOLDER, {"use_case": 3}, "use_case must be a non-empty string"),
        ([], {"asynchronous": True}, "no documents"),
        ([("form.json", b"{}")], {"asynchronous": True}, "no documents"),
        ([("a.pdf", b"%PDF"), ("Form.JSON", b"{oops")], {}, "malformed JSON form 'Form.JSON'"),
    ],
)
async def test_submit_400_for_invalid_forms(
    files: list[tuple[str, bytes]], payload: dict[str, Any] | str, message: str
) -> None:
    """Malformed payloads, unknown analyse types, folders without documents, bad forms: 400."""
    async with serve() as (emu, session):
        status, body, _ = await submit(session, files, payload)
        assert status == 400
        assert message in body["detail"]
        assert emu.stats()["runs_created"] == 0


async def test_submit_400_for_an_unexpected_field_and_415_for_json() -> None:
    """Unknown multipart fields give 400; a body that is not multipart gives 415."""
    async with serve() as (_, session):
        form = make_form(FOLDER, {"asynchronous": True})
        form.add_field("attachments", b"x", filename="x.pdf")
        async with session.post("/case", data=form, headers={"api-key": KEY}) as resp:
            assert resp.status == 400
            assert "unexpected form field 'attachments'" in (await resp.json())["detail"]
        async with session.post("/case", json={"a": 1}, headers={"api-key": KEY}) as resp:
            assert resp.status == 415


async def test_submit_413_above_max_upload_bytes() -> None:
    """A body whose parts exceed max_upload_bytes is refused 413 while streaming."""
    async with serve(max_upload_bytes=4000) as (emu, session):
        status, body, _ = await submit(session, [("big.pdf", b"x" * 20_000)])
        assert status == 413 and "4000" in body["detail"]
        assert emu.stats()["runs_created"] == 0
        status, _, _ = await submit(session, [("small.pdf", b"x" * 1000)])
        assert status == 202


async def test_sync_mode_answers_200_with_the_result() -> None:
    """Without asynchronous (default), POST /case waits for the analysis and answers 200."""
    async with serve() as (emu, session):
        status, body, _ = await submit(session, payload={"analyse_type": ["decision"]})
        assert status == 200
        assert body == expected_result(digest_of(FOLDER), ["decision"], [n for n, _ in FOLDER])
        status, body, _ = await submit(session, payload="{}")
        assert status == 200 and set(body) == {"decision"}
        assert emu.stats()["submissions_by_status"] == {"200": 2}


async def test_documented_example_flow_with_requests(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The example of seed-async-api.txt runs unchanged but for base URL and poll sleep."""
    folder_root = tmp_path / "samples" / "folder_julien_moreau"
    folder_root.mkdir(parents=True)
    for name, data in FOLDER:
        (folder_root / name).write_bytes(data)
    opened: list[Any] = []

    def example(base_url: str) -> None:
        # --- verbatim from the docs, except base_url, the folder path and the sleep ---
        headers = {"api-key": "YOUR_API_KEY_HERE"}

        payload = {
            "analyse_type": ["decision", "share_link"],
            "use_case": "rental",
            "share_link_settings": {"access": "public", "password": ""},
            "asynchronous": True,
        }

        folder = Path(folder_root)
        files = [("documents", (f.name, f.open("rb"))) for f in folder.iterdir() if f.is_file()]
        opened.extend(fh for _, (_, fh) in files)  # test addition: close them afterwards
        data = {"payload": json.dumps(payload)}

        submit = requests.post(
            f"{base_url}/case", headers=headers, files=files, data=data, timeout=120
        )
        submit.raise_for_status()
        retrieve_token = submit.json()["retrieve_token"]
        print(f"retrieve_token = {retrieve_token[:32]}...")

        while True:
            retrieve = requests.post(
                f"{base_url}/case/retrieve",
                headers=headers,
                json={"retrieve_token": retrieve_token},
                timeout=120,
            )

            if retrieve.status_code == 200:
                print(retrieve.json())
                break

            if retrieve.status_code != 202:
                raise RuntimeError(retrieve.text)

            time.sleep(0.01)

    config = EmulatorConfig(api_keys=("YOUR_API_KEY_HERE",), processing_time=FAST)
    async with run_emulator(config) as emu:
        try:
            await asyncio.to_thread(example, emu.base_url)
        finally:
            for fh in opened:
                fh.close()
        assert emu.stats()["polls_by_status"]["200"] == 1
    out = capsys.readouterr().out
    assert out.startswith("retrieve_token = gAAAAA")
    expected = expected_result(
        digest_of(FOLDER), ["decision", "share_link"], [n for n, _ in FOLDER]
    )
    assert str(expected) in out


async def test_verdicts_are_deterministic_and_match_expected_result() -> None:
    """Same files (any order, any key) give the same result; duplicates are counted."""
    async with serve(api_keys=("alpha", "bravo")) as (emu, session):
        payload = {"analyse_type": ALL_TYPES, "asynchronous": False}
        first = await submit(session, FOLDER, payload, key="alpha")
        second = await submit(session, list(reversed(FOLDER)), payload, key="alpha")
        third = await submit(session, FOLDER, payload, key="bravo")
        other = await submit(session, [("payslip.pdf", b"another payslip")], payload, key="alpha")
        assert first[0] == second[0] == third[0] == other[0] == 200
        assert first[1] == second[1] == third[1]
        assert first[1] == expected_result(digest_of(FOLDER), ALL_TYPES, [n for n, _ in FOLDER])
        assert other[1]["share_link"] != first[1]["share_link"]
        stats = emu.stats()
        assert stats["duplicate_submissions"] == 1  # the second alpha upload of FOLDER
        assert stats["bytes_received"] == 3 * sum(len(d) for _, d in FOLDER) + 15


@pytest.mark.parametrize(
    "types",
    [["decision"], ["explanation"], ["share_link"], ["share_link", "decision"], ALL_TYPES],
)
async def test_result_holds_only_the_requested_analyse_types(types: list[str]) -> None:
    """Each analyse_type adds exactly its key to the result; the others are left out."""
    async with serve() as (_, session):
        status, body, _ = await submit(session, payload={"analyse_type": types})
        assert status == 200 and set(body) == set(types)


# -- limits -----------------------------------------------------------------------------------


async def test_parallel_analyses_never_exceed_the_cap_and_all_finish() -> None:
    """30 folders under a cap of 3: never more than 3 run at once, all reach 200."""
    async with serve(max_parallel_analyses=3, processing_time=(0.01, 0.02)) as (emu, session):
        folders = [[(f"doc{i}.pdf", f"folder {i}".encode())] for i in range(30)]
        tokens = await asyncio.gather(*(submit_async(session, files=f) for f in folders))
        finals = await asyncio.gather(*(poll_until_final(session, t) for t in tokens))
        assert [status for status, _ in finals] == [200] * 30
        stats = emu.stats()
        assert stats["max_parallel_observed"] == 3
        # Independent check of the cap: sweep the start/finish intervals of all runs.
        events = sorted(
            [(r.finished_at, -1) for r in emu.state.runs.values()]
            + [(r.started_at, 1) for r in emu.state.runs.values()]
        )
        running = peak = 0
        for _, delta in events:
            running += delta
            peak = max(peak, running)
        assert peak <= 3


async def test_sync_calls_in_flight_are_counted() -> None:
    """Concurrent sync submissions are all in flight at once while their analyses run."""
    async with serve(processing_time=(0.05, 0.05)) as (emu, session):
        folders = [[(f"doc{i}.pdf", f"folder {i}".encode())] for i in range(5)]
        answers = await asyncio.gather(*(submit(session, f, asynchronous=False) for f in folders))
        assert [status for status, _, _ in answers] == [200] * 5
        stats = emu.stats()
        assert stats["max_in_flight_requests"] == 5 and stats["in_flight_requests"] == 0
        assert stats["max_parallel_observed"] == 5


async def test_queued_runs_wait_for_a_free_slot() -> None:
    """With a cap of 1, the second and third runs start only when the previous one ends."""
    clock = FakeClock()
    async with serve(clock, max_parallel_analyses=1, processing_time=(1.0, 1.0)) as (emu, session):
        tokens = [await submit_async(session) for _ in range(3)]
        runs = emu.stats()["runs"]
        assert (runs["queued"], runs["running"], runs["completed"]) == (2, 1, 0)
        for done in range(1, 4):
            await clock.advance(1.0)
            statuses = [(await retrieve(session, t))[0] for t in tokens]
            assert statuses == [200] * done + [202] * (3 - done)
        assert sorted(r.started_at for r in emu.state.runs.values()) == [0.0, 1.0, 2.0]


async def test_rate_limit_answers_429_with_retry_after() -> None:
    """Beyond the burst, calls of a key get 429 + Retry-After (ceil, >= 1); other keys do not."""
    clock = FakeClock()
    async with serve(clock, api_keys=("alpha", "bravo"), rate_limit=0.4, burst=2) as (
        emu,
        session,
    ):
        assert (await retrieve(session, "x", key="alpha"))[0] == 401
        assert (await submit(session, key="alpha"))[0] == 202
        status, body, headers = await retrieve(session, "x", key="alpha")
        assert status == 429 and "rate limit" in body["detail"]
        assert headers["Retry-After"] == "3"  # one token every 2.5 s
        status, _, _ = await submit(session, key="alpha")
        assert status == 429
        assert (await retrieve(session, "x", key="bravo"))[0] == 401
        await clock.advance(2.5)
        assert (await retrieve(session, "x", key="alpha"))[0] == 401
        assert emu.stats()["rate_limited"] == 2


async def test_error_rate_answers_503_before_doing_anything() -> None:
    """error_rate=1: every call is 503 with Retry-After: 1, and no run is created."""
    async with serve(error_rate=1.0) as (emu, session):
        status, body, headers = await submit(session)
        assert status == 503 and headers["Retry-After"] == "1" and "detail" in body
        status, _, headers = await retrieve(session, "x")
        assert status == 503 and headers["Retry-After"] == "1"
        stats = emu.stats()
        assert stats["runs_created"] == 0 and stats["errors_injected"] == 2


# -- idempotency ------------------------------------------------------------------------------


async def test_idempotency_key_replays_the_same_run() -> None:
    """The same Idempotency-Key returns the same run; another key or content does not."""
    clock = FakeClock()
    async with serve(clock, api_keys=("alpha", "bravo"), idempotency_ttl=100.0) as (
        emu,
        session,
    ):
        state = emu.state

        async def run_of(key: str, idem: str, files: list[tuple[str, bytes]] = FOLDER) -> Any:
            status, body, _ = await submit(
                session, files, key=key, headers={"Idempotency-Key": idem}
            )
            if status != 202:
                return status
            opened = state.open_token(body["retrieve_token"])
            assert opened is not None
            return opened[0]

        first = await run_of("alpha", "row-1")
        assert await run_of("alpha", "row-1") == first
        assert await run_of("bravo", "row-1") != first  # scoped per API key
        assert await run_of("alpha", "row-1", [("other.pdf", b"x")]) == 422
        stats = emu.stats()
        assert stats["idempotent_replays"] == 1 and stats["runs_created"] == 2
        assert stats["duplicate_submissions"] == 0
        await clock.advance(100.0)
        assert await run_of("alpha", "row-1") != first  # expired: a new run
        without = {await run_of("alpha", str(i)) for i in range(2)}
        assert len(without) == 2


# -- faults -----------------------------------------------------------------------------------


async def test_reset_before_body_cuts_the_connection_and_creates_nothing() -> None:
    """The client sees a connection error; no run exists."""
    async with serve(reset_before_body_rate=1.0) as (emu, session):
        with pytest.raises(aiohttp.ClientConnectionError):
            await submit(session, files=[("big.pdf", b"x" * 300_000)])
        stats = emu.stats()
        assert stats["runs_created"] == 0
        assert stats["faults_injected"]["reset_before_body"] == 1
        assert stats["submissions_by_status"] == {"aborted": 1}


async def test_drop_after_create_loses_the_202_but_the_run_exists() -> None:
    """The client sees a disconnect, yet the run was created; a retry with the key replays it."""
    async with serve(drop_after_create_rate=1.0) as (emu, session):
        headers = {"Idempotency-Key": "row-7"}
        for _ in range(2):
            with pytest.raises(aiohttp.ServerDisconnectedError):
                await submit(session, headers=headers)
        stats = emu.stats()
        assert stats["runs_created"] == 1 and stats["idempotent_replays"] == 1
        assert stats["faults_injected"]["drop_after_create"] == 2
        listed = (await get_json(session, "/_emulator/submissions"))["submissions"]
        assert listed[0]["http_status"] == "aborted" and listed[0]["replays"] == 1


async def test_stall_delays_the_answer_after_the_work_is_done() -> None:
    """A stalled POST /case times out on the client although its run was created."""
    async with serve(stall_rate=1.0, stall_seconds=0.3) as (emu, session):
        with pytest.raises(asyncio.TimeoutError):
            async with asyncio.timeout(0.05):
                await submit(session)
        assert emu.stats()["runs_created"] == 1
        assert emu.stats()["faults_injected"]["stall"] == 1


async def test_malformed_json_on_retrieve() -> None:
    """malformed_json_rate=1: retrieve keeps its 202/200 status but the body does not parse."""
    clock = FakeClock()
    async with serve(clock, processing_time=(1.0, 1.0), malformed_json_rate=1.0) as (
        emu,
        session,
    ):
        token = await submit_async(session)
        for expected_status in (202, 200):
            async with session.post(
                "/case/retrieve", json={"retrieve_token": token}, headers={"api-key": KEY}
            ) as resp:
                assert resp.status == expected_status
                with pytest.raises(ValueError):
                    json.loads(await resp.text())
            await clock.advance(1.0)
        assert emu.stats()["faults_injected"]["malformed_json"] == 2


async def test_keepalive_timeout_closes_idle_connections() -> None:
    """The server closes an idle keep-alive connection after keepalive_timeout."""
    async with serve(keepalive_timeout=0.2) as (emu, _):
        port = int(emu.base_url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                b"GET /_emulator/stats HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n"
            )
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            length = int(re.search(rb"Content-Length: (\d+)", head, re.I).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            assert await asyncio.wait_for(reader.read(), timeout=3) == b""  # EOF: closed
        finally:
            writer.close()
            await writer.wait_closed()


# -- observability, TLS, CLI ------------------------------------------------------------------


async def test_stats_and_submissions_endpoints() -> None:
    """Stats have the documented keys; submissions list files, digest and status, no keys."""
    async with serve(api_keys=("alpha-secret",)) as (_, session):
        token = await submit_async(session, key="alpha-secret", headers={"Idempotency-Key": "r1"})
        await poll_until_final(session, token, key="alpha-secret")
        stats = await get_json(session, "/_emulator/stats")
        assert set(stats) == {
            "submissions", "submissions_by_status", "polls", "polls_by_status", "rate_limited",
            "errors_injected", "faults_injected", "bytes_received", "duplicate_submissions",
            "idempotent_replays", "runs_created", "runs", "max_parallel_observed",
            "in_flight_requests", "max_in_flight_requests",
        }  # fmt: skip
        assert stats["submissions"] == 1 and stats["submissions_by_status"] == {"202": 1}
        assert stats["bytes_received"] == sum(len(d) for _, d in FOLDER)
        async with session.get("/_emulator/submissions") as resp:
            text = await resp.text()
        assert "alpha-secret" not in text
        (record,) = json.loads(text)["submissions"]
        assert record["files"] == [
            {"name": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in FOLDER
        ]
        assert record["digest"] == digest_of(FOLDER) and record["status"] == "completed"
        assert record["idempotency_key"] == "r1" and RUN_ID.match(record["run_id"])


async def test_serves_https_with_a_given_ssl_context() -> None:
    """With ssl_context the emulator serves HTTPS and its base_url says so."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    config = EmulatorConfig(processing_time=FAST)
    async with run_emulator(config, ssl_context=server_ctx) as emu:
        assert emu.base_url.startswith("https://127.0.0.1:")
        connector = aiohttp.TCPConnector(ssl=client_ctx)
        async with aiohttp.ClientSession(emu.base_url, connector=connector) as session:
            status, body, _ = await submit(session, asynchronous=False)
            assert status == 200 and "decision" in body


@pytest.mark.timeout(15)
def test_cli_starts_prints_its_url_answers_and_stops_on_sigint() -> None:
    """The CLI on port 0 prints its URL (not its keys), serves the API and exits 0 on SIGINT."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [
        sys.executable, "-m", "bulk_engine.emulator", "--port", "0",
        "--api-keys", "alpha-secret,bravo-secret", "--processing-time", "0.01:0.02",
    ]  # fmt: skip
    with subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            match = re.fullmatch(
                r"emulator listening on (http://127\.0\.0\.1:(\d+)) \(keys: 2\)\n", line
            )
            assert match, line
            assert int(match.group(2)) > 0
            base_url = match.group(1)
            payload = {"payload": json.dumps({"analyse_type": ["decision"]})}
            files = [("documents", (name, data)) for name, data in FOLDER]
            answer = requests.post(
                f"{base_url}/case",
                headers={"api-key": "bravo-secret"},
                files=files,
                data=payload,
                timeout=5,
            )
            assert answer.status_code == 200 and "decision" in answer.json()
            refused = requests.post(
                f"{base_url}/case", headers={"api-key": "nope"}, files=files, timeout=5
            )
            assert refused.status_code == 401
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=5)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        assert "secret" not in line + out + err


# -- limits changed mid-run -------------------------------------------------------------------


def _state_submit(state: EmulatorState, n: int) -> list[Any]:
    """Create ``n`` async runs directly on a sans-I/O state; return them in order."""
    from bulk_engine.emulator.upload import Payload, Upload

    return [state.submit(0, Upload(Payload(asynchronous=True), (), f"{i:064x}"), None).run
            for i in range(n)]


async def test_lowering_the_cap_delays_only_later_runs() -> None:
    """Cap 4 -> 2 at t=0.5: the runs already started keep their start; the next ones start
    only while fewer than two run, then the cap goes back to 4."""
    clock = FakeClock()
    state = EmulatorState(EmulatorConfig(processing_time=(1.0, 1.0), max_parallel_analyses=4,
                                         seed=1), clock=clock)
    first = _state_submit(state, 4)
    assert [r.started_at for r in first] == [0.0] * 4
    await clock.advance(0.5)
    assert state.set_limits(max_parallel_analyses=2).max_parallel_analyses == 2
    later = _state_submit(state, 3)
    # Two of the four must finish (t=1.0) before a third run may start: then one at a time
    # per slot, each lasting 1 s.
    assert [r.started_at for r in later] == [1.0, 1.0, 2.0]
    await clock.advance(2.0)
    state.set_limits(max_parallel_analyses=4)
    (after,) = _state_submit(state, 1)
    assert after.started_at == 2.5  # only two run at 2.5: room at once
    assert state.limits()["max_parallel_analyses"] == 4


async def test_rate_limit_can_be_changed_removed_and_restored() -> None:
    """set_limits changes every key's bucket: tokens earned so far count at the old rate."""
    clock = FakeClock()
    state = EmulatorState(EmulatorConfig(rate_limit=2.0, burst=1, seed=1), clock=clock)
    assert state.take_rate_token(0) == 0.0
    assert state.take_rate_token(0) == pytest.approx(0.5)
    await clock.advance(0.25)  # half a token earned at 2/s
    state.set_limits(rate_limit=1.0)
    assert state.take_rate_token(0) == pytest.approx(0.5)  # the other half at 1/s
    state.set_limits(rate_limit=None)
    assert [state.take_rate_token(0) for _ in range(5)] == [0.0] * 5
    state.set_limits(rate_limit=4.0, burst=2)
    assert state.take_rate_token(0) > 0.0  # a restored bucket starts empty
    assert state.limits() == {"max_parallel_analyses": 10, "rate_limit": 4.0, "burst": 2}


def test_set_limits_rejects_invalid_values_and_changes_nothing() -> None:
    state = EmulatorState(EmulatorConfig(rate_limit=5.0, seed=1), clock=FakeClock())
    for bad in ({"max_parallel_analyses": 0}, {"rate_limit": -1.0}, {"burst": 0},
                {"max_parallel_analyses": "3"}):
        with pytest.raises(ValueError):
            state.set_limits(**bad)  # type: ignore[arg-type]
    assert state.limits() == {"max_parallel_analyses": 10, "rate_limit": 5.0, "burst": 10}


async def test_limits_endpoint_changes_the_cap_and_rate_mid_run() -> None:
    """GET/POST /_emulator/limits: no key needed; a 429 follows the new rate; 400 on bad input."""
    clock = FakeClock()
    async with serve(clock, max_parallel_analyses=3, processing_time=(1.0, 1.0)) as (emu, session):
        assert await get_json(session, "/_emulator/limits") == {
            "max_parallel_analyses": 3, "rate_limit": None, "burst": 10}
        async with session.post("/_emulator/limits",
                                json={"max_parallel_analyses": 1, "rate_limit": 1,
                                      "burst": 1}) as resp:
            assert resp.status == 200
            assert await resp.json() == {"max_parallel_analyses": 1, "rate_limit": 1,
                                         "burst": 1}
        assert (await submit(session))[0] == 429  # a new bucket starts empty
        await clock.advance(1.0)
        await submit_async(session)
        assert (await submit(session))[0] == 429
        for body in ({"max_parallel_analyses": 0}, {"nope": 1}, [1]):
            async with session.post("/_emulator/limits", json=body) as resp:
                assert resp.status == 400
                assert "detail" in await resp.json()
        async with session.post("/_emulator/limits", data=b"{not json") as resp:
            assert resp.status == 400
        assert emu.state.limits()["max_parallel_analyses"] == 1
