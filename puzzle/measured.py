"""Children measured whole, in memory, from the library: their KL to the parent on held-out calibration
tokens (docs/design.md §7), for the searches that look past the sum of replace-1-block scores.

Many children are measured at once and share work where they agree: the residual stream entering layer i
depends only on the blocks of layers 0..i−1, so children are visited in the order of their blocks (a trie
walked depth first) and each runs only the layers after the longest prefix it shares with the child
before it. A layer's blocks run as in the realized child (the same library modules, computed in the
parent's dtype), so a measured child is the child `puzzle realize` would write.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from puzzle.blocks.specs import BlockChoice
from puzzle.distill.library import Library
from puzzle.distill.metrics import QualityMeter, predicted_log_probs
from puzzle.distill.precision import compute

Child = tuple[BlockChoice, ...]


@dataclass(frozen=True)
class _Batch:
    input_ids: torch.Tensor
    context: object  # the adapter's LayerContext
    embedded: torch.Tensor  # the stream entering layer 0
    last: torch.Tensor  # the parent's last hidden state: its log-probabilities are recomputed when needed


def shared_prefix(a: Child | None, b: Child) -> int:
    """How many leading layers two children share."""
    if a is None:
        return 0
    n = 0
    while n < len(b) and a[n] == b[n]:
        n += 1
    return n


class ChildMeter:
    """KL(parent ‖ child) of children given as one BlockChoice per layer, on `blocks` (held-out tokens)."""

    def __init__(self, parent, library: Library, blocks: torch.Tensor, batch_size: int):
        self.parent, self.adapter, self.library = parent, parent.adapter, library
        self.batches: list[_Batch] = []
        self.evaluations = 0  # children measured so far (each on however many blocks it was asked)
        with torch.no_grad():
            for start in range(0, len(blocks), batch_size):
                ids = blocks[start : start + batch_size].to(parent.device)
                hidden = self.adapter.embed(ids)
                ctx = self.adapter.context(hidden)
                self.batches.append(_Batch(ids, ctx, hidden, self.adapter.hidden_states(ids, ctx)[-1]))

    @property
    def blocks(self) -> int:
        return sum(len(b.input_ids) for b in self.batches)

    @torch.no_grad()
    def kl(self, children: list[Child], batches: int | None = None) -> list[float]:
        """Each child's mean KL to the parent per predicted token, on the first `batches` batches (all by
        default: fewer for a cheap first look)."""
        used = self.batches[: batches or len(self.batches)]
        order = sorted(range(len(children)), key=lambda k: [c.id for c in children[k]])
        results: list[float] = [0.0] * len(children)
        # Per batch, the stream entering each layer of the child measured last.
        stacks = [[b.embedded] for b in used]
        previous: Child | None = None
        for k in order:
            child = tuple(children[k])
            start = shared_prefix(previous, child)  # the stream entering layer `start` is still valid
            for stack in stacks:
                del stack[start + 1 :]
            for i in range(start, len(child)):
                attention, ffn = self.library.block(i, child[i])
                for b, stack in zip(used, stacks):
                    h = stack[i]
                    with compute(h.dtype, h.device):  # library modules (fp32) in a bf16/fp16 parent
                        h = h + attention(h, b.context.candidate_position_embeddings)
                        h = (h + ffn(h)).to(stack[i].dtype)
                    stack.append(h)
            meter = QualityMeter(top_k=())
            for b, stack in zip(used, stacks):
                reference = predicted_log_probs(self.adapter.head(b.last))
                meter.add(reference, predicted_log_probs(self.adapter.head(stack[len(child)])), b.input_ids)
            results[k] = meter.means()["kl"]
            previous = child
            self.evaluations += 1
        return results


def job_meter(config) -> ChildMeter:
    """The job's children measured on search.measure_blocks training blocks (the held-out blocks are eval's)."""
    from puzzle.data import job_blocks
    from puzzle.parents import load_parent
    from puzzle.rundir import RunDir, Stage

    parent = load_parent(config.parent)
    library = Library(RunDir.of(config).stage_dir(Stage.library), parent.adapter)
    blocks = job_blocks(config, parent.tokenizer).calibration(config.search.measure_blocks)
    return ChildMeter(parent, library, blocks, config.scoring.batch_size)
