"""The architecture MIP at the size of real parents: solve time and distance to the proven optimum.

Synthetic problems (seeded, nothing is read): L layers × 54 blocks (6 attention × 9 FFN choices, block 0 the
parent's), scores that grow with what a block saves and with each layer's own sensitivity, three budgets
(latency, parameters, memory) at about half the parent. 8 layers is the shipped parent's size (with 48
blocks: 6 × 8), 80 layers a 70B parent's.

For each size: one solve at the job defaults (search.gap, search.time_limit), 10 diverse solutions
(min_diff 1), and the optimum proven once with the gap at zero and no time limit; printed side by side.

    python bench/mip.py          # about a minute or two on 2 CPU cores (the proof dominates)
"""

from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from puzzle.config import SearchSection  # noqa: E402
from puzzle.search.mip import Block, SolverSettings, solve  # noqa: E402

SIZES = [(8, 6, 8), (80, 6, 9)]  # layers, attention choices, FFN choices
FRACTION = {"latency": 0.5, "params": 0.55, "memory": 0.6}


def problem(layers: int, attention: int, ffn: int, seed: int = 0) -> list[list[Block]]:
    """Scores strongly correlated with what a block saves in all three budgets (the hard kind of knapsack:
    the LP relaxation is loose), each layer scaled by a log-uniform sensitivity, ±5 % noise."""
    rng = random.Random(seed)
    out = []
    for _ in range(layers):
        sensitivity = math.exp(rng.uniform(-3, 1))
        a = [(1.0, 1.0)] + [(1 - rng.uniform(0.05, 0.9), 1 - rng.uniform(0.05, 0.9)) for _ in range(attention - 1)]
        f = [1.0] + [1 - rng.uniform(0.05, 1.0) for _ in range(ffn - 1)]
        blocks = []
        for i, (time_a, size_a) in enumerate(a):
            for j, size_f in enumerate(f):
                costs = {"latency": 0.35 * time_a + 0.65 * size_f, "params": 0.3 * size_a + 0.7 * size_f,
                         "memory": 0.4 * size_a + 0.6 * size_f}
                saved = (1 - costs["latency"]) + 0.5 * (1 - costs["params"]) + 0.3 * (1 - costs["memory"])
                score = 0.0 if i == j == 0 else 1e-2 * sensitivity * saved * (1 + rng.uniform(-0.05, 0.05))
                blocks.append(Block((i, j), score, costs))
        out.append(blocks)
    return out


def timed(**kwargs):
    started = time.time()
    found = solve(**kwargs)
    return found, time.time() - started


def main() -> None:
    defaults = SearchSection()
    settings = defaults.solver_settings
    print(f"job defaults: search.gap {settings.gap}, search.time_limit {settings.time_limit} s, solver {settings.name}")
    print("| layers × blocks × budgets | 1 solve, s | status | 10 diverse, s | proven optimum, s | "
          "objective above the optimum |")
    print("|---|---:|---|---:|---:|---:|")
    for layers, attention, ffn in SIZES:
        blocks = problem(layers, attention, ffn)
        limits = {k: f * layers for k, f in FRACTION.items()}
        [one], first = timed(layers=blocks, limits=limits, solver=settings)
        many, diverse = timed(layers=blocks, limits=limits, solutions=10, min_diff=1, solver=settings)
        [best], proof = timed(layers=blocks, limits=limits, solver=SolverSettings(settings.name, 0.0, None))
        above = (one.objective - best.objective) / best.objective
        print(f"| {layers} × {len(blocks[0])} × {len(limits)} | {first:.2f} | {one.status.value} | {diverse:.2f} "
              f"({len(many)} found) | {proof:.2f} | {above:.4%} |", flush=True)


if __name__ == "__main__":
    main()
