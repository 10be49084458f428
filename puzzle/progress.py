"""One progress style for every long loop: a live bar on a terminal, plain lines in a log.

On a terminal: description, bar, counts, status, elapsed and ETA. When stderr is not a terminal (a cluster
job, a redirected log) a live bar shows nothing until the loop ends, so each task prints a plain line
instead, at most every `PUZZLE_LOG_SECONDS` seconds (default 30) and at its end: counts, rate, elapsed,
ETA, the process's peak memory and the task's status.
"""

from __future__ import annotations

import os
import resource
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Results go to stdout, progress to stderr, so `puzzle … > result.txt` keeps only results.
# Piped output gets a wide fixed width instead of rich's 80 columns, so tables stay one row a line.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
console = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 160)


def _peak_memory() -> str:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    text = f"peak RSS {peak:.2f} GiB"
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        text += f", GPU {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    return text


class LoggedProgress(Progress):
    """A Progress that, off a terminal, writes a plain line per task every `every` seconds and at its end."""

    def __init__(self, *columns, every: float, **kwargs):
        super().__init__(*columns, **kwargs)
        self.every = every
        self._logged: dict[int, float] = {}

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._maybe_log(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._maybe_log(task_id)

    def _maybe_log(self, task_id) -> None:
        task = self._tasks[task_id]
        now = time.monotonic()
        last = self._logged.setdefault(task_id, task.start_time or now)
        finished = task.total is not None and task.completed >= task.total
        if not task.visible or (now - last < self.every and not finished) or self._logged.get(("done", task_id)):
            return
        self._logged[task_id] = now
        if finished:
            self._logged[("done", task_id)] = True
        elapsed = task.elapsed or 0.0
        rate = task.completed / elapsed if elapsed > 0 else 0.0
        eta = f"{(task.total - task.completed) / rate:.0f} s" if rate > 0 and task.total else "?"
        status = task.fields.get("status", "")
        self.console.print(
            f"{task.description}: {task.completed:.0f}/{task.total:.0f} ({rate:.3g}/s), {elapsed:.0f} s elapsed, "
            f"eta {eta}, {_peak_memory()}" + (f"; {status}" if status else ""),
            highlight=False,
        )


def progress_bar() -> Progress:
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    if console.is_terminal:
        return Progress(*columns, console=console)
    return LoggedProgress(*columns, console=console, every=float(os.environ.get("PUZZLE_LOG_SECONDS", "30")),
                          disable=True)
