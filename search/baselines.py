"""Simpler ways to pick an architecture than the MIP, as baselines on the same blocks, scores and budgets.

Every method answers with a `search.mip.Solution` over the per-layer options the MIP sees, so the
search stage writes the same solutions file and `puzzle realize` builds the child unchanged; the
difference between a baseline and the MIP is then the choice alone. Each option's label is its
`BlockChoice` (baselines take decoupled blocks only); a layer's option 0 is the parent's block.

- `shortgpt`: ShortGPT (Men et al., 2024) removes whole layers, least Block Influence first.
- `llm_drop`: LLM-Drop (He et al., 2024) removes attention subblocks the same way.
- `uniform_ffn`: Minitron-style width pruning, one FFN width in every layer. The library's pruned FFNs
  are initialized by the same channel contribution Minitron ranks channels by, and then BLD-trained,
  so this baseline differs from the MIP's child only in how the blocks were chosen.
- `depth_then_mip`: depth first, then Puzzle: ShortGPT's removal of d whole layers, then the MIP on the rest.
- `random_search`: seeded random architectures, the first within the budgets.
- `greedy_search`: the paper's greedy search (`search.mip.greedy`).

A method that cannot meet the budgets raises InfeasibleBudget naming them; none returns an empty result.
"""

from __future__ import annotations

import random

from puzzle.errors import PuzzleError
from puzzle.blocks.specs import AttentionKind, AttentionSpec, BlockChoice, FfnKind, FfnSpec
from puzzle.search.mip import Block, InfeasibleBudget, Solution, SolverSettings, Status, greedy, solve, usage

RANDOM_DRAWS = 10_000
# The methods that rank layers by the parent's Block Influence, which the caller has to measure.
NEEDS_INFLUENCE = frozenset({"shortgpt", "llm-drop", "depth-mip"})

Layers = list[list[Block]]


def _index(layers: Layers, layer: int, wanted: BlockChoice, method: str) -> int:
    for b, block in enumerate(layers[layer]):
        if block.label == wanted:
            return b
    raise PuzzleError(
        f"search.method={method} needs block {wanted} in layer {layer}, which the library does not have "
        "(see library.noop_attention and library.noop_ffn)"
    )


def _solution(layers: Layers, choice: list[int], limits: dict[str, float], fixed: dict[str, float]) -> Solution:
    objective = sum(layers[i][c].score for i, c in enumerate(choice))
    return Solution(Status.heuristic, objective, list(choice), usage(layers, choice, limits, fixed))


def _within(solution: Solution) -> bool:
    return all(u.within for u in solution.usage.values())


def _unmet(solution: Solution, labels: dict[str, str]) -> str:
    return ", ".join(
        f"{labels.get(k, k)} (reaches {u.used:.6g}, limit {u.limit:.6g})"
        for k, u in solution.usage.items()
        if not u.within
    )


def _check_influence(layers: Layers, influence: list[float], what: str) -> None:
    if len(influence) != len(layers):
        raise PuzzleError(f"{what}: {len(influence)} values for {len(layers)} layers")


def _drop_in_order(layers: Layers, limits, fixed, labels, influence: list[float], replacement: list[int],
                   method: str, what: str) -> Solution:
    """Replace layers' blocks by `replacement`, least influential first, until every budget is met."""
    choice = [0] * len(layers)
    order = iter(sorted(range(len(layers)), key=lambda i: (influence[i], i)))
    solution = _solution(layers, choice, limits, fixed)
    while not _within(solution):
        i = next(order, None)
        if i is None:
            raise InfeasibleBudget(
                f"{method}: with all {len(layers)} {what} dropped the child still exceeds {_unmet(solution, labels)}"
            )
        choice[i] = replacement[i]
        solution = _solution(layers, choice, limits, fixed)
    return solution


def shortgpt(*, layers: Layers, limits: dict[str, float], fixed: dict[str, float] | None = None,
             labels: dict[str, str] | None = None, layer_influence: list[float]) -> Solution:
    """Drop whole layers (attention and FFN), lowest Block Influence first, until the budgets are met."""
    _check_influence(layers, layer_influence, "layer influence")
    removed = BlockChoice(AttentionSpec(AttentionKind.noop), FfnSpec(FfnKind.noop))
    noop = [_index(layers, i, removed, "shortgpt") for i in range(len(layers))]
    return _drop_in_order(layers, limits, fixed or {}, labels or {}, layer_influence, noop, "shortgpt", "layers")


