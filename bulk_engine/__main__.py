"""``python -m bulk_engine``: the command line (``cli.main``), Ctrl-C guarded from the start.

The guard covers the imports too (half a second of rich, aiohttp, structlog...): a Ctrl-C there
is a short message and exit 130 (``vocab.ExitCode.INTERRUPTED``), not a traceback. ``entry`` is
also the right target for a console script, for the same reason.
"""

__all__ = ["entry"]


def entry() -> None:
    """Run the command line and exit with its code; Ctrl-C at any moment exits 130 quietly."""
    try:
        from bulk_engine.cli import main

        code = int(main())
    except KeyboardInterrupt:
        # Only the imports of the CLI can get here (``cli.main`` answers a Ctrl-C itself once
        # it runs): nothing is open and nothing is to save. Leave without the interpreter's
        # finalization, which an import cut short (its module half made, its threads or locks
        # in any state) has no reason to be trusted to finish: a CI run once hung for a minute
        # after a Ctrl-C during the imports.
        import os
        import signal
        import sys

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not break the exit
        try:
            sys.stderr.write("\ninterrupted (Ctrl-C)\n")
            sys.stderr.flush()
        finally:
            os._exit(130)
    # CPython: a KeyboardInterrupt raised inside a string exec() (dataclasses and namedtuple
    # build their methods that way, so any import can be in one) marks the interpreter as
    # "ended by an unhandled KeyboardInterrupt" even when it was caught, and under `python -m`
    # the process then kills itself with SIGINT at exit instead of exiting with our code. Every
    # string exec() begins by clearing that mark.
    exec("")
    raise SystemExit(code)


if __name__ == "__main__":
    entry()
