"""Learning-rate schedules and batch order shared by every training loop (parent, BLD, KD).

Both are pure functions of the step, so a resumed run needs no saved RNG state to continue exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def warmup_cosine(step: int, total: int, peak: float, warmup: int, floor: float = 0.0, cosine: bool = True) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay from `peak` to `floor` at `total` (or constant)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if not cosine:
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def batch_indices(step: int, n_blocks: int, batch_size: int, seed: int) -> torch.Tensor:
    """Blocks of `step`: each epoch is a seeded permutation, so any step's batch is known without replay."""
    start = step * batch_size
    out: list[int] = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n_blocks)
        perm = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.extend(perm[offset : offset + batch_size - len(out)].tolist())
    return torch.tensor(out)


@dataclass(frozen=True)
class TrainingSettings:
    """What a training loop (BLD, KD) needs to know about its schedule; its repr tags resumable checkpoints."""

    learning_rate: float
    schedule: str  # "cosine" | "constant"
    warmup_fraction: float
    steps: int
    batch_size: int
    seed: int
    checkpoint_every: int

    def learning_rate_at(self, step: int) -> float:
        warmup = round(self.warmup_fraction * self.steps)
        return warmup_cosine(step, self.steps, self.learning_rate, warmup, cosine=self.schedule == "cosine")
