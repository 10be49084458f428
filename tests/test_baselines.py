"""Baseline architecture methods (`search.method`, `puzzle baseline`) on the tiny parent's library, scores and profile."""

import json

import pytest
import torch

from puzzle.errors import PuzzleError
from puzzle.blocks.specs import BlockChoice
from puzzle.config import ParentSection, apply_overrides, validate
from puzzle.importance import block_influence
from puzzle.parents import load_parent
from puzzle.api import realize_stage
from puzzle.api import search_stage
from puzzle.search.baselines import llm_drop, random_search, shortgpt, uniform_ffn
from puzzle.search.mip import Block, InfeasibleBudget, Status
from tests.helpers import FAST, cli, scored_job

# The roofline profile: latency costs are the same on every run, so the budgets below are met or not for sure.
OVERRIDES = [*FAST, "profile.device=h100"]
METHODS = ["greedy", "shortgpt", "llm-drop", "uniform-ffn", "random"]


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_parent_dir, fast_scored):
    # The session's library and scores; the profile is made again here, with the roofline.
    return scored_job(tmp_path_factory.mktemp("baselines"), tiny_parent_dir, OVERRIDES, start_from=fast_scored)


def with_method(config, method: str, *more: str):
    return validate(apply_overrides(config.model_dump(mode="json"), [f"search.method={method}", *more]))


def names(outcome) -> list[str]:
    return [str(layer.choice) for layer in outcome.solutions[0].layers]


# Budgets each method can meet on the tiny library: removing attention alone (llm-drop) or halving every
# FFN (uniform-ffn) cannot reach 0.7x of the parameters.
@pytest.mark.parametrize(
    "method, budget",
    [("greedy", "params=0.7x"), ("greedy", "latency=0.6x"), ("shortgpt", "params=0.8x"), ("shortgpt", "latency=0.6x"),
     ("llm-drop", "params=0.85x"), ("llm-drop", "latency=0.9x"), ("uniform-ffn", "params=0.85x"),
     ("uniform-ffn", "latency=0.8x"), ("random", "params=0.7x"), ("random", "latency=0.6x")],
)
def test_each_baseline_meets_its_budget_and_writes_the_same_file(job, method, budget):
    _, config = job
    outcome = search_stage(with_method(config, method), [budget])
    [solution] = outcome.solutions
    [(quantity, used)] = solution.usage.items()
    assert used.used <= used.limit * (1 + 1e-9) < used.parent
    assert solution.status is Status.heuristic
    assert solution.objective == pytest.approx(sum(layer.score for layer in solution.layers))
    data = json.loads((config.run.dir / "search/solutions.json").read_text())
    assert data["method"] == method
    assert [str(BlockChoice.from_json(layer)) for layer in data["solutions"][0]["layers"]] == names(outcome)
    assert not any(name.endswith(" (coupled)") for name in names(outcome))


def test_shortgpt_drops_whole_layers_and_llm_drop_only_attention(job):
    _, config = job
    dropped = names(search_stage(with_method(config, "shortgpt"), ["params=0.8x"]))
    assert sorted(dropped) == ["attention.kv2+ffn.i96", "attention.noop+ffn.noop"]
    data = json.loads((config.run.dir / "search/solutions.json").read_text())
    influence = data["block_influence"]["layer"]
    # The layer dropped is the one of lower Block Influence.
    assert dropped[influence.index(min(influence))] == "attention.noop+ffn.noop"
    attention_dropped = names(search_stage(with_method(config, "llm-drop"), ["latency=0.9x"]))
    assert sorted(attention_dropped) == ["attention.kv2+ffn.i96", "attention.noop+ffn.i96"]


@pytest.mark.parametrize("budget, width", [("params=1x", 96), ("params=0.85x", 48)])
def test_uniform_ffn_keeps_the_widest_width_that_fits_in_every_layer(job, budget, width):
    _, config = job
    assert names(search_stage(with_method(config, "uniform-ffn"), [budget])) == [f"attention.kv2+ffn.i{width}"] * 2


def test_random_is_seeded(job):
    _, config = job
    first = names(search_stage(with_method(config, "random", "run.seed=3"), ["params=0.7x"]))
    assert names(search_stage(with_method(config, "random", "run.seed=3"), ["params=0.7x"])) == first
    others = {tuple(names(search_stage(with_method(config, "random", f"run.seed={s}"), ["params=0.7x"])))
              for s in range(4, 10)}
    assert others - {tuple(first)}


