from bulk_engine.emulator.cli import main

__all__: list[str] = []

raise SystemExit(main())
