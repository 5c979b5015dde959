from neox_progressive.cli import main

raise SystemExit(main())
