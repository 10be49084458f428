"""Matplotlib without a display, and atomic PNG writes, for every plot the tool makes."""

from __future__ import annotations

from pathlib import Path

from puzzle.io import atomic_path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path, dpi: int = 110) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    pyplot().close(fig)
