from chattune.cli import main

raise SystemExit(main())
