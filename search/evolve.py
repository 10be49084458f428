"""Evolutionary refinement of MIP solutions on measured quality (docs/design.md §7), after EvoPress
(arXiv 2410.14649): the sum of replace-1-block scores misses how blocks interact, a child measured whole
does not.

A (1 + λ) search over the blocks of each layer: from the best child so far, λ offspring each change one
layer's block (and a second layer's, when that is what brings the child back under every budget); the
offspring are measured on a few batches, the best few of them on more, and so on (a levelled selection:
most offspring are judged cheaply), and the best survivor replaces the parent only when it measures
better on all the batches. Seeds are the MIP's diverse solutions. Every child it considers meets every budget
(checked before it is measured), so the result does too. Measuring is the caller's (`measure(children,
batches)` → one number per child, lower is better); this module never sees a model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from puzzle.errors import PuzzleError
from puzzle.search.mip import Block, Solution, Status, usage

Measure = Callable[[list[list[int]], int], list[float]]


@dataclass(frozen=True)
class EvolveSettings:
    generations: int = 40
    offspring: int = 8
    levels: tuple[int, ...] = (1, 2)  # batches offspring are measured on at each level but the last (all)
    survivors: tuple[int, ...] = (4, 2)  # offspring kept after each level
    seed: int = 0


@dataclass(frozen=True)
class Evolution:
    best: Solution  # objective: the measured value
    history: list[float]  # the best measured value after each generation
    evaluations: int  # children measured, at any level


def _fits(layers: list[list[Block]], choice: list[int], limits: dict[str, float], fixed: dict[str, float]) -> bool:
    return all(u.within for u in usage(layers, choice, limits, fixed).values())


def mutate(layers: list[list[Block]], choice: list[int], limits: dict[str, float], fixed: dict[str, float],
           rng: random.Random, tries: int = 50) -> list[int] | None:
    """A child that differs from `choice` in one layer, or in two when the second brings it back under every
    budget (with the block of best score that does: a random repair is almost always a worse child); None
    when `tries` draws find none."""
    for _ in range(tries):
        child = list(choice)
        i = rng.randrange(len(layers))
        if len(layers[i]) < 2:
            continue
        child[i] = rng.choice([b for b in range(len(layers[i])) if b != choice[i]])
        if _fits(layers, child, limits, fixed):
            return child
        j = rng.choice([k for k in range(len(layers)) if k != i] or [i])
        repair = _repair(layers, child, j, limits, fixed)
        if repair is not None and j != i:
            child[j] = repair
            return child
    return None


def _repair(layers: list[list[Block]], child: list[int], j: int, limits: dict[str, float],
            fixed: dict[str, float]) -> int | None:
    """Layer `j`'s block of best score among those that bring `child` under every budget; None if none does."""
    repairs = [b for b in range(len(layers[j])) if _fits(layers, child[:j] + [b] + child[j + 1:], limits, fixed)]
    return min(repairs, key=lambda b: layers[j][b].score) if repairs else None


def neighbours(layers: list[list[Block]], choice: list[int], limits: dict[str, float],
               fixed: dict[str, float]) -> list[list[int]]:
    """Every child `mutate` can draw from `choice`, each once: one layer changed, or, where that breaks a
    budget, also a second layer's block of best score among those that bring it back under every budget."""
    found: dict[tuple[int, ...], None] = {}
    for i, layer in enumerate(layers):
        for b in range(len(layer)):
            if b == choice[i]:
                continue
            child = choice[:i] + [b] + choice[i + 1:]
            if _fits(layers, child, limits, fixed):
                found[tuple(child)] = None
                continue
            for j in (k for k in range(len(layers)) if k != i):
                repair = _repair(layers, child, j, limits, fixed)
                if repair is not None:
                    found[tuple(child[:j] + [repair] + child[j + 1:])] = None
    return [list(c) for c in found]


def evolve(*, layers: list[list[Block]], limits: dict[str, float], fixed: dict[str, float] | None = None,
           seeds: list[list[int]], measure: Measure, batches: int, settings: EvolveSettings = EvolveSettings(),
           on_generation: Callable[[int, float], None] = lambda generation, best: None) -> Evolution:
    """The best child found from `seeds` (each meeting every budget) in `settings.generations` generations;
    `batches`: the most a child is measured on."""
    fixed = dict(fixed or {})
    if not seeds:
        raise PuzzleError("evolution needs at least one seed (a solution of the MIP)")
    if len(settings.levels) != len(settings.survivors):
        raise PuzzleError("evolution: levels and survivors must pair up")
    for seed in seeds:
        if not _fits(layers, seed, limits, fixed):
            raise PuzzleError("evolution: a seed breaks a budget")
    rng = random.Random(settings.seed)
    evaluations = 0
    scores = measure(seeds, batches)
    evaluations += len(seeds)
    best_score, best = min(zip(scores, seeds), key=lambda t: t[0])
    history = []
    for generation in range(settings.generations):
        pool = [c for c in (mutate(layers, best, limits, fixed, rng) for _ in range(settings.offspring)) if c]
        for level, keep in zip(settings.levels, settings.survivors):
            if len(pool) <= 1:
                break
            values = measure(pool, min(level, batches))
            evaluations += len(pool)
            pool = [c for _, c in sorted(zip(values, pool), key=lambda t: t[0])[:keep]]
        if pool:
            values = measure(pool, batches)
            evaluations += len(pool)
            score, child = min(zip(values, pool), key=lambda t: t[0])
            if score < best_score:
                best_score, best = score, child
        history.append(best_score)
        on_generation(generation + 1, best_score)
    solution = Solution(Status.heuristic, best_score, best, usage(layers, best, limits, fixed))
    return Evolution(solution, history, evaluations)
