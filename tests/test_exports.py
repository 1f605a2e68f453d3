"""The package's public surface: `__all__` everywhere, typed lazy exports, no import cycles, and
the README's "Use from Python" example, run and type-checked as a user would.

In the style of httpx's `tests/test_exported_members.py`: a module's `__all__` lists exactly its
public names (every top-level def, class and assignment not starting with `_`; for a package's
`__init__`, what it imports too), sorted as ruff's RUF022 sorts it.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import bulk_engine

from procs import child_env

REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(bulk_engine.__file__).resolve().parent
# Module-level loggers (`log = get_logger()`) are plumbing, not API.
NOT_API = frozenset({"log"})


def _modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


MODULES = dict(_modules())


def _tree(name: str) -> ast.Module:
    return ast.parse(MODULES[name].read_text(encoding="utf-8"))


def _is_type_checking(test: ast.expr) -> bool:
    return "TYPE_CHECKING" in ast.unparse(test)


def _top_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Top-level statements, looking into `if`/`try` blocks (not into defs or classes)."""
    for node in body:
        yield node
        if isinstance(node, ast.If):
            yield from _top_level(node.body)
            yield from _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody,
                          *(h.body for h in node.handlers)):
                yield from _top_level(block)


def _public_names(name: str) -> set[str]:
    """What the module defines (and, for a package, imports) under a public name."""
    is_package = MODULES[name].name == "__init__.py"
    names: set[str] = set()
    for node in _top_level(_tree(name).body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif is_package and isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return {n for n in names if not n.startswith("_") and n not in NOT_API
            and n not in ("annotations", "TYPE_CHECKING")}


def _all_values(name: str) -> list[list[str]]:
    """Every top-level `__all__ = [...]` (or `__all__: list[str] = []`) of the module."""
    found = []
    for node in _tree(name).body:
        if isinstance(node, ast.Assign):
            named = any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            named = isinstance(node.target, ast.Name) and node.target.id == "__all__"
        else:
            continue
        if named:
            found.append(list(ast.literal_eval(node.value)))
    return found


def _declared_all(name: str) -> list[str] | None:
    values = _all_values(name)
    return values[0] if values else None


def _ruff_order(names: list[str]) -> list[str]:
    """RUF022's isort-style order: SCREAMING_CASE, then CamelCase, then the rest."""
    def key(n: str) -> tuple[int, str]:
        group = 0 if n.isupper() and len(n) > 1 else 1 if n[:1].isupper() else 2
        return group, n

    return sorted(names, key=key)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_all_lists_exactly_the_public_names_sorted(name: str) -> None:
    """`__all__` exists, is sorted, has no duplicates, names every public name and only those,
    and each of its names resolves on the imported module."""
    declared = _declared_all(name)
    assert declared is not None, f"{name} has no __all__"
    assert len(_all_values(name)) == 1, f"{name} sets __all__ more than once"
    assert declared == _ruff_order(declared), f"{name}.__all__ is not sorted"
    assert len(set(declared)) == len(declared), f"{name}.__all__ has duplicates"
    public = _public_names(name)
    assert sorted(set(declared) - public) == [], f"{name}.__all__ names what it does not define"
    assert sorted(public - set(declared)) == [], f"public names missing from {name}.__all__"
    if not name.endswith("__main__"):  # importing those would run them
        module = importlib.import_module(name)
        assert [n for n in declared if not hasattr(module, n)] == []


def test_package_exports_are_lazy_typed_and_complete() -> None:
    """`import bulk_engine` imports nothing else; each exported name then resolves (and is
    cached), `dir()` lists them; the TYPE_CHECKING block (what mypy reads) is `__all__`."""
    block: list[str] = []
    for node in _tree("bulk_engine").body:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            block += [a.asname or a.name for stmt in node.body
                      if isinstance(stmt, ast.ImportFrom) for a in stmt.names]
    assert sorted(block) == sorted(bulk_engine.__all__)
    code = """
import sys
import bulk_engine
loaded = sorted(m for m in sys.modules if m.startswith("bulk_engine"))
assert loaded == ["bulk_engine"], loaded
assert set(bulk_engine.__all__) <= set(dir(bulk_engine))
for name in bulk_engine.__all__:
    value = getattr(bulk_engine, name)
    assert vars(bulk_engine)[name] is value, name
from bulk_engine import Engine, RunResult, Settings
from bulk_engine.engine import Engine as E, RunResult as R
from bulk_engine.config import Settings as S
assert (Engine, RunResult, Settings) == (E, R, S)
try:
    bulk_engine.NoSuchThing
except AttributeError as exc:
    assert "NoSuchThing" in str(exc)
else:
    raise AssertionError("no AttributeError")
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=child_env())
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def _runtime_imports(name: str) -> set[str]:
    """The package's modules that ``name`` imports when it runs, at any depth of its code
    (functions included: a cycle through a lazy import is still a cycle), but not under
    ``if TYPE_CHECKING:``."""
    out: set[str] = set()
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            for a in node.names:  # `from pkg import submodule` imports the submodule
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(_tree(name))
    return {m for m in out if m in MODULES and m != name}


def test_the_import_graph_has_no_cycle() -> None:
    """No module imports, directly or through others, a module that imports it back; the demo,
    bench, runner, plan and report never import the CLI (it is the top, they are the library)."""
    graph = {name: _runtime_imports(name) for name in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                walk(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    assert cycles == []
    importers_of_cli = sorted(n for n, deps in graph.items() if "bulk_engine.cli" in deps)
    assert importers_of_cli == ["bulk_engine.__main__"]
    assert "bulk_engine.runner" in graph["bulk_engine.demo"]
    assert "bulk_engine.runner" in graph["bulk_engine.bench"]


def _readme_example() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Use from Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert blocks, "no ```python block under ## Use from Python"
    return str(blocks[0])


USER_SCRIPT = '''\
"""A user's script: the exports are fully typed (no Any, no object)."""
from pathlib import Path
from typing import assert_type

import bulk_engine
from bulk_engine import ConfigError, Engine, RunResult, Settings, load_settings


async def backfill(manifest: Path) -> int:
    settings = Settings(base_url="https://api.example", api_key="k", output=Path("o.jsonl"))
    assert_type(settings.rate_limit, float | None)
    engine = Engine(settings, manifest)
    result = await engine.run()
    assert_type(result, RunResult)
    assert_type(result.exit_code, int)
    assert_type(result.interrupted, bool)
    assert_type(bulk_engine.Engine, type[Engine])
    assert_type(bulk_engine.Settings, type[Settings])
    assert_type(load_settings(cli={"concurrency": 4}), Settings)
    engine.interrupt()
    return result.exit_code


def fails() -> None:
    raise ConfigError("bad")
'''


@pytest.mark.timeout(120)
def test_a_user_script_passes_mypy_strict(tmp_path: Path) -> None:
    """`mypy --strict` on a user's script and on the README's example: Engine, Settings and
    RunResult reach the user typed, through the lazy exports."""
    (tmp_path / "user_script.py").write_text(USER_SCRIPT, encoding="utf-8")
    (tmp_path / "readme_example.py").write_text(_readme_example(), encoding="utf-8")
    # The package as imported (this tree, or site-packages on a non-editable install), copied
    # alone onto MYPYPATH: pointing MYPYPATH at site-packages would make mypy read every other
    # module there as the user's own ("shadows library module"). Third-party packages are not
    # analysed (speed): the point is bulk_engine's own annotations, which mypy reads in full.
    shutil.copytree(PACKAGE, tmp_path / "src" / "bulk_engine",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = child_env(MYPYPATH=str(tmp_path / "src"))
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-site-packages",
         "--ignore-missing-imports", "--follow-imports=silent", "--config-file", os.devnull,
         "--cache-dir", str(tmp_path / ".mypy_cache"), "--no-error-summary",
         "user_script.py", "readme_example.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=110, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.timeout(90)
def test_the_readme_python_example_runs(tmp_path: Path) -> None:
    """The README's "Use from Python" block, run as a script: exit code 0, both rows completed,
    one line each; run again, it resumes (nothing left to do)."""
    script = tmp_path / "example.py"
    script.write_text(_readme_example(), encoding="utf-8")
    for _ in range(2):
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                              text=True, timeout=80, env=child_env())
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("exit code 0 "), proc.stdout
    lines = [json.loads(x) for x in (tmp_path / "example" / "results.jsonl").read_text()
             .splitlines()]
    assert sorted((r["id"], r["status"]) for r in lines) == [
        ("case-1", "completed"), ("case-2", "completed")]
    assert "{'completed': 2}" not in proc.stdout  # the rerun had nothing left to do
