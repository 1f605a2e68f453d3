"""Settings: every field documented in config/default.toml, precedence, precise errors."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from bulk_engine.config import Settings, _coerce, load_settings, read_toml, unknown_env
from bulk_engine.errors import ConfigError

DEFAULT_TOML = Path(__file__).resolve().parent.parent / "config" / "default.toml"
FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def _documented() -> tuple[dict[str, Any], set[str], list[str]]:
    """(active keys with values, commented-out keys, lines without a comment)."""
    text = DEFAULT_TOML.read_text(encoding="utf-8")
    active = tomllib.loads(text)
    commented = set(re.findall(r"^#\s*([a-z0-9_]+)\s*=", text, flags=re.M))
    bare = [line for line in text.splitlines()
            if re.match(r"^#?\s*[a-z0-9_]+\s*=", line) and "  # " not in line]
    return active, commented, bare


def test_default_toml_documents_every_setting() -> None:
    """Every Settings field appears in default.toml (set, or commented when it has no default)."""
    active, commented, _ = _documented()
    documented = set(active) | commented
    assert documented == set(FIELDS), (
        f"missing: {sorted(set(FIELDS) - documented)}, unknown: {sorted(documented - set(FIELDS))}"
    )
    assert not set(active) & commented


def test_default_toml_values_are_the_defaults() -> None:
    """An active entry holds the field's default; a commented one is a field defaulting to None."""
    active, commented, _ = _documented()
    defaults = Settings()
    for name, value in active.items():
        assert _coerce(name, value) == getattr(defaults, name), name
    for name in commented:
        assert getattr(defaults, name) is None, name
    assert load_settings(config_file=DEFAULT_TOML, environ={}) == defaults


def test_default_toml_comments_every_line() -> None:
    """Each setting line carries a one-line comment saying what it is."""
    _, _, bare = _documented()
    assert bare == []


def test_precedence_cli_over_env_over_file_over_defaults(tmp_path: Path) -> None:
    """CLI > BULK_ENGINE_* > --config file > defaults, field by field."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("concurrency = 3\nrate_limit = 5.0\npoll_min = 12.0\n")
    env = {"BULK_ENGINE_RATE_LIMIT": "7", "BULK_ENGINE_POLL_MIN": "13"}
    s = load_settings(cli={"poll_min": 14.0, "burst": None}, environ=env, config_file=cfg)
    assert s.concurrency == 3  # file
    assert s.rate_limit == 7.0  # env over file
    assert s.poll_min == 14.0  # CLI over env
    assert s.burst == Settings().burst  # None on the CLI means "not given"


def test_config_file_from_environment_and_cli_wins(tmp_path: Path) -> None:
    """BULK_ENGINE_CONFIG names a file; --config replaces it."""
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text("concurrency = 4\n")
    b.write_text("concurrency = 5\n")
    assert load_settings(environ={"BULK_ENGINE_CONFIG": str(a)}).concurrency == 4
    assert load_settings(environ={"BULK_ENGINE_CONFIG": str(a)}, config_file=b).concurrency == 5


def test_toml_table_dashes_and_foreign_tables(tmp_path: Path) -> None:
    """Keys may sit in [bulk_engine], use dashes; other tables ([emulator]) are ignored."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('[bulk_engine]\nmax-outstanding = 99\nanalyse_type = ["decision", '
                   '"share_link"]\n[emulator]\nrate_limit = 1\n')
    s = load_settings(config_file=cfg, environ={})
    assert s.max_outstanding == 99
    assert s.analyse_type == ("decision", "share_link")
    assert s.rate_limit == Settings().rate_limit


def test_env_values_are_parsed() -> None:
    """Env strings become bools, lists, paths and numbers."""
    s = load_settings(environ={
        "BULK_ENGINE_FOLLOW_SYMLINKS": "yes", "BULK_ENGINE_IDEMPOTENCY": "0",
        "BULK_ENGINE_ANALYSE_TYPE": "decision;share_link", "BULK_ENGINE_OUTPUT": "~/r.jsonl",
        "BULK_ENGINE_SEED": "42", "BULK_ENGINE_STATUS_INTERVAL": "2.5",
        "BULK_ENGINE_BURST": "",  # empty: unset
    })
    assert s.follow_symlinks is True and s.idempotency is False
    assert s.analyse_type == ("decision", "share_link")
    assert s.output == Path("~/r.jsonl").expanduser()
    assert s.seed == 42 and s.status_interval == 2.5 and s.burst == Settings().burst


