"""`python -m bench` (what `make bench` runs); `python -m bench --help` lists the parameters."""

from bench.run import main

raise SystemExit(main())
