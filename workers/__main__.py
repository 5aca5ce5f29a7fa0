"""``python -m workers``: the console script (the package took Ctrl-C before this runs)."""

from workers.cli import console

console()
