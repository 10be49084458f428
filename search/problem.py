"""The search problem: every layer's blocks with their scores and costs, and budgets as limits on sums.

Built from the scores table (one row per layer and block) and the profile table (one row per layer and
subblock candidate, plus the fixed row, layer −1) — both plain data, so the search runs without a model.
A block's cost is its attention's plus its FFN's; a child's cost is the fixed row plus its blocks' sum
(the additive cost model, docs/design.md §6–7).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from puzzle.blocks.costs import Scenario
from puzzle.errors import PuzzleError
from puzzle.blocks.specs import BlockChoice, spec_from_id
from puzzle.search.budgets import Budget, BudgetKind, Sweep
from puzzle.search.mip import Block, InfeasibleBudget, SolverSettings, greedy, solve

# Budgets become upper bounds on these summed quantities; throughput is bounded through latency.
QUANTITY = {
    BudgetKind.memory: "memory",
    BudgetKind.latency: "latency",
    BudgetKind.throughput: "latency",
    BudgetKind.params: "params",
    BudgetKind.kv: "kv",
    BudgetKind.experts: "experts",
    BudgetKind.active_params: "active_params",
}


@dataclass(frozen=True)
class SearchProblem:
    layers: list[list[Block]]  # option 0 of each layer is the parent's block
    fixed: dict[str, float]
    parent_totals: dict[str, float]
    scenario: Scenario


def _costs(attention, ffn, scenario: Scenario) -> dict[str, float]:
    return {
        "params": float(attention.params + ffn.params),
        "memory": float(attention.weight_bytes + ffn.weight_bytes + attention.kv_bytes),
        "kv": float(attention.kv_bytes),
        "latency": scenario.latency(attention.prefill_seconds, attention.decode_seconds)
        + scenario.latency(ffn.prefill_seconds, ffn.decode_seconds),
        "experts": float(attention.experts + ffn.experts),
        "active_params": float(attention.active_params + ffn.active_params),
    }


def build_problem(scores: pd.DataFrame, profile: pd.DataFrame, scenario: Scenario, metric: str) -> SearchProblem:
    """Blocks with scores (lower is better: agreements become 1 − agreement) and costs at `scenario`."""
    cost = {(int(r.layer), r.candidate): r for r in profile.itertuples()}
    layers = []
    for layer, group in scores.groupby("layer"):
        options = []
        for r in group.itertuples():
            a, f = cost.get((layer, r.attention)), cost.get((layer, r.ffn))
            if a is None or f is None:
                raise PuzzleError(
                    f"the profile has no row for layer {layer} {r.attention if a is None else r.ffn}; "
                    "run `puzzle profile` again after `puzzle distill`"
                )
            score = 1.0 - getattr(r, metric) if metric.startswith("top") else getattr(r, metric)
            choice = BlockChoice(spec_from_id(r.attention), spec_from_id(r.ffn), bool(r.coupled))
            options.append(Block(label=choice, score=float(score), costs=_costs(a, f, scenario)))
        layers.append(options)
    fixed_row = profile[profile.layer == -1].iloc[0]
    fixed = {
        "params": float(fixed_row.params),
        "memory": float(fixed_row.weight_bytes),
        "kv": 0.0,
        "latency": scenario.latency(fixed_row.prefill_seconds, fixed_row.decode_seconds),
        "experts": 0.0,
        "active_params": float(fixed_row.active_params),
    }
    totals = {k: fixed[k] + sum(options[0].costs[k] for options in layers) for k in fixed}
    return SearchProblem(layers, fixed, totals, scenario)


def budget_limits(budgets: list[Budget], problem: SearchProblem) -> tuple[dict[str, float], dict[str, str]]:
    """Limits on the summed quantities, and the user's text for each (for messages). Two budgets on one
    quantity (latency and throughput) keep the tighter limit, labelled with the budget that set it."""
    limits, labels = {}, {}
    tokens_per_batch = problem.scenario.batch_size * problem.scenario.decode_length
    for b in budgets:
        quantity = QUANTITY[b.kind]
        parent = problem.parent_totals[quantity]
        if b.kind is BudgetKind.throughput:
            # throughput ≥ T  ⇔  latency ≤ tokens per batch / T; "2x" means twice the parent's throughput.
            limit = parent / b.value if b.relative else tokens_per_batch / b.value
        else:
            limit = b.limit(parent)
        if quantity not in limits or limit < limits[quantity]:
            limits[quantity], labels[quantity] = limit, b.text
    return limits, labels


@dataclass(frozen=True)
class FrontierPoint:
    budget: str
    limit: float
    objective: float | None  # None: infeasible at this budget
    used: float | None
    greedy_objective: float | None
    uniform_objective: float | None = None  # Minitron-style: one FFN width in every layer; None when none fits


def frontier_points(problem: SearchProblem, sweep: Sweep, held: list[Budget], solver: SolverSettings) -> list[FrontierPoint]:
    """Best predicted quality at each budget of the sweep, the `held` budgets on other quantities kept."""
    quantity = QUANTITY[sweep.kind]
    # A budget on the swept quantity would cap the sweep; only the other quantities are held.
    held = [b for b in held if QUANTITY[b.kind] != quantity]
    points = []
    for swept in sweep.budgets():
        limits, labels = budget_limits([*held, swept], problem)
        fixed = {k: problem.fixed[k] for k in limits}
        try:
            [best] = solve(layers=problem.layers, limits=limits, fixed=fixed, solver=solver, labels=labels)
            objective, used = best.objective, best.usage[quantity].used
        except InfeasibleBudget:
            objective = used = None
        g = greedy(layers=problem.layers, limits=limits, fixed=fixed)
        points.append(FrontierPoint(swept.text, limits[quantity], objective, used, g.objective if g else None,
                                    _uniform(problem, limits, fixed)))
    return points


def _uniform(problem: SearchProblem, limits: dict[str, float], fixed: dict[str, float]) -> float | None:
    from puzzle.search.baselines import uniform_ffn

    try:
        return uniform_ffn(layers=problem.layers, limits=limits, fixed=fixed).objective
    except (InfeasibleBudget, PuzzleError):  # no width fits, or the library has no width common to all layers
        return None
