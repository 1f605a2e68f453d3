"""bulk_engine: backfill document archives through the submit-then-poll Case Analysis API.

    import bulk_engine

    settings = bulk_engine.Settings(base_url=..., api_key=..., output=Path("results.jsonl"))
    result = await bulk_engine.Engine(settings, Path("manifest.csv")).run()  # a RunResult

The names below are imported on first use (anyio's pattern: the ``TYPE_CHECKING`` block is the
one list; at run time it only names what to import lazily), so ``import bulk_engine`` costs
nothing until a name is used, and ``python -m bulk_engine`` guards Ctrl-C from its first line.
Type checkers read the block as ordinary imports: every name is fully typed.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers: True)

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


def _install_lazy_importer() -> bool:
    """Serve the names of the ``TYPE_CHECKING`` block below on first access (PEP 562).

    The block is read from this file's source when a name is first asked for. Returns False
    (the block then imports everything at once) when there is no source file to read.
    """
    import os

    source = globals().get("__file__")
    if not isinstance(source, str) or not os.path.isfile(source):
        return False
    lazy: dict[str, str] = {}
    module_globals = globals()

    def lazy_map() -> dict[str, str]:
        if not lazy:
            import ast

            with open(source, encoding="utf-8") as fh:
                tree = ast.parse(fh.read())
            for node in tree.body:
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                    for stmt in node.body:
                        if isinstance(stmt, ast.ImportFrom) and stmt.module:
                            lazy.update(dict.fromkeys(
                                (a.asname or a.name for a in stmt.names), stmt.module))
        return lazy

    def __getattr__(name: str) -> object:
        module = lazy_map().get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        import importlib

        value = getattr(importlib.import_module(module), name)
        module_globals[name] = value  # imported once: later lookups are plain attributes
        return value

    def __dir__() -> list[str]:
        return sorted({*module_globals, *lazy_map()})

    module_globals["__getattr__"] = __getattr__
    module_globals["__dir__"] = __dir__
    return True


if TYPE_CHECKING or not _install_lazy_importer():
    from bulk_engine.config import Settings, load_settings
    from bulk_engine.engine import Engine, RunResult
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

del TYPE_CHECKING
