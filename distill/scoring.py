"""Replace-1-block scoring (docs/design.md §5): the parent with only layer i replaced, on held-out tokens.

The parent's residual stream entering every layer is computed once (`ParentReference`); a candidate
then runs only layers i..L from the cached input of layer i. The parent's log-probabilities are recomputed
from its cached last hidden state for each score: one lm_head per batch is cheap, while caching float32
log-probabilities of every held-out token would outweigh the parent itself (33 GB for 16 blocks of 4,096
tokens at Llama-3's 128K vocabulary).

With a `pipeline` (`puzzle.distributed.LayerPipeline`) each rank holds a contiguous share of the layers
and caches only their inputs; a replaced layer's output runs on through the later ranks' layers, and the
last rank, which holds the final norm and head, measures the block. Every rank scores every block in the
same order (a rank before the replaced layer has nothing to do). Metrics: KL(parent ‖ child) averaged over predicted positions, the child's LM loss,
and top-1/5/10 agreement (the parent's greedy token is among the child's k most likely).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from puzzle.distill.metrics import QualityMeter, predicted_log_probs
from puzzle.distill.precision import compute

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
    hidden: list[torch.Tensor | None]  # entering each layer, then the last layer's output (None: another rank's)


class ParentReference:
    """The parent's activations and predictions on the held-out blocks, computed once."""

    def __init__(self, adapter, blocks: torch.Tensor, batch_size: int, pipeline=None):
        self.adapter, self.pipeline = adapter, pipeline
        self.held = range(adapter.num_layers) if pipeline is None else pipeline.layers
        self.batches: list[_Batch] = []
        with torch.no_grad():
            for start in range(0, len(blocks), batch_size):
                ids = blocks[start : start + batch_size]
                hidden = self._entering(ids)
                ctx = adapter.context(hidden)
                states = [None] * (adapter.num_layers + 1)
                for i in self.held:
                    states[i] = hidden
                    hidden = adapter.run_layer(i, hidden, ctx)
                states[self.held.stop] = hidden
                self._pass_on(hidden)
                self.batches.append(_Batch(ids, ctx, states))

    def _entering(self, ids: torch.Tensor) -> torch.Tensor:
        """The stream entering this rank's first layer: embedded here, or received from the rank before."""
        if self.pipeline is None or self.pipeline.first:
            return self.adapter.embed(ids)
        return self.pipeline.receive(tuple(ids.shape))

    def _pass_on(self, hidden: torch.Tensor) -> bool:
        """Send the stream to the next rank; False on the rank that ends the model."""
        if self.pipeline is None or self.pipeline.last:
            return False
        self.pipeline.send(hidden)
        return True

    @torch.no_grad()
    def score(self, layer: int, attention: nn.Module | None, ffn: nn.Module | None) -> BlockMetrics | None:
        """Metrics of the parent whose layer `layer` is (attention, ffn); in a pipeline, on the last rank only
        (the modules are needed only by the rank that holds `layer`)."""
        if layer >= self.held.stop:
            return None  # a later rank holds the layer; this one has no part in its score
        adapter = self.adapter
        meter = QualityMeter(top_k=(1, 5, 10))
        for b in self.batches:
            if layer in self.held:
                h = b.hidden[layer]
                with compute(h.dtype, h.device):  # a candidate (fp32 weights) in a bf16/fp16 parent
                    h = h + attention(h, b.context.candidate_position_embeddings)
                    h = (h + ffn(h)).to(b.hidden[layer].dtype)
                first = layer + 1
            else:
                h, first = self.pipeline.receive(tuple(b.input_ids.shape)), self.held.start
            for i in range(first, self.held.stop):
                h = adapter.run_layer(i, h, b.context)
            if self._pass_on(h):
                continue
            reference = predicted_log_probs(adapter.head(b.hidden[-1]))
            meter.add(reference, predicted_log_probs(adapter.head(h)), b.input_ids)
        return BlockMetrics(**meter.means()) if meter.count else None
