"""`python -m soak` (what `make soak` runs); `python -m soak --help` lists the parameters."""

from soak.run import main

raise SystemExit(main())
