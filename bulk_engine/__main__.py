from bulk_engine.cli import main

raise SystemExit(main())