@pytest.mark.parametrize("method", METHODS)
def test_an_impossible_budget_is_an_error_naming_it(job, method):
    _, config = job
    with pytest.raises(InfeasibleBudget, match="params=10"):
        search_stage(with_method(config, method), ["params=10"])


def test_several_solutions_need_the_mip(job):
    _, config = job
    with pytest.raises(PuzzleError, match="search.solutions: 2 solutions need search.method mip or evolve; shortgpt gives one"):
        search_stage(with_method(config, "shortgpt"), ["params=0.8x"], solutions=2)


def test_realize_builds_the_baselines_child(job):
    _, config = job
    outcome = search_stage(with_method(config, "shortgpt"), ["params=0.8x"])
    summary = realize_stage(config)
    realized = json.loads((summary.directory / "puzzle_child.json").read_text())["layers"]
    assert [f"{layer['attention']}+{layer['ffn']}" for layer in realized] == names(outcome)
    assert summary.parameters <= 0.8 * summary.parent_parameters


def test_baseline_command_prints_the_method(job, monkeypatch, capsys):
    path, config = job
    code, out = cli(monkeypatch, capsys, "baseline", "uniform-ffn", path, *[a for f in OVERRIDES for a in ("--set", f)],
                    "--budget", "params=0.85x")
    assert code == 0, out.err
    assert "solution 0 by uniform-ffn" in out.out and "vs uniform-ffn" in out.out and "uniform-ffn solve" in out.out
    # A baseline is a job of its own: the job's own search is left alone, and the baseline's config sits beside it.
    assert json.loads((config.run.dir / "jobs/uniform-ffn/search/solutions.json").read_text())["method"] == "uniform-ffn"
    assert (config.run.dir / "jobs/uniform-ffn/config.yaml").is_file() and "puzzle run" in out.out


def test_baseline_command_rejects_an_unknown_method(job, monkeypatch, capsys):
    path, _ = job
    code, out = cli(monkeypatch, capsys, "baseline", "nonsense", path, "--budget", "params=0.8x")
    problems = [line for line in out.err.splitlines() if line.startswith("  ")]
    assert code == 2 and "Traceback" not in out.err
    assert len(problems) == 1 and "search.method: got 'nonsense'" in problems[0] and "'llm-drop'" in problems[0]


# --- Block Influence and the pure functions -------------------------------------------------------------


def test_block_influence_of_an_identity_layer_is_zero(tiny_parent_dir):
    parent = load_parent(ParentSection(path=str(tiny_parent_dir)))
    layer = parent.adapter.layer(0)
    with torch.no_grad():
        layer.attention.o_proj.weight.zero_()
        layer.ffn.down_proj.weight.zero_()
    ids = torch.randint(0, parent.model.config.vocab_size, (3, 16))
    influence = block_influence(parent.adapter, ids, batch_size=2)
    assert influence.layer[0] == pytest.approx(0.0, abs=1e-6)
    assert influence.attention[0] == pytest.approx(0.0, abs=1e-6)
    assert influence.layer[1] > 1e-3 and influence.attention[1] > 1e-4


def planted(n: int = 3) -> list[list[Block]]:
    """Per layer: the parent's block (cost 4), attention removed (cost 1), the layer removed (cost 0)."""
    return [
        [Block(BlockChoice.from_id("attention.kv2+ffn.i96"), 0.0, {"p": 4.0}),
         Block(BlockChoice.from_id("attention.noop+ffn.i96"), 1.0, {"p": 1.0}),
         Block(BlockChoice.from_id("attention.kv2+ffn.i48"), 0.5, {"p": 2.0}),
         Block(BlockChoice.from_id("attention.noop+ffn.noop"), 2.0, {"p": 0.0})]
        for _ in range(n)
    ]


def test_shortgpt_drops_the_lowest_influence_layers_first():
    influence = [0.5, 0.1, 0.3]
    one = shortgpt(layers=planted(), limits={"p": 8.0}, layer_influence=influence)
    assert one.choice == [0, 3, 0] and one.objective == 2.0 and one.usage["p"].used == 8.0
    two = shortgpt(layers=planted(), limits={"p": 4.0}, layer_influence=influence)
    assert two.choice == [0, 3, 3]
    assert shortgpt(layers=planted(), limits={"p": 12.0}, layer_influence=influence).choice == [0, 0, 0]


def test_llm_drop_removes_attention_lowest_first():
    sol = llm_drop(layers=planted(), limits={"p": 8.0}, attention_influence=[0.2, 0.9, 0.1])
    assert sol.choice == [1, 0, 1] and sol.usage["p"].used == 6.0