def llm_drop(*, layers: Layers, limits: dict[str, float], fixed: dict[str, float] | None = None,
             labels: dict[str, str] | None = None, attention_influence: list[float]) -> Solution:
    """Drop attention subblocks (the parent's FFN kept), lowest attention Block Influence first."""
    _check_influence(layers, attention_influence, "attention influence")
    noop = [
        _index(layers, i, BlockChoice(AttentionSpec(AttentionKind.noop), options[0].label.ffn), "llm-drop")
        for i, options in enumerate(layers)
    ]
    return _drop_in_order(layers, limits, fixed or {}, labels or {}, attention_influence, noop, "llm-drop",
                          "attention subblocks")


def _widths_with_parent_attention(options: list[Block]) -> dict[int, int]:
    """Dense FFN width -> index of the decoupled block pairing it with the parent's attention."""
    attention = options[0].label.attention
    out = {}
    for b, block in enumerate(options):
        c = block.label
        if not c.coupled and c.attention == attention and c.ffn.kind is FfnKind.dense:
            out[c.ffn.intermediate_size] = b
    return out


def uniform_ffn(*, layers: Layers, limits: dict[str, float], fixed: dict[str, float] | None = None,
                labels: dict[str, str] | None = None) -> Solution:
    """The widest FFN width the library has in every layer with a dense FFN that meets the budgets, the parent's
    attention kept. Layers without a dense FFN (MoE layers, a hybrid's Mamba and attention layers) keep the
    parent's own block, as Minitron's uniform width pruning leaves them."""
    per_layer = [_widths_with_parent_attention(options) for options in layers]
    dense = [w for w in per_layer if w]
    if not dense:
        raise PuzzleError("search.method=uniform-ffn: no layer of the library offers a dense FFN width")
    widths = sorted(set.intersection(*(set(w) for w in dense)), reverse=True)
    if not widths:
        raise PuzzleError("search.method=uniform-ffn: no dense FFN width is in every layer with a dense FFN")
    for width in widths:
        solution = _solution(layers, [w[width] if w else 0 for w in per_layer], limits, fixed or {})
        if _within(solution):
            return solution
    raise InfeasibleBudget(
        f"uniform-ffn: no FFN width common to every dense layer ({', '.join(map(str, widths))}) meets the budgets; "
        f"the narrowest, {widths[-1]}, exceeds {_unmet(solution, labels or {})}"
    )


def random_search(*, layers: Layers, limits: dict[str, float], fixed: dict[str, float] | None = None,
                  labels: dict[str, str] | None = None, seed: int, draws: int = RANDOM_DRAWS) -> Solution:
    """The first of up to `draws` architectures drawn uniformly (per layer, seeded) that meets the budgets."""
    rng = random.Random(seed)
    options = [[b for b, block in enumerate(layer) if not block.label.coupled] for layer in layers]
    for _ in range(draws):
        solution = _solution(layers, [rng.choice(o) for o in options], limits, fixed or {})
        if _within(solution):
            return solution
    names = ", ".join((labels or {}).get(k, k) for k in limits)
    raise InfeasibleBudget(f"random: none of {draws:,} random architectures (seed {seed}) meets {names}; relax a budget")


def depth_then_mip(*, layers: Layers, limits: dict[str, float], fixed: dict[str, float] | None = None,
                   labels: dict[str, str] | None = None, layer_influence: list[float], depth: int,
                   solver: SolverSettings = SolverSettings()) -> Solution:
    """Depth first, then Puzzle: ShortGPT's removal of the `depth` whole layers of least Block Influence,
    then the MIP over the blocks of the other layers."""
    _check_influence(layers, layer_influence, "layer influence")
    if not 0 <= depth <= len(layers):
        raise PuzzleError(f"search.depth: {depth} layers to remove, but the parent has {len(layers)}")
    removed = BlockChoice(AttentionSpec(AttentionKind.noop), FfnSpec(FfnKind.noop))
    noop = {i: _index(layers, i, removed, "depth-mip")
            for i in sorted(range(len(layers)), key=lambda i: (layer_influence[i], i))[:depth]}
    rest = [[options[noop[i]]] if i in noop else options for i, options in enumerate(layers)]
    [best] = solve(layers=rest, limits=limits, fixed=fixed, labels=labels, solver=solver)
    return _solution(layers, [noop.get(i, c) for i, c in enumerate(best.choice)], limits, fixed or {})


def greedy_search(*, layers: Layers, limits: dict[str, float], fixed: dict[str, float] | None = None,
                  labels: dict[str, str] | None = None) -> Solution:
    """The paper's greedy search as a method of its own: an error, not None, when it finds nothing."""
    solution = greedy(layers=layers, limits=limits, fixed=fixed)
    if solution is None:
        names = ", ".join((labels or {}).get(k, k) for k in limits)
        raise InfeasibleBudget(f"greedy: the greedy search finds no architecture within {names}; relax a budget")
    return solution
