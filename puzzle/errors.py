"""Errors a user can fix. The CLI prints them as one line each and exits with code 2.

A leaf module (it imports nothing of puzzle), so that every package, `puzzle.blocks` included, can raise them.
"""


class PuzzleError(Exception):
    """A problem with the user's input (config, paths, data, model); never a bug in puzzle."""


class ConfigError(PuzzleError):
    """A config that does not validate. Carries every problem found, not only the first."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        self.source = source
        # The configs with every bad key at its default, when they could be made: the checks of files and
        # data run on them, so one run reports a bad budget and a damaged parent file together.
        self.partial: list | None = None
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  {p}" for p in problems))
