"""The architecture MIP (docs/design.md §7), solved with PuLP, and the paper's greedy search for comparison.

Binary x[i, b] picks block b in layer i: minimize Σ score[i, b]·x[i, b] subject to one block per layer,
Σ cost_k[i, b]·x[i, b] ≤ limit_k − fixed_k for every budget k, and, for the n-th of several solutions,
at most L − d layers shared with each earlier one. Inputs are validated first, every solution is
re-checked against its budgets before it is returned, and an infeasible problem is an error that
names the budget and the smallest value any child reaches.
"""

from __future__ import annotations

import enum
import math
import warnings
from dataclasses import dataclass
from typing import Hashable

import pulp

from puzzle.errors import PuzzleError


@dataclass(frozen=True)
class Block:
    """One option for a layer: what it is, its score (lower is better) and its cost under every budget.

    The MIP never looks inside `label`; the search stage passes the layer's `BlockChoice`.
    """

    label: Hashable
    score: float
    costs: dict[str, float]


@dataclass(frozen=True)
class Usage:
    used: float
    limit: float

    @property
    def within(self) -> bool:
        # A hair of slack, so a child exactly at its budget (the parent at 1x) counts.
        return self.used <= self.limit * (1 + 1e-9)


class Status(str, enum.Enum):
    optimal = "optimal"  # proven optimal by the MIP solver within its relative gap (under the diversity cuts so far)
    feasible = "feasible"  # the MIP solver's best when its time limit ran out: meets every budget, not proven
    heuristic = "heuristic"  # the greedy baseline and the measured searches: feasible, not proven optimal


@dataclass(frozen=True)
class Solution:
    status: Status
    objective: float
    choice: list[int]  # index of the chosen block, per layer
    usage: dict[str, Usage]


class InfeasibleBudget(PuzzleError):
    pass


@dataclass(frozen=True)
class SolverSettings:
    """Which solver, and when it may stop: at a relative gap between its best solution and its bound (the
    objective is then within `gap` of the optimum), or after `time_limit` seconds with the best it has."""

    name: str = "cbc"
    gap: float = 1e-4
    time_limit: float | None = 60.0


def _validate(layers: list[list[Block]], limits: dict[str, float], fixed: dict[str, float], solutions: int,
              min_diff: int, settings: SolverSettings) -> None:
    if not layers or any(not options for options in layers):
        raise PuzzleError("every layer needs at least one block option")
    for options in layers:
        for block in options:
            if not math.isfinite(block.score):
                raise PuzzleError(f"block {block.label}: score {block.score} is not finite")
            missing = set(limits) - set(block.costs)
            if missing:
                raise PuzzleError(f"block {block.label}: no cost for budget(s) {', '.join(sorted(missing))}")
    unknown = set(fixed) - set(limits)
    if unknown:
        raise PuzzleError(f"fixed costs for unknown budget(s): {', '.join(sorted(unknown))}")
    if solutions < 1:
        raise PuzzleError(f"solutions: {solutions} is not a positive count")
    if solutions > 1 and not 1 <= min_diff <= len(layers):
        raise PuzzleError(f"min_diff: {min_diff} must be between 1 and the number of layers ({len(layers)})")
    if not 0 <= settings.gap < 1:
        raise PuzzleError(f"gap: {settings.gap} is not a relative gap in [0, 1)")
    if settings.time_limit is not None and settings.time_limit <= 0:
        raise PuzzleError(f"time_limit: {settings.time_limit} is not a positive count of seconds")


def cheapest(layers: list[list[Block]], budget: str, fixed: float) -> float:
    """The smallest value of `budget` any child reaches."""
    return fixed + sum(min(b.costs[budget] for b in options) for options in layers)


def usage(layers: list[list[Block]], choice: list[int], limits: dict[str, float], fixed: dict[str, float]):
    return {
        k: Usage(fixed.get(k, 0.0) + sum(layers[i][c].costs[k] for i, c in enumerate(choice)), limit)
        for k, limit in limits.items()
    }


def _check_feasible_alone(layers, limits, fixed, labels) -> None:
    for k, limit in limits.items():
        low = cheapest(layers, k, fixed.get(k, 0.0))
        if low > limit * (1 + 1e-9):
            raise InfeasibleBudget(
                f"budget {labels.get(k, k)} cannot be met: the smallest {k} any child in the library reaches is "
                f"{low:.6g} (limit {limit:.6g})"
            )


def solve(
    *,
    layers: list[list[Block]],
    limits: dict[str, float],
    fixed: dict[str, float] | None = None,
    solutions: int = 1,
    min_diff: int = 1,
    solver: SolverSettings = SolverSettings(),
    labels: dict[str, str] | None = None,
) -> list[Solution]:
    """Up to `solutions` optimal-then-next-best architectures, each differing from the earlier ones in ≥ min_diff layers.

    Returns fewer solutions only when the diversity constraint leaves no more; raises InfeasibleBudget
    when even the first cannot meet the budgets.
    """
    fixed = dict(fixed or {})
    labels = labels or {}
    _validate(layers, limits, fixed, solutions, min_diff, solver)
    _check_feasible_alone(layers, limits, fixed, labels)
    found: list[Solution] = []
    for _ in range(solutions):
        choice, status = _solve_once(layers, limits, fixed, found, min_diff, solver)
        if choice is None:
            if not found:
                names = ", ".join(labels.get(k, k) for k in limits)
                raise InfeasibleBudget(
                    f"the budgets {names} cannot all be met at once, though each alone can; relax one of them"
                )
            break
        used = usage(layers, choice, limits, fixed)
        over = [k for k, u in used.items() if u.used > u.limit * (1 + 1e-6) + 1e-12]
        if over or len(choice) != len(layers):
            raise RuntimeError(f"the solver returned a solution over budget {over}; this is a bug, please report it")
        objective = sum(layers[i][c].score for i, c in enumerate(choice))
        found.append(Solution(status, objective, choice, used))
    return found


