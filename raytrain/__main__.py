from raytrain.cli import main

raise SystemExit(main())
