"""One progress-bar style for every long loop: description, bar, counts, elapsed and ETA."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Results go to stdout, progress to stderr, so `puzzle … > result.txt` keeps only results.
# Piped output gets a wide fixed width instead of rich's 80 columns, so tables stay one row a line.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
console = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 160)


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
    )
