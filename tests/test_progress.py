"""Off a terminal (a cluster job's log), long loops print plain progress lines instead of a silent live bar."""

import re

from puzzle.progress import LoggedProgress, progress_bar


def test_a_redirected_log_gets_plain_lines_with_counts_rate_eta_and_memory(monkeypatch, capsys):
    monkeypatch.setenv("PUZZLE_LOG_SECONDS", "0")
    bar = progress_bar()
    assert isinstance(bar, LoggedProgress)  # pytest's captured stderr is not a terminal
    with bar:
        task = bar.add_task("BLD 4 candidates", total=3, status="")
        for step in range(1, 4):
            bar.update(task, completed=step, status=f"step {step}/3")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("BLD 4 candidates")]
    assert len(lines) == 3
    assert re.match(r"BLD 4 candidates: 3/3 \([0-9.e+-]+/s\), \d+ s elapsed, eta 0 s, peak RSS [0-9.]+ GiB; step 3/3$",
                    lines[-1]), lines[-1]


def test_lines_come_at_most_every_interval_and_once_at_the_end(monkeypatch, capsys):
    monkeypatch.setenv("PUZZLE_LOG_SECONDS", "3600")
    with progress_bar() as bar:
        task = bar.add_task("score blocks", total=50, status="")
        for _ in range(50):
            bar.advance(task)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("score blocks")]
    assert len(lines) == 1 and lines[0].startswith("score blocks: 50/50")
