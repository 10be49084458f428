"""Replace-1-block scoring (DESIGN §5): the parent with only layer i replaced, on held-out tokens.

The parent's residual stream entering every layer, its next-token log-probabilities and its greedy
tokens are computed once (`ParentReference`); a candidate then runs only layers i..L from the cached
input of layer i. Metrics: KL(parent ‖ child) averaged over predicted positions, the child's LM loss,
and top-1/5/10 agreement (the parent's greedy token is among the child's k most likely).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

METRICS = ("kl", "lm_loss", "top1", "top5", "top10")


@dataclass(frozen=True)
class BlockMetrics:
    kl: float
    lm_loss: float
    top1: float  # agreement in [0, 1]
    top5: float
    top10: float

    def score(self, metric: str) -> float:
        """Lower is better for every metric the search can minimize (agreements become 1 − agreement)."""
        value = getattr(self, metric)
        return 1.0 - value if metric.startswith("top") else value


@dataclass
class _Batch:
    input_ids: torch.Tensor
    context: object  # the adapter's LayerContext for these blocks
    hidden: list[torch.Tensor]  # entering each layer, then the last layer's output
    log_probs: torch.Tensor  # parent's, at predicted positions
    greedy: torch.Tensor


class ParentReference:
    """The parent's activations and predictions on the held-out blocks, computed once."""

    def __init__(self, adapter, blocks: torch.Tensor, batch_size: int):
        self.adapter = adapter
        self.batches: list[_Batch] = []
        with torch.no_grad():
            for start in range(0, len(blocks), batch_size):
                ids = blocks[start : start + batch_size]
                hidden = adapter.embed(ids)
                ctx = adapter.context(hidden)
                states = adapter.hidden_states(ids, ctx)
                logits = adapter.head(states[-1])[:, :-1].float()
                self.batches.append(
                    _Batch(ids, ctx, states, F.log_softmax(logits, -1), logits.argmax(-1))
                )

    @torch.no_grad()
    def score(self, layer: int, attention: nn.Module, ffn: nn.Module) -> BlockMetrics:
        """Metrics of the parent whose layer `layer` is (attention, ffn)."""
        adapter = self.adapter
        totals = dict.fromkeys(METRICS, 0.0)
        count = 0
        for b in self.batches:
            h = b.hidden[layer]
            h = h + attention(h, b.context.candidate_position_embeddings)
            h = h + ffn(h)
            for i in range(layer + 1, adapter.num_layers):
                h = adapter.run_layer(i, h, b.context)
            logits = adapter.head(h)[:, :-1].float()
            self._accumulate(totals, b, logits)
            count += logits.shape[0] * logits.shape[1]
        return BlockMetrics(**{k: v / count for k, v in totals.items()})

    @staticmethod
    def _accumulate(totals: dict[str, float], b: _Batch, logits: torch.Tensor) -> None:
        log_q = F.log_softmax(logits, -1)
        totals["kl"] += (b.log_probs.exp() * (b.log_probs - log_q)).sum(-1).sum().item()
        targets = b.input_ids[:, 1:]
        totals["lm_loss"] += F.nll_loss(log_q.flatten(0, 1), targets.flatten(), reduction="sum").item()
        top = logits.topk(10, dim=-1).indices
        hits = top == b.greedy.unsqueeze(-1)
        for k in (1, 5, 10):
            totals[f"top{k}"] += hits[..., :k].any(-1).sum().item()
