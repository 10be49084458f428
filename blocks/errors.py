"""The user-facing error type, defined at the bottom of the package graph so every layer can raise it."""


class PuzzleError(Exception):
    """A problem with the user's input (config, paths, data, model); never a bug in puzzle.

    The CLI prints it as one line and exits with code 2.
    """
