"""`sl-pipeline`: the command line. ``console`` is the console script; ``main`` runs one
command and returns its exit status (what tests call in-process)."""

from workers.cli.commands import console, main

__all__ = ["console", "main"]
