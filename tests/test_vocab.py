"""One definition of each vocabulary: the registry of error kinds and the exit codes are what the
README says, and every kind the code can write is registered."""

from __future__ import annotations

import re
from pathlib import Path

from bulk_engine import vocab
from bulk_engine.manifest import BAD_ROW_KINDS
from bulk_engine.report import BAD_COLUMNS, NOT_RERUNNABLE

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    start = README.index(title)
    end = README.index("\n#", start + len(title))
    return README[start:end]


def test_the_readme_lists_exactly_the_registered_error_kinds() -> None:
    """The Output section's kinds are the registry's, bad rows and API kinds alike."""
    text = README[README.index("Error kinds of bad rows"):README.index("### Exit codes")]
    named = set(re.findall(r"`([a-z_]+)`", text)) - {"--retry-failed", "vocab"}
    named -= {w for w in named if "/" in w or w.endswith(".py")}
    assert named == set(vocab.ERROR_KINDS), (
        sorted(named - set(vocab.ERROR_KINDS)), sorted(set(vocab.ERROR_KINDS) - named))


def test_the_readme_names_the_not_final_kinds() -> None:
    """The kinds a plain rerun retries are the transport kinds the README lists as such."""
    text = README[README.index("the transport\nkinds"):README.index("Every kind is **final**")]
    listed = set(re.findall(r"`([a-z_]+)`", text))
    assert listed == set(vocab.NOT_FINAL_KINDS)


def test_the_readme_exit_code_table_is_the_exit_code_enum() -> None:
    """Every row of the exit-code table is an ExitCode, and every ExitCode is in the table."""
    table = _section("### Exit codes")
    codes = {int(c) for c in re.findall(r"^\| (\d+) \|", table, re.M)}
    codes |= {int(c) for c in re.findall(r"\((\d+) for SIGTERM\)", table)}
    assert codes == {int(c) for c in vocab.ExitCode}


def test_derived_lists_come_from_the_registry() -> None:
    """The manifest's bad-row kinds and report's rerun rules are the registry's, not copies."""
    assert set(BAD_ROW_KINDS) == vocab.BAD_ROW_KINDS
    assert NOT_RERUNNABLE == vocab.NOT_RERUNNABLE_KINDS
    assert BAD_COLUMNS == vocab.BAD_COLUMN_KINDS
    assert vocab.NOT_FINAL_KINDS <= vocab.MASS_FAILURE_KINDS
    assert all(vocab.error_kind(k).origin is vocab.Origin.API for k in vocab.NOT_FINAL_KINDS)


_KIND_LITERALS = (
    re.compile(r"\bkind=\"([a-z_]+)\""),
    re.compile(r"ManifestError\(\s*\"([a-z_]+)\""),
    re.compile(r"ErrorInfo\(\s*\"([a-z_]+)\""),
    re.compile(r"RetrieveDecision\([^)]*\"([a-z_]+)\"\)"),
    re.compile(r"\"(token_expired|token_invalid)\""),
)


def test_every_error_kind_the_code_writes_is_registered() -> None:
    """Scan the package for kind literals: each is in the registry (a typo would otherwise
    reach an output line as an unknown kind)."""
    used: dict[str, str] = {}
    for path in (REPO / "bulk_engine").rglob("*.py"):
        if "emulator" in path.parts:
            continue
        text = path.read_text(encoding="utf-8")
        for pattern in _KIND_LITERALS:
            for kind in pattern.findall(text):
                used.setdefault(kind, path.name)
    assert len(used) >= 20  # the scan finds the kinds at all
    unknown = {k: where for k, where in used.items() if k not in vocab.ERROR_KINDS}
    assert unknown == {}
