"""`puzzle search` on the tiny parent's library, scores and profile."""

import json

import pytest

from puzzle.blocks.specs import BlockChoice
from puzzle.families import parent_shapes
from puzzle.parents import parent_config
from puzzle.api import search_stage
from puzzle.search.mip import InfeasibleBudget
from tests.helpers import FAST, cli, scored_job


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_parent_dir, fast_scored):
    return scored_job(tmp_path_factory.mktemp("search"), tiny_parent_dir, start_from=fast_scored)


def test_search_meets_the_budget_and_writes_solutions(job):
    _, config = job
    outcome = search_stage(config, ["params=0.6x"], solutions=2, min_diff=1)
    assert len(outcome.solutions) == 2
    for sol in outcome.solutions:
        assert sol.usage["params"].used <= sol.usage["params"].limit
    data = json.loads((config.run.dir / "search/solutions.json").read_text())
    assert len(data["solutions"]) == 2 and len(data["solutions"][0]["layers"]) == 2
    assert data["solutions"][0]["usage"]["params"]["limit"] == pytest.approx(
        0.6 * outcome.solutions[0].usage["params"].parent)
    if outcome.greedy is not None:
        assert outcome.solutions[0].objective <= outcome.greedy.objective + 1e-12


def test_parent_budget_returns_the_parent_and_says_so(job):
    _, config = job
    outcome = search_stage(config, ["params=1x"])
    assert outcome.solutions[0].blocks == [BlockChoice(s.attention, s.ffn) for s in parent_shapes(parent_config(config.parent))]
    assert outcome.solutions[0].objective == pytest.approx(0.0, abs=1e-6)
    assert any("the parent already meets it" in n for n in outcome.notes)


def test_infeasible_budget_names_the_smallest_reachable_value(job):
    _, config = job
    with pytest.raises(InfeasibleBudget, match=r"budget params=10 cannot be met: the smallest params any child"):
        search_stage(config, ["params=10"])


@pytest.mark.parametrize(
    "budget, message",
    [("latency=fast", "is not a number"), ("latency=3furlongs", "unknown unit 'furlongs'"),
     ("speed=2x", "unknown budget 'speed'"), ("params=1", "cannot be met")],
)
def test_search_bad_budgets_exit_2(job, monkeypatch, capsys, budget, message):
    path, _ = job
    code, out = cli(monkeypatch, capsys, "search", path, *[a for f in FAST for a in ("--set", f)], "--budget", budget)
    assert code == 2 and message in out.err and "Traceback" not in out.err


def test_search_prints_the_solution_and_greedy(job, monkeypatch, capsys):
    path, _ = job
    code, out = cli(monkeypatch, capsys, "search", path, *[a for f in FAST for a in ("--set", f)], "--budget", "params=0.8x")
    assert code == 0, out.err
    assert "solution 0" in out.out and "greedy search" in out.out and "MIP solve" in out.out


def test_frontier_sweep_writes_a_table_and_a_plot(job, monkeypatch, capsys):
    path, config = job
    code, out = cli(monkeypatch, capsys, "search", path, *[a for f in FAST for a in ("--set", f)],
                    "--sweep", "params=0.4x:1.0x:4")
    assert code == 0, out.err
    import pandas as pd

    table = pd.read_csv(config.run.dir / "search/frontier.csv")
    assert list(table.budget) == ["params=0.4x", "params=0.6x", "params=0.8x", "params=1x"]
    feasible = table.dropna(subset=["objective"])
    assert (feasible.used <= feasible.limit * (1 + 1e-6)).all()
    assert feasible.objective.is_monotonic_decreasing  # more budget never predicts worse quality
    # The uniform-width child beside every point where one fits: never better than the MIP's.
    uniform = table.dropna(subset=["uniform_objective"])
    assert len(uniform) >= 1 and (uniform.uniform_objective >= uniform.objective - 1e-12).all()
    assert (config.run.dir / "search/frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("sweep", ["latency=0.3x:1.0x", "latency=0.3x:1ms:4", "latency=0.3x:1.0x:one"])
def test_malformed_sweep(job, monkeypatch, capsys, sweep):
    path, _ = job
    code, out = cli(monkeypatch, capsys, "search", path, *[a for f in FAST for a in ("--set", f)], "--sweep", sweep)
    assert code == 2 and "--sweep" in out.err


def test_batch_size_sweep_keeps_the_best(job):
    _, config = job
    from puzzle.config import apply_overrides, validate

    raw = apply_overrides(config.model_dump(mode="json"), ["search.batch_sizes=[1, 4]"])
    swept = validate(raw)
    # An absolute throughput that batch 1 cannot reach but batch 4 can.
    outcome = search_stage(swept, ["throughput=1tok/s"])
    data = json.loads((config.run.dir / "search/solutions.json").read_text())
    assert [b["batch_size"] for b in data["batch_sweep"]] == [1, 4]
    assert data["batch_size"] in (1, 4)
    best = min(b["objective"] for b in data["batch_sweep"] if b["objective"] is not None)
    assert outcome.solutions[0].objective == pytest.approx(best)
    assert any("best at batch size" in n for n in outcome.notes)
