from tallygate.cli import main

raise SystemExit(main())
