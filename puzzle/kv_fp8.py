"""FP8 (E4M3) KV cache: per-layer scales calibrated on text, and the KL such a cache adds to a model.

A layer's K scale is max |K| over the calibration tokens / 448 (the E4M3 maximum), K taken after the
rotary embedding, as a KV cache stores it; likewise for V. The cache itself is simulated: the child's
attention quantizes and dequantizes K and V (`DeciLMForCausalLM.set_kv_fp8_scales`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from puzzle.errors import PuzzleError
from puzzle.blocks.modeling_puzzle import FP8_E4M3_MAX, Attention, DeciLMForCausalLM
from puzzle.distill.metrics import hf_logits, quality

# A layer whose K or V is zero on every calibration token would get a zero scale; any positive one is exact.
_SMALLEST_MAX = 1e-12


@dataclass(frozen=True)
class KvScales:
    layers: tuple[int, ...]  # the layers with softmax attention (one cache slot each), in order
    k: tuple[float, ...]
    v: tuple[float, ...]

    def pairs(self) -> list[tuple[float, float]]:
        return list(zip(self.k, self.v))


@dataclass(frozen=True)
class Fp8Effect:
    kl: float  # mean KL(reference ‖ model) per token with the model's own KV
    kl_fp8: float  # the same with the simulated FP8 KV cache
    scales: KvScales

    @property
    def added_kl(self) -> float:
        return self.kl_fp8 - self.kl


class _AbsMaxCache:
    """Stands in for the KV cache of a whole-sequence forward: records max |K| and max |V| per cache slot
    and hands K and V back unchanged, so the attention is the uncached one."""

    def __init__(self, slots: int):
        self.k = [0.0] * slots
        self.v = [0.0] * slots

    def get_seq_length(self) -> int:
        return 0

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int):
        self.k[layer_idx] = max(self.k[layer_idx], k.abs().max().item())
        self.v[layer_idx] = max(self.v[layer_idx], v.abs().max().item())
        return k, v


def _check_blocks(blocks: torch.Tensor, batch_size: int) -> None:
    if blocks.ndim != 2 or len(blocks) == 0:
        raise PuzzleError(f"blocks: expected a non-empty [n, sequence] tensor of token ids, got shape {tuple(blocks.shape)}")
    if batch_size < 1:
        raise PuzzleError(f"batch_size: got {batch_size}; expected at least 1")


@torch.no_grad()
def calibrate_kv_scales(model: DeciLMForCausalLM, *, blocks: torch.Tensor, batch_size: int) -> KvScales:
    """Per-layer FP8 scales of K and V on these token blocks. Switches the model's FP8 simulation off, so
    that the scales measure its own K and V, not already rounded ones."""
    _check_blocks(blocks, batch_size)
    model.set_kv_fp8_scales(None)
    recorder = _AbsMaxCache(len(model.model.cache_windows))
    device = next(model.parameters()).device
    for start in range(0, len(blocks), batch_size):
        model(blocks[start : start + batch_size].to(device), cache=recorder, use_cache=True, logits_to_keep=1)
    layers = tuple(i for i, layer in enumerate(model.model.layers) if isinstance(layer.self_attn, Attention))
    return KvScales(layers, tuple(max(m, _SMALLEST_MAX) / FP8_E4M3_MAX for m in recorder.k),
                    tuple(max(m, _SMALLEST_MAX) / FP8_E4M3_MAX for m in recorder.v))


def fp8_kv_effect(
    reference_logits_of, models: dict[str, DeciLMForCausalLM], *, calibration: torch.Tensor, blocks: torch.Tensor,
    batch_size: int,
) -> dict[str, Fp8Effect]:
    """Each model's KL to the reference on `blocks` with its own KV and with an FP8 KV cache calibrated on
    `calibration`. The models are left with the simulation off."""
    _check_blocks(blocks, batch_size)
    scales = {name: calibrate_kv_scales(m, blocks=calibration, batch_size=batch_size) for name, m in models.items()}
    # quality() names the reference "reference"; numbered keys keep a model of that name apart from it.
    numbered = {str(i): hf_logits(m) for i, m in enumerate(models.values())}
    own, _ = quality(reference_logits_of, numbered, blocks, batch_size)
    try:
        for name, model in models.items():
            model.set_kv_fp8_scales(scales[name].pairs())
        fp8, _ = quality(reference_logits_of, numbered, blocks, batch_size)
    finally:
        for model in models.values():
            model.set_kv_fp8_scales(None)
    return {name: Fp8Effect(own[str(i)]["kl"], fp8[str(i)]["kl"], scales[name]) for i, name in enumerate(models)}
