"""`sl-pipeline`: the command line (``workers.cli.main`` is the console script)."""

from workers.cli.commands import main

__all__ = ["main"]
