import itertools
import random

import pytest

from puzzle.errors import PuzzleError
from puzzle.search.budgets import BudgetKind, parse_budget
from puzzle.search.mip import Block, InfeasibleBudget, Status, greedy, solve


def toy():
    # Two layers; by hand: within cost 5 the best pair is (a1, b1) = cost 2 + 3, score 1 + 2 = 3.
    return [
        [Block("a0", 0.0, {"cost": 4}), Block("a1", 1.0, {"cost": 2}), Block("a2", 5.0, {"cost": 0})],
        [Block("b0", 0.0, {"cost": 4}), Block("b1", 2.0, {"cost": 3}), Block("b2", 3.5, {"cost": 1})],
    ]


def test_toy_optimum_known_by_hand():
    [sol] = solve(layers=toy(), limits={"cost": 5})
    assert sol.choice == [1, 1] and sol.objective == 3.0 and sol.status is Status.optimal
    assert sol.usage["cost"].used == 5 and sol.usage["cost"].limit == 5
    # Brute force agrees.
    best = min(
        (a.score + b.score, (i, j))
        for (i, a), (j, b) in itertools.product(enumerate(toy()[0]), enumerate(toy()[1]))
        if a.costs["cost"] + b.costs["cost"] <= 5
    )
    assert best == (3.0, (1, 1))


def test_budgets_in_tiny_units_are_still_enforced():
    # The toy in units of 1e-8 (seconds of a small model on a big GPU): below the solver's own tolerance.
    layers = [[Block(b.label, b.score, {"cost": b.costs["cost"] * 1e-8}) for b in options] for options in toy()]
    [sol] = solve(layers=layers, limits={"cost": 5e-8})
    assert sol.choice == [1, 1] and sol.usage["cost"].used <= 5e-8 * (1 + 1e-9)


def test_fixed_costs_are_taken_off_first():
    [sol] = solve(layers=toy(), limits={"cost": 6}, fixed={"cost": 1})
    assert sol.choice == [1, 1] and sol.usage["cost"].used == 6


def test_diverse_solutions_differ_in_at_least_d_layers():
    layers = [[Block(f"L{i}b{b}", random.Random(i * 10 + b).random(), {"cost": b}) for b in range(4)] for i in range(5)]
    sols = solve(layers=layers, limits={"cost": 8}, solutions=4, min_diff=2)
    assert len(sols) == 4
    for s, t in itertools.combinations(sols, 2):
        assert sum(a != b for a, b in zip(s.choice, t.choice)) >= 2
    assert [s.objective for s in sols] == sorted(s.objective for s in sols)


def test_infeasible_budget_names_the_budget_and_the_smallest_value():
    with pytest.raises(InfeasibleBudget, match=r"budget latency=0.1x cannot be met: the smallest cost .* is 1 \(limit 0.5"):
        solve(layers=toy(), limits={"cost": 0.5}, labels={"cost": "latency=0.1x"})


def test_jointly_infeasible_budgets():
    layers = [[Block("a", 0, {"p": 1, "q": 0}), Block("b", 0, {"p": 0, "q": 1})]] * 2
    with pytest.raises(InfeasibleBudget, match="cannot all be met at once"):
        solve(layers=layers, limits={"p": 0.5, "q": 0.5})


def test_budget_equal_to_the_parent_returns_the_parent():
    # The parent's blocks (index 0) score 0 and cost most; any cheaper block scores worse.
    layers = [[Block("parent", 0.0, {"t": 3.0}), Block("small", 0.4, {"t": 1.0}), Block("noop", 2.0, {"t": 0.0})]] * 4
    [sol] = solve(layers=layers, limits={"t": 12.0})
    assert sol.choice == [0, 0, 0, 0] and sol.objective == 0.0


def test_mip_never_worse_than_greedy():
    rng = random.Random(0)
    for trial in range(20):
        layers = [
            [Block(f"{i}.{b}", rng.random(), {"t": rng.random(), "m": rng.random()}) for b in range(5)] for i in range(6)
        ]
        limits = {"t": 6 * rng.uniform(0.3, 0.7), "m": 6 * rng.uniform(0.3, 0.7)}
        g = greedy(layers=layers, limits=limits)
        try:
            [m] = solve(layers=layers, limits=limits)
        except InfeasibleBudget:
            assert g is None
            continue
        if g is not None:
            assert m.objective <= g.objective + 1e-9
            assert all(u.used <= u.limit + 1e-9 for u in g.usage.values())


def test_bad_inputs_are_checked_first():
    with pytest.raises(PuzzleError, match="no cost for budget"):
        solve(layers=[[Block("a", 0, {})]], limits={"t": 1})
    with pytest.raises(PuzzleError, match="min_diff"):
        solve(layers=toy(), limits={"cost": 9}, solutions=2, min_diff=3)
    with pytest.raises(PuzzleError, match="at least one block"):
        solve(layers=[[]], limits={})


@pytest.mark.parametrize(
    "text, kind, value, relative",
    [
        ("latency=0.5x", BudgetKind.latency, 0.5, True),
        ("memory=40GiB", BudgetKind.memory, 40 * 2**30, False),
        ("params=2.5M", BudgetKind.params, 2.5e6, False),
        ("throughput=1200tok/s", BudgetKind.throughput, 1200, False),
        ("latency=20ms", BudgetKind.latency, 0.02, False),
        ("kv=1.5MiB", BudgetKind.kv, 1.5 * 2**20, False),
    ],
)
def test_budget_strings(text, kind, value, relative):
    b = parse_budget(text)
    assert b.kind is kind and b.value == pytest.approx(value) and b.relative is relative


@pytest.mark.parametrize(
    "text, message",
    [
        ("latency", "expected KIND=VALUE"),
        ("speed=2x", "unknown budget 'speed'; known: memory, latency, throughput, params, kv"),
        ("memory=40 parsecs", "unknown unit 'parsecs' for memory"),
        ("memory=forty", "is not a number"),
        ("memory=40GiBs", "unknown unit 'gibs' for memory"),
        ("latency=-1x", "is not a number"),
        ("params=0", "must be positive"),
    ],
)
def test_malformed_budget_strings(text, message):
    with pytest.raises(PuzzleError, match=message):
        parse_budget(text)