def _solver(settings: SolverSettings, warm: bool):
    # An absolute gap of 0: the relative one alone decides (objectives here are small numbers).
    options = dict(msg=False, gapRel=settings.gap, gapAbs=0.0, timeLimit=settings.time_limit)
    if settings.name == "highs":
        solver = pulp.HiGHS(**options)
        if not solver.available():
            raise PuzzleError("search.solver: highs is not installed (pip install highspy); use cbc")
        return solver
    with warnings.catch_warnings():
        # PuLP 3.x deprecates the bundled CBC in favour of a separate install; it is still the one
        # solver every install has, so it stays the default until PuLP 4 removes it.
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(**options, warmStart=warm)


def _warm_start(x: dict, layers, limits, fixed, earlier: list[Solution], min_diff: int) -> bool:
    """Start the solver from the last solution changed in its `min_diff` cheapest-to-change layers (each to
    its next-best block that keeps every budget), when that meets the new diversity cut: the next diverse
    solution is usually close to the last one."""
    if not earlier:
        return False
    choice = list(earlier[-1].choice)
    # Layers ordered by how little their best other feasible block costs in score.
    swaps = []
    for i, options in enumerate(layers):
        others = [b for b in range(len(options)) if b != choice[i]]
        if others:
            b = min(others, key=lambda b: options[b].score)
            swaps.append((options[b].score - options[choice[i]].score, i, b))
    for _, i, b in sorted(swaps)[:min_diff]:
        choice[i] = b
    used = usage(layers, choice, limits, fixed)
    if any(u.used > u.limit for u in used.values()):
        return False
    if any(sum(c == e for c, e in zip(choice, sol.choice)) > len(layers) - min_diff for sol in earlier):
        return False
    for (i, b), v in x.items():
        v.setInitialValue(1 if choice[i] == b else 0)
    return True


def _solve_once(layers, limits, fixed, earlier: list[Solution], min_diff: int,
                settings: SolverSettings) -> tuple[list[int] | None, Status]:
    problem = pulp.LpProblem("puzzle", pulp.LpMinimize)
    x = {
        (i, b): problem.add_variable(f"x_{i}_{b}", cat="Binary") for i, options in enumerate(layers) for b in range(len(options))
    }
    # CBC treats objective differences below ~1e-6 as ties; scores of near-parent blocks differ by less
    # (KL ~1e-7). Rescaling so the worst block scores 1000 keeps the argmin and makes them count.
    worst = max(abs(block.score) for options in layers for block in options)
    scale = 1e3 / worst if worst > 0 else 1.0
    problem += pulp.lpSum(scale * layers[i][b].score * v for (i, b), v in x.items())
    for i, options in enumerate(layers):
        problem += pulp.lpSum(x[i, b] for b in range(len(options))) == 1
    for k, limit in limits.items():
        # A hair of slack: a child that meets a budget exactly (the parent at 1x) must not be lost to the
        # rounding of the coefficients in the solver's input file.
        room = limit * (1 + 1e-9) - fixed.get(k, 0.0)
        # Rows in units of the limit: CBC's absolute feasibility tolerance (~1e-7) would otherwise swallow
        # budgets measured in small units, such as roofline seconds of a tiny model.
        unit = abs(limit) if limit != 0 else 1.0
        problem += pulp.lpSum(layers[i][b].costs[k] / unit * v for (i, b), v in x.items()) <= room / unit
    for sol in earlier:
        problem += pulp.lpSum(x[i, c] for i, c in enumerate(sol.choice)) <= len(layers) - min_diff
    warm = settings.name == "cbc" and _warm_start(x, layers, limits, fixed, earlier, min_diff)
    problem.solve(_solver(settings, warm))
    # sol_status tells a proven solution (within the gap) from the best one when the time ran out.
    if problem.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        if problem.status == pulp.LpStatusInfeasible:
            return None, Status.optimal
        raise PuzzleError(f"the MIP solver found no solution within its time limit ({settings.time_limit} s) and "
                          "did not prove there is none; raise search.time_limit")
    status = Status.optimal if problem.sol_status == pulp.LpSolutionOptimal else Status.feasible
    return [next(b for b in range(len(options)) if x[i, b].value() > 0.5) for i, options in enumerate(layers)], status


def greedy(*, layers: list[list[Block]], limits: dict[str, float], fixed: dict[str, float] | None = None) -> Solution | None:
    """The paper's greedy baseline: each budget split equally over the layers, layers taken in order of
    their mean score (most sensitive first), unused budget carried forward. None if it gets stuck."""
    fixed = dict(fixed or {})
    n = len(layers)
    allowance = {k: (limit - fixed.get(k, 0.0)) / n for k, limit in limits.items()}
    carry = dict.fromkeys(limits, 0.0)
    order = sorted(range(n), key=lambda i: -sum(b.score for b in layers[i]) / len(layers[i]))
    choice = [0] * n
    for i in order:
        room = {k: allowance[k] + carry[k] for k in limits}
        fits = [b for b, block in enumerate(layers[i]) if all(block.costs[k] <= room[k] + 1e-12 for k in limits)]
        if not fits:
            return None
        best = min(fits, key=lambda b: layers[i][b].score)
        choice[i] = best
        for k in limits:
            carry[k] = room[k] - layers[i][best].costs[k]
    objective = sum(layers[i][c].score for i, c in enumerate(choice))
    return Solution(Status.heuristic, objective, choice, usage(layers, choice, limits, fixed))