def test_pure_functions_raise_infeasible_budget():
    layers, labels = planted(), {"p": "params=1"}
    for call in (lambda: shortgpt(layers=layers, limits={"p": -1.0}, labels=labels, layer_influence=[0, 0, 0]),
                 lambda: llm_drop(layers=layers, limits={"p": 2.0}, labels=labels, attention_influence=[0, 0, 0]),
                 lambda: uniform_ffn(layers=layers, limits={"p": 5.0}, labels=labels),
                 lambda: random_search(layers=layers, limits={"p": -1.0}, labels=labels, seed=0, draws=50)):
        with pytest.raises(InfeasibleBudget, match="params=1"):
            call()
    assert uniform_ffn(layers=layers, limits={"p": 6.0}).choice == [2, 2, 2]


def test_depth_first_then_puzzle_removes_its_layers_and_solves_the_rest():
    from puzzle.blocks.specs import AttentionKind, AttentionSpec, FfnKind, FfnSpec
    from puzzle.search.baselines import depth_then_mip
    from puzzle.search.mip import solve

    removed = BlockChoice(AttentionSpec(AttentionKind.noop), FfnSpec(FfnKind.noop))
    kept = BlockChoice(AttentionSpec(AttentionKind.attention, 2), FfnSpec(FfnKind.dense, 8))
    half = BlockChoice(AttentionSpec(AttentionKind.attention, 2), FfnSpec(FfnKind.dense, 4))
    layers = [[Block(kept, 0.0, {"cost": 1.0}), Block(half, 0.1 * (i + 1), {"cost": 0.6}),
               Block(removed, 0.5 + 0.1 * i, {"cost": 0.0})] for i in range(4)]
    influence = [0.3, 0.1, 0.4, 0.2]  # layers 1 and 3 go first
    solution = depth_then_mip(layers=layers, limits={"cost": 2.2}, layer_influence=influence, depth=2)
    assert [layers[i][c].label for i, c in enumerate(solution.choice)][1::2] == [removed, removed]
    assert solution.usage["cost"].used <= 2.2 and solution.status is Status.heuristic
    # With nothing removed first it is the MIP itself.
    plain = depth_then_mip(layers=layers, limits={"cost": 2.2}, layer_influence=influence, depth=0)
    assert plain.choice == solve(layers=layers, limits={"cost": 2.2})[0].choice
    with pytest.raises(PuzzleError, match="search.depth: 5 layers to remove, but the parent has 4"):
        depth_then_mip(layers=layers, limits={"cost": 2.2}, layer_influence=influence, depth=5)


def test_depth_mip_through_the_search_stage(job):
    _, config = job
    outcome = search_stage(with_method(config, "depth-mip", "search.depth=1"), ["params=0.7x"])
    [solution] = outcome.solutions
    assert solution.usage["params"].used <= solution.usage["params"].limit
    assert sum(str(layer.choice) == "attention.noop+ffn.noop" for layer in solution.layers) >= 1


def test_uniform_ffn_keeps_the_parents_block_where_a_layer_has_no_dense_ffn():
    # A hybrid's layers: Mamba (no FFN), MLP, MoE. Only the MLP layer takes the uniform width.
    mamba = [Block(BlockChoice.from_id(b), s, {"p": c}) for b, s, c in
             [("attention.mamba8+ffn.noop", 0.0, 4.0), ("attention.mamba4+ffn.noop", 0.1, 2.0)]]
    mlp = [Block(BlockChoice.from_id(b), s, {"p": c}) for b, s, c in
           [("attention.noop+ffn.i256", 0.0, 4.0), ("attention.noop+ffn.i128", 0.1, 2.0),
            ("attention.noop+ffn.i64", 0.3, 1.0)]]
    moe = [Block(BlockChoice.from_id(b), s, {"p": c}) for b, s, c in
           [("attention.noop+ffn.moe4.top2", 0.0, 4.0), ("attention.noop+ffn.moe2.top2", 0.1, 2.0)]]
    layers = [mamba, mlp, moe, mlp]
    assert uniform_ffn(layers=layers, limits={"p": 12.0}).choice == [0, 1, 0, 1]
    assert uniform_ffn(layers=layers, limits={"p": 10.0}).choice == [0, 2, 0, 2]
    with pytest.raises(InfeasibleBudget, match="common to every dense layer"):
        uniform_ffn(layers=layers, limits={"p": 9.0})
    with pytest.raises(PuzzleError, match="no layer of the library offers a dense FFN width"):
        uniform_ffn(layers=[mamba, moe], limits={"p": 9.0})
