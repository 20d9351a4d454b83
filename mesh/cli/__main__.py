"""`python -m mesh.cli`: the same as the `mesh` console script."""

from mesh.cli.entry import main

raise SystemExit(main())
