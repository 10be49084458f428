"""Quality of a model against a reference on the same tokens: KL, NLL, perplexity, top-k agreement.

Every number of this kind the tool reports (scores, KD losses, eval, fusion, FP8 KV, the parent's
validation loss) comes from here (docs/design.md §10). All are means over predicted positions (every
position but a block's last):
- KL(reference ‖ model) = Σ_v p(v) · (log p(v) − log q(v)), in nats per token;
- NLL = −log q(next token); perplexity = exp(mean NLL);
- top-k agreement = share of positions where the reference's greedy token is among the model's k most likely.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

LogitsOf = Callable[[torch.Tensor], torch.Tensor]


def predicted_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """float32 log-probabilities at the predicted positions of [batch, sequence, vocab] logits."""
    return F.log_softmax(logits[:, :-1].float(), dim=-1)


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over all positions of KL(reference ‖ model); differentiable (the KD loss)."""
    p = F.log_softmax(reference_logits.float(), dim=-1)
    q = F.log_softmax(logits.float(), dim=-1)
    return F.kl_div(q.flatten(0, -2), p.flatten(0, -2), log_target=True, reduction="batchmean")


class QualityMeter:
    """Sums KL to the reference, NLL and top-k agreement over batches; `means()` gives the per-token values."""

    def __init__(self, top_k: tuple[int, ...] = (1,)):
        self.top_k = top_k
        self.sums = {"kl": 0.0, "lm_loss": 0.0, **{f"top{k}": 0.0 for k in top_k}}
        self.count = 0

    @torch.no_grad()
    def add(self, reference_log_probs: torch.Tensor, log_probs: torch.Tensor, input_ids: torch.Tensor) -> None:
        """One batch: both log-probabilities at predicted positions, and the batch's token ids."""
        log_probs = log_probs.to(reference_log_probs.device)
        targets = input_ids[:, 1:].to(log_probs.device)
        self.sums["kl"] += (reference_log_probs.exp() * (reference_log_probs - log_probs)).sum().item()
        self.sums["lm_loss"] += F.nll_loss(log_probs.flatten(0, 1), targets.flatten(), reduction="sum").item()
        if self.top_k:
            greedy = reference_log_probs.argmax(-1)
            hits = log_probs.topk(max(self.top_k), dim=-1).indices == greedy.unsqueeze(-1)
            for k in self.top_k:
                self.sums[f"top{k}"] += hits[..., :k].any(-1).sum().item()
        self.count += targets.numel()

    def means(self) -> dict[str, float]:
        return {name: total / self.count for name, total in self.sums.items()}


def perplexity(nll: float) -> float:
    return math.exp(nll)


def shared_batches(blocks: torch.Tensor, batch_size: int, rank: int = 0, world: int = 1):
    """(batch, counted) of this rank's share of `blocks` (every world-th block). Ranks whose share is shorter
    repeat a batch, uncounted, so that every rank runs as many forward passes: models sharded by FSDP2
    gather their layers in lockstep."""
    mine = blocks[rank::world]
    most = math.ceil(math.ceil(len(blocks) / world) / batch_size)
    for i in range(most):
        batch = mine[i * batch_size : (i + 1) * batch_size]
        yield (batch, True) if len(batch) else (blocks[:1], False)


def summed(values: list[float], world: int) -> list[float]:
    """`values` summed over the `world` ranks (an all-reduce; as they are for one process)."""
    if world == 1:
        return values
    import torch.distributed as dist

    total = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(total)
    return total.tolist()


@torch.no_grad()
def next_token_loss(logits_of: LogitsOf, blocks: torch.Tensor, batch_size: int, device=None, rank: int = 0,
                    world: int = 1) -> tuple[float, int]:
    """Mean next-token NLL over every predicted position of `blocks`, and the count of them; over `world`
    ranks, each taking its share (`shared_batches`)."""
    total, count = 0.0, 0
    for x, counted in shared_batches(blocks, batch_size, rank, world):
        x = x.to(device or blocks.device)
        log_probs = predicted_log_probs(logits_of(x))
        if counted:
            total += F.nll_loss(log_probs.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
            count += x[:, 1:].numel()
    total, count = summed([total, count], world)
    return total / count, int(count)


@torch.no_grad()
def quality(reference_logits_of: LogitsOf, models: dict[str, LogitsOf], blocks: torch.Tensor,
            batch_size: int, rank: int = 0, world: int = 1) -> tuple[dict[str, dict[str, float]], int]:
    """KL to the reference, NLL and top-1 agreement of each model (keyed by name; the reference itself is
    measured as "reference"), over `blocks`; and the number of predicted positions. Over `world` ranks, each
    takes its share of the blocks (`shared_batches`) and the sums are added."""
    meters = {name: QualityMeter() for name in ["reference", *models]}
    for x, counted in shared_batches(blocks, batch_size, rank, world):
        reference = predicted_log_probs(reference_logits_of(x))
        if counted:
            meters["reference"].add(reference, reference, x)
        for name, logits_of in models.items():
            log_probs = predicted_log_probs(logits_of(x))  # run on every rank, counted or not
            if counted:
                meters[name].add(reference, log_probs, x)
    for meter in meters.values():
        *sums, meter.count = summed([*meter.sums.values(), meter.count], world)
        meter.sums = dict(zip(meter.sums, sums))
    return {name: m.means() for name, m in meters.items()}, int(meters["reference"].count)


def hf_logits(model) -> LogitsOf:
    """A Hugging Face causal LM as a logits function (on the model's device, without a KV cache)."""
    return lambda x: model(x.to(model.device), use_cache=False).logits
