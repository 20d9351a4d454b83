from mesh.cli.entry import main

raise SystemExit(main())
