"""`python -m gspo ...` is the `gspo` command."""

from gspo.cli import entry

entry()
