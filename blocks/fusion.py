"""FFN Fusion (NVIDIA, arXiv 2503.18908): consecutive attention-free FFNs become one wide FFN.

In a run of layers whose attention is removed, each layer adds FFN_k(RMSNorm_k(h_k)) to the residual
stream. Fusion feeds every FFN the run's input instead: h_out = h_i + Σ_k FFN_k(RMSNorm_k(h_i)). That
sum is one gated FFN whose gate/up rows and down columns are the concatenated FFNs', once each RMSNorm
weight is folded into its gate/up weights (W · diag(w_k)) and the shared norm's weight is ones. The
fused FFN sits in the run's first layer; the other layers of the run keep no FFN, so the layer count
and the meaning of `block_configs` are unchanged (the child is assembled in `puzzle.fuse_stage`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from puzzle.errors import PuzzleError
from puzzle.blocks.modeling_puzzle import MLP, DeciLMForCausalLM, RMSNorm


@dataclass(frozen=True)
class Dependency:
    """How much FFN `second` depends on FFN `first` (= second − 1): mean cosine distance over tokens."""

    first: int
    second: int
    distance: float


def is_fusable(layer) -> bool:
    return layer.self_attn is None and isinstance(layer.mlp, MLP)


def attention_free_runs(model: DeciLMForCausalLM) -> list[range]:
    """Maximal runs of at least 2 consecutive layers with attention removed and a dense gated FFN."""
    runs, start = [], None
    layers = list(model.model.layers)
    for i, layer in enumerate([*layers, None]):
        if layer is not None and is_fusable(layer):
            start = i if start is None else start
            continue
        if start is not None and i - start >= 2:
            runs.append(range(start, i))
        start = None
    return runs


def _ffn_of_layer(layer, hidden: torch.Tensor) -> torch.Tensor:
    return layer.mlp(layer.post_attention_layernorm(hidden))


@torch.no_grad()
def ffn_dependencies(
    model: DeciLMForCausalLM, *, runs: list[range], blocks: torch.Tensor, batch_size: int
) -> list[Dependency]:
    """For each consecutive pair (k, k+1) of each run, the cosine distance between FFN_{k+1} on its
    sequential input h_{k+1} = h_k + FFN_k(…) and on the input without FFN_k's contribution (h_k),
    averaged over the tokens of `blocks`. 0 means FFN_{k+1} does not notice FFN_k: fusing is free."""
    if blocks.ndim != 2 or len(blocks) == 0:
        raise PuzzleError(f"blocks: expected a non-empty [n, sequence] tensor of token ids, got shape {tuple(blocks.shape)}")
    if batch_size < 1:
        raise PuzzleError(f"batch_size: got {batch_size}; expected at least 1")
    layers = model.model.layers
    for run in runs:
        if len(run) < 2 or not all(is_fusable(layers[k]) for k in run):
            raise PuzzleError(f"layers {run.start}..{run.stop - 1} are not a run of attention-free dense FFNs")
    pairs = [(k - 1, k) for run in runs for k in run[1:]]
    sums = dict.fromkeys(pairs, 0.0)
    device = next(model.parameters()).device
    for start in range(0, len(blocks), batch_size):
        x = blocks[start : start + batch_size].to(device)
        states = model(x, use_cache=False, output_hidden_states=True, logits_to_keep=1).hidden_states
        for first, second in pairs:
            layer = layers[second]
            sequential = _ffn_of_layer(layer, states[second]).float()
            without_first = _ffn_of_layer(layer, states[first]).float()
            sums[first, second] += (1 - F.cosine_similarity(sequential, without_first, dim=-1)).sum().item()
    tokens = blocks.numel()
    return [Dependency(first, second, s / tokens) for (first, second), s in sums.items()]


def fusion_groups(
    runs: list[range], dependencies: list[Dependency], *, include_last: bool, max_distance: float | None = None
) -> list[range]:
    """The layer ranges to fuse: each run without its last FFN (unless `include_last`), cut between
    two FFNs whose dependency is at least `max_distance`; pieces shorter than 2 stay as they are."""
    if max_distance is not None and not max_distance > 0:
        raise PuzzleError(f"max_distance: got {max_distance}; expected a positive cosine distance")
    distance = {d.second: d.distance for d in dependencies}
    groups = []
    for run in runs:
        layers = run if include_last else run[:-1]
        start = layers.start
        for k in [*layers[1:], None]:
            cut = k is None or (max_distance is not None and distance[k] >= max_distance)
            if not cut:
                continue
            stop = layers.stop if k is None else k
            if stop - start >= 2:
                groups.append(range(start, stop))
            start = k
    return groups


def fuse_mlp(*, norms: list[RMSNorm], mlps: list[MLP]) -> tuple[RMSNorm, MLP]:
    """One RMSNorm (weight ones) and one wide MLP with norm(x) → MLP equal to Σ_k mlps[k](norms[k](x))."""
    if len(norms) != len(mlps) or len(mlps) < 2:
        raise PuzzleError(f"fuse_mlp: needs at least 2 FFNs with one norm each, got {len(mlps)} FFNs and {len(norms)} norms")
    eps = {n.variance_epsilon for n in norms}
    if len(eps) != 1:
        raise PuzzleError(f"fuse_mlp: the norms' eps differ ({sorted(eps)}); one shared norm cannot stand for them")
    if any(m.post_attention_layernorm is not None for m in mlps):
        raise PuzzleError("fuse_mlp: an FFN carries its own pre-norm; pass FFNs without one and their norms apart")
    eps = eps.pop()
    weight = mlps[0].gate_proj.weight
    hidden = weight.shape[1]
    size = sum(m.gate_proj.weight.shape[0] for m in mlps)
    fused = MLP(hidden, size, eps, norm=False).to(device=weight.device, dtype=weight.dtype)
    # Folded in float32 so that the only rounding is the final cast to the model's dtype.
    scale = [n.weight.float()[None, :] for n in norms]
    with torch.no_grad():
        fused.gate_proj.weight.copy_(torch.cat([m.gate_proj.weight.float() * s for m, s in zip(mlps, scale)]))
        fused.up_proj.weight.copy_(torch.cat([m.up_proj.weight.float() * s for m, s in zip(mlps, scale)]))
        fused.down_proj.weight.copy_(torch.cat([m.down_proj.weight.float() for m in mlps], dim=1))
    norm = RMSNorm(hidden, eps).to(device=weight.device, dtype=norms[0].weight.dtype)
    return norm, fused
