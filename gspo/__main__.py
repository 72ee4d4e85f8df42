"""`python -m gspo ...` is the `gspo` command."""

from gspo.cli import main

raise SystemExit(main())
