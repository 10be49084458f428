"""Expert importance of an MoE layer (docs/design.md §3), measured on calibration tokens.

Two methods, both higher = more important, both 0 for an expert no token is routed to:
- `routed`: routed contribution, the mean over tokens of gate weight × ‖expert output‖ (a token that
  is not routed to the expert adds 0);
- `masking`: damage from masking, the normalized MSE of the layer's output when the expert is masked
  and its tokens are re-routed to their next choices: Σ‖out_masked − out‖² / Σ‖out‖².

Both run the project's own MoE module, initialized as an exact copy of the parent layer, so the
routing measured is the routing that candidates keep.
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F

from puzzle.errors import PuzzleError
from puzzle.blocks.hybrid import HybridSubblock
from puzzle.blocks.init import init_ffn
from puzzle.blocks.modeling_puzzle import MoE
from puzzle.distill.bld import parent_activations


class ImportanceMethod(str, enum.Enum):
    routed = "routed"
    masking = "masking"


def routed_contribution(moe: MoE | HybridSubblock, hidden: torch.Tensor) -> torch.Tensor:
    """Σ over the tokens of `hidden` (the FFN input, before its norm) of gate weight × ‖expert output‖, per expert."""
    if isinstance(moe, HybridSubblock):
        return _hybrid_routed_contribution(moe, hidden)
    x = moe.post_attention_layernorm(hidden).reshape(-1, hidden.shape[-1])
    weights, indices = moe.route(x)
    total = torch.zeros(moe.num_experts, dtype=torch.float64, device=x.device)
    for e in indices.unique().tolist():
        token, slot = torch.where(indices == e)
        norms = moe.experts.expert(e, x[token]).float().norm(dim=-1)
        total[e] = (weights[token, slot] * norms).sum().double()
    return total


def _hybrid_routed_contribution(sub: HybridSubblock, hidden: torch.Tensor) -> torch.Tensor:
    """`routed_contribution` of a Nemotron-H MoE (sigmoid router with score-correction biases, ReLU² experts
    behind an optional latent projection)."""
    moe = sub.mixer
    x = sub.norm(hidden).reshape(-1, hidden.shape[-1])
    _, weights, indices = moe.gate(x)
    latent = moe.fc1_latent_proj(x)
    total = torch.zeros(moe.experts.num_experts, dtype=torch.float64, device=x.device)
    for e in indices.unique().tolist():
        token, slot = torch.where(indices == e)
        inner = moe.experts.act_fn(F.linear(latent[token], moe.experts.up_proj[e]))
        out = moe.fc2_latent_proj(F.linear(inner, moe.experts.down_proj[e]))
        total[e] = (weights[token, slot] * out.float().norm(dim=-1)).sum().double()
    return total


def _masked_output(moe: MoE | HybridSubblock, hidden: torch.Tensor, expert: int) -> torch.Tensor:
    if not isinstance(moe, HybridSubblock):
        return moe(hidden, masked=expert)
    # A Nemotron-H router chooses by score + correction bias: an infinitely low bias is never chosen.
    bias = moe.mixer.gate.e_score_correction_bias
    kept = bias[expert].item()
    bias[expert] = float("-inf")
    try:
        return moe(hidden)
    finally:
        bias[expert] = kept


def _expert_count(moe: MoE | HybridSubblock) -> int:
    return moe.mixer.experts.num_experts if isinstance(moe, HybridSubblock) else moe.num_experts


def masking_damage(moe: MoE | HybridSubblock, hidden: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(Σ‖out_masked − out‖² per expert, Σ‖out‖²) over the tokens of `hidden` (the FFN input, before its norm)."""
    out = moe(hidden).float()
    errors = torch.stack([(_masked_output(moe, hidden, e).float() - out).pow(2).sum()
                          for e in range(_expert_count(moe))])
    return errors.double(), out.pow(2).sum().item()


@torch.no_grad()
def expert_importance(adapter, calibration: torch.Tensor, *, batch_size: int,
                      method: ImportanceMethod | str) -> list[torch.Tensor | None]:
    """Importance of every expert of every MoE layer (None for a dense layer), one parent pass per batch."""
    if batch_size <= 0:
        raise PuzzleError(f"expert importance: batch_size must be positive, got {batch_size}")
    try:
        method = ImportanceMethod(method)
    except ValueError:
        raise PuzzleError(f"expert importance: unknown method {method!r}; use routed or masking") from None
    dtype = next(adapter.model.parameters()).dtype
    copies: dict[int, MoE | HybridSubblock] = {}
    for i in range(adapter.num_layers):
        parent = adapter.parent_layer(i)
        if parent.shape.is_moe:
            copies[i] = init_ffn(parent.shape.ffn, parent).to(calibration.device, dtype).eval()
    sums = {i: torch.zeros(_expert_count(m), dtype=torch.float64, device=calibration.device) for i, m in copies.items()}
    energy = dict.fromkeys(copies, 0.0)
    tokens = 0
    for start in range(0, len(calibration), batch_size):
        batch = calibration[start : start + batch_size]
        acts = parent_activations(adapter, batch)
        for i, moe in copies.items():
            if method is ImportanceMethod.routed:
                sums[i] += routed_contribution(moe, acts.ffn_input(i))
            else:
                errors, out = masking_damage(moe, acts.ffn_input(i))
                sums[i] += errors
                energy[i] += out
        tokens += batch.numel()
    scale = {i: tokens if method is ImportanceMethod.routed else max(energy[i], 1e-30) for i in copies}
    return [(sums[i] / scale[i]).float() if i in copies else None for i in range(adapter.num_layers)]