@pytest.mark.parametrize(("changes", "message"), [
    ({"concurrency": 0}, "concurrency must be at least 1, got 0"),
    ({"rate_limit": 0.0}, "rate_limit must be a positive number of calls per second, got 0.0"),
    ({"rate_limit": float("inf")}, "rate_limit must be a positive"),
    ({"burst": 0}, "burst must be at least 1, got 0"),
    ({"poll_min": 0.0}, "poll_min must be a positive number of seconds, got 0.0"),
    ({"poll_min": 20.0, "poll_max": 15.0}, "poll_max (15.0) must not be below poll_min (20.0)"),
    ({"poll_max": 3600.0}, "poll_max must stay well inside the 60-minute result window"),
    ({"max_outstanding": 4, "concurrency": 8}, "max_outstanding (4) must be at least concurrency"),
    ({"mode": "fast"}, "mode must be one of async, sync, auto, got 'fast'"),
    ({"analyse_type": ("decision", "verdict")}, "unknown analyse_type 'verdict'; choose from"),
    ({"analyse_type": ()}, "analyse_type needs at least one value"),
    ({"use_case": " "}, "use_case must not be empty"),
    ({"max_attempts": 0}, "max_attempts must be at least 1, got 0"),
    ({"max_retries": -1}, "max_retries must be 0 or more, got -1"),
    ({"retry_base": 5.0, "retry_cap": 1.0}, "retry_cap (1.0) must not be below retry_base (5.0)"),
    ({"submit_timeout": 0.0}, "submit_timeout must be a positive number of seconds"),
    ({"status_interval": -1.0}, "status_interval must be a positive number of seconds, got -1.0"),
    ({"max_file_size": 0}, "max_file_size must be a positive number of bytes, got 0"),
    ({"max_failure_rate": 1.5}, "max_failure_rate must be in (0, 1], got 1.5"),
    ({"log_level": "loud"}, "log_level must be one of debug, info, warning, error, critical"),
    ({"log_format": "xml"}, "log_format must be one of auto, json, console, got 'xml'"),
    ({"base_url": "api.example.com"}, "base_url must be an http:// or https:// URL"),
    ({"ca_bundle": Path("/nonexistent/ca.pem")}, "ca_bundle /nonexistent/ca.pem is not a"),
])
def test_bad_values_give_precise_messages(changes: dict[str, Any], message: str) -> None:
    """Each rule names the setting, the rule and the value it got."""
    with pytest.raises(ConfigError) as info:
        Settings(**changes)
    assert message in str(info.value)


def test_error_says_where_the_bad_value_came_from(tmp_path: Path) -> None:
    """The message ends with the flag, variable or file that set the bad value."""
    with pytest.raises(ConfigError, match=r"got 0 \(from BULK_ENGINE_CONCURRENCY\)$"):
        load_settings(environ={"BULK_ENGINE_CONCURRENCY": "0"})
    with pytest.raises(ConfigError, match=r"\(from --burst\)$"):
        load_settings(environ={}, cli={"burst": 0})
    cfg = tmp_path / "c.toml"
    cfg.write_text("mode = 'turbo'\n")
    with pytest.raises(ConfigError, match=r"got 'turbo' \(from config file .*c\.toml\)$"):
        load_settings(environ={}, config_file=cfg)
    with pytest.raises(ConfigError, match=r"\(poll_min from --poll-min\)$"):
        load_settings(environ={}, cli={"poll_min": 40.0})


@pytest.mark.parametrize(("text", "message"), [
    ("concurrency = 'many'\n", "setting concurrency: expected a whole number, got 'many'"),
    ("concurrency = 2.5\n", "setting concurrency: expected a whole number, got 2.5"),
    ("rate_limit = true\n", "setting rate_limit: expected a number, got True"),
    ("follow_symlinks = 'maybe'\n", "setting follow_symlinks: expected true or false"),
    ("output = 3\n", "setting output: expected a path, got 3"),
    ("concurency = 3\n", "unknown setting 'concurency' (did you mean 'concurrency'?)"),
    ("concurrency = \n", "is not valid TOML"),
])
def test_bad_config_file_values(tmp_path: Path, text: str, message: str) -> None:
    """A bad file entry names the setting, what was expected and what was found."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(environ={}, config_file=cfg)
    assert message in str(info.value)


def test_missing_or_unreadable_config_file(tmp_path: Path) -> None:
    """A config path that is missing or a directory is a ConfigError, not a traceback."""
    with pytest.raises(ConfigError, match="does not exist"):
        read_toml(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="is a directory"):
        read_toml(tmp_path)


def test_env_bad_value_names_the_variable() -> None:
    """A variable that cannot be parsed names itself."""
    with pytest.raises(ConfigError, match=r"expected a number, got 'fast' "
                                          r"\(from BULK_ENGINE_RATE_LIMIT\)"):
        load_settings(environ={"BULK_ENGINE_RATE_LIMIT": "fast"})


def test_unknown_environment_variables_are_listed() -> None:
    """Typos in BULK_ENGINE_* are found; the emulator's and the loader's own are not typos."""
    env = {"BULK_ENGINE_CONCURENCY": "3", "BULK_ENGINE_CONCURRENCY": "3",
           "BULK_ENGINE_EMULATOR_API_KEYS": "k", "BULK_ENGINE_CONFIG": "x", "HOME": "/"}
    assert unknown_env(env) == ["BULK_ENGINE_CONCURENCY"]


def test_api_key_not_in_repr() -> None:
    """The key never shows in a Settings repr (logs, tracebacks)."""
    assert "sekrit" not in repr(Settings(api_key="sekrit"))
