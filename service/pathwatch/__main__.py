"""`python -m pathwatch` runs the command-line interface."""

from pathwatch.app.cli import main

raise SystemExit(main())
