from bulk_engine.emulator.cli import main

raise SystemExit(main())
