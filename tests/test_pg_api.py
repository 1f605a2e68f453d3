"""The bulk_engine.pg package surface, and how its tests behave without PostgreSQL."""

from __future__ import annotations

import subprocess
import sys

import pytest

import bulk_engine.pg as pg

import pg_cluster


def test_all_lists_only_names_the_package_exports() -> None:
    """Every name in __all__ exists, once; every public class or function imported is in it."""
    assert len(set(pg.__all__)) == len(pg.__all__)
    assert all(hasattr(pg, name) for name in pg.__all__)
    public = {n for n, v in vars(pg).items() if not n.startswith("_")
              and getattr(v, "__module__", "").startswith("bulk_engine.pg")}
    assert public <= set(pg.__all__)


def test_without_the_postgres_extra_the_error_says_what_to_install() -> None:
    """--db without asyncpg installed: a ConfigError naming the extra to install."""
    code = "import sys; sys.modules['asyncpg'] = None; import bulk_engine.pg"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert "ConfigError" in proc.stderr
    assert "pip install 'bulk-engine[postgres]'" in proc.stderr


def _missing() -> None:
    raise pg_cluster.PostgresMissing("PostgreSQL server binaries not found")


def test_postgres_tests_fail_under_ci_when_postgresql_is_missing(
        monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """With CI=true a missing PostgreSQL fails the tests (CI must install it) ..."""
    monkeypatch.setattr(pg_cluster, "_cluster", None)
    monkeypatch.setattr(pg_cluster, "find_bindir", _missing)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        pg_cluster._session_cluster(request.config)


def test_postgres_tests_skip_elsewhere_when_postgresql_is_missing(
        monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """... and only skip on a developer's machine without it."""
    monkeypatch.setattr(pg_cluster, "_cluster", None)
    monkeypatch.setattr(pg_cluster, "find_bindir", _missing)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        pg_cluster._session_cluster(request.config)
