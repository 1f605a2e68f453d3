"""TLS: verification on by default, --ca-bundle for a private CA, a clear stop when it fails.

The emulator serves HTTPS with a throwaway trustme CA. Without the CA the engine must stop at
once with a message naming the fix (exit 1), not retry for minutes, hang or print a traceback.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import structlog
import trustme

from bulk_engine.cli import _warn_plain_http
from bulk_engine.config import Settings
from bulk_engine.emulator import Emulator, EmulatorConfig, run_emulator
from bulk_engine.engine import Engine
from bulk_engine.errors import FatalRunError

from archive_factory import make_archive
from conftest import API_KEY, engine_settings, expected_for_folder, read_lines

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_pem(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "private-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@asynccontextmanager
async def https_emulator(ca: trustme.CA, *names: str) -> AsyncIterator[Emulator]:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(names or ("127.0.0.1", "localhost"))).configure_cert(server_ctx)
    cfg = EmulatorConfig(api_keys=(API_KEY,), processing_time=(0.01, 0.03), seed=1)
    async with run_emulator(cfg, ssl_context=server_ctx, shutdown_timeout=0.1) as emu:
        assert emu.base_url.startswith("https://")
        yield emu


@pytest.fixture
async def emu(ca: trustme.CA) -> AsyncIterator[Emulator]:
    async with https_emulator(ca) as e:
        yield e


async def test_https_with_the_private_ca_bundle_completes(
    emu: Emulator, ca_pem: Path, tmp_path: Path
) -> None:
    """--ca-bundle with the private CA: the run completes over HTTPS, results intact."""
    manifest = make_archive(tmp_path / "a", 6, seed=1)
    out = tmp_path / "out.jsonl"
    res = await Engine(engine_settings(emu.base_url, out, ca_bundle=ca_pem), manifest).run()
    assert res.exit_code == 0
    lines = read_lines(out)
    assert len(lines) == 6
    for rec in lines:
        assert rec["result"] == expected_for_folder(manifest.parent / "cases" / rec["id"])


async def test_unknown_ca_stops_the_run_at_once_with_a_clear_error(
    emu: Emulator, tmp_path: Path
) -> None:
    """Verification is on by default: an unknown CA is fatal (exit 1), not retried per row."""
    manifest = make_archive(tmp_path / "a", 30, seed=2)
    out = tmp_path / "out.jsonl"
    engine = Engine(engine_settings(emu.base_url, out), manifest)
    res = await engine.run()
    assert res.exit_code == 1
    assert isinstance(res.error, FatalRunError)
    msg = str(res.error)
    assert "certificate" in msg and "--ca-bundle" in msg
    assert engine.client is not None and engine.client.stats.retries == 0
    assert emu.stats()["submissions"] == 0  # no request got through
    assert not out.exists() or read_lines(out) == []


async def test_hostname_mismatch_is_fatal_even_with_the_ca(
    ca: trustme.CA, ca_pem: Path, tmp_path: Path
) -> None:
    """A certificate for another host fails verification too, with the same clear stop."""
    manifest = make_archive(tmp_path / "a", 3, seed=3)
    async with https_emulator(ca, "api.example.com") as emu:
        res = await Engine(engine_settings(emu.base_url, tmp_path / "o.jsonl", ca_bundle=ca_pem),
                           manifest).run()
        assert res.exit_code == 1 and "certificate" in str(res.error)


async def test_cli_without_ca_prints_one_clear_line_and_exits_1(
    emu: Emulator, tmp_path: Path
) -> None:
    """Through the CLI: exit 1 within seconds, an `error:` line naming --ca-bundle, no traceback."""
    manifest = make_archive(tmp_path / "a", 5, seed=4)
    env = {**os.environ, "BULK_ENGINE_API_KEY": API_KEY}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bulk_engine", str(manifest), "--base-url", emu.base_url,
        "--output", str(tmp_path / "out.jsonl"), "--no-progress", "--log-format", "json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 25)
    err = stderr.decode()
    assert proc.returncode == 1, err
    assert "error:" in err and "--ca-bundle" in err
    assert "Traceback" not in err + stdout.decode()


async def test_cli_with_ca_bundle_flag_completes(
    emu: Emulator, ca_pem: Path, tmp_path: Path
) -> None:
    """`--ca-bundle FILE` on the command line: exit 0."""
    manifest = make_archive(tmp_path / "a", 3, seed=5)
    env = {**os.environ, "BULK_ENGINE_API_KEY": API_KEY}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bulk_engine", str(manifest), "--base-url", emu.base_url,
        "--ca-bundle", str(ca_pem), "--output", str(tmp_path / "out.jsonl"), "--no-progress",
        "--poll-min", "0.05", "--poll-max", "0.2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), 25)
    assert proc.returncode == 0, stderr.decode()
    assert len(read_lines(tmp_path / "out.jsonl")) == 3


def test_missing_ca_bundle_file_is_a_config_error(tmp_path: Path) -> None:
    """A --ca-bundle that does not exist is refused before any network use."""
    from bulk_engine.errors import ConfigError

    with pytest.raises(ConfigError, match="ca_bundle"):
        Settings(api_key="k", ca_bundle=tmp_path / "nope.pem")


@pytest.mark.parametrize(
    ("url", "warns"),
    [
        ("http://api.example.com", True),
        ("http://10.1.2.3:8080", True),
        ("http://127.0.0.1:8080", False),
        ("http://localhost:8080", False),
        ("http://[::1]:8080", False),
        ("https://api.example.com", False),
    ],
)
def test_plain_http_to_a_non_loopback_host_warns(url: str, warns: bool) -> None:
    """The key would travel in clear text: plain http:// to anything but loopback warns."""
    with structlog.testing.capture_logs() as logs:
        _warn_plain_http(Settings(base_url=url, api_key="k"))
    warned = [e for e in logs if e["event"] == "plain_http"]
    assert bool(warned) is warns
    if warns:
        assert warned[0]["log_level"] == "warning" and "https" in warned[0]["hint"]
