"""Block Influence (ShortGPT, Men et al. 2024): how much a layer or an attention subblock turns the residual stream.

BI = 1 − mean over tokens of cos(h_in, h_out). A layer whose output points where its input did adds
little that the next layers cannot do without, which is what the layer-removal baselines rank by.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from puzzle.distill.bld import parent_activations
from puzzle.config import PuzzleConfig
from puzzle.data import job_blocks
from puzzle.parents import load_parent


@dataclass(frozen=True)
class BlockInfluence:
    layer: list[float]  # per layer: h_out = h_in + attention + FFN
    attention: list[float]  # per layer: h_out = h_in + attention


def _cos_sum(a: torch.Tensor, b: torch.Tensor) -> float:
    # float64: BI of near-identity layers is a small difference from 1 that float32 rounding would swamp.
    return F.cosine_similarity(a.double(), b.double(), dim=-1).sum().item()


@torch.no_grad()
def block_influence(adapter, blocks: torch.Tensor, batch_size: int) -> BlockInfluence:
    """Block Influence of every layer and attention subblock of the parent, over the tokens of `blocks`."""
    layer = [0.0] * adapter.num_layers
    attention = [0.0] * adapter.num_layers
    for start in range(0, len(blocks), batch_size):
        acts = parent_activations(adapter, blocks[start : start + batch_size])
        for i, h in enumerate(acts.block_input):
            layer[i] += _cos_sum(h, h + acts.block_delta[i])
            attention[i] += _cos_sum(h, h + acts.attention_delta[i])
    tokens = blocks.numel()
    return BlockInfluence([1 - s / tokens for s in layer], [1 - s / tokens for s in attention])


def job_block_influence(config: PuzzleConfig) -> BlockInfluence:
    """Block Influence on the held-out blocks the scores are measured on."""
    parent = load_parent(config.parent)
    blocks = job_blocks(config, parent.tokenizer).validation[: config.scoring.validation_blocks]
    return block_influence(parent.adapter, blocks.to(parent.model.device), config.scoring.batch_size)
