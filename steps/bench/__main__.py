from steps.bench.cli import main

raise SystemExit(main())
