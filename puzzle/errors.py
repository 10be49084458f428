"""Errors a user can fix. The CLI prints them as one line each and exits with code 2."""

from puzzle.blocks.errors import PuzzleError

__all__ = ["PuzzleError", "ConfigError"]


class ConfigError(PuzzleError):
    """A config that does not validate. Carries every problem found, not only the first."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  {p}" for p in problems))
