"""Global knowledge distillation of the assembled child against the parent (docs/design.md §9).

Loss = kl_weight · KL(parent ‖ child) on next-token distributions
     + cosine_weight · Σ over layers of mean(1 − cos(h_child, h_parent)) on the residual stream
     + lm_weight · next-token cross-entropy (off by default: it hurt in the paper).

Every child keeps the parent's layer count (a removed block passes its input on), so layer i of the
child is compared with layer i of the parent. The parent runs under no_grad through its family adapter
(`parent_states`, passed in: distill does not import puzzle). Multi-process: every rank takes an equal
share of each batch and the gradients are averaged, so N processes take the same steps as one: by
DistributedDataParallel (every rank holds the whole child), or sharded by FSDP2 (the caller shards the
child: `fully_shard` on every decoder layer and then the rest; each rank holds 1/N of the weights,
gradients and AdamW moments, and gathers one layer at a time), each rank then checkpointing its own shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule

from puzzle.distill.metrics import kl_divergence
from puzzle.distill.precision import compute
from puzzle.distill.checkpoint import TrainingState, load_checkpoint, save_checkpoint, saved_step
from puzzle.distill.schedule import TrainingSettings, batch_indices

# (hidden states: the residual stream entering each layer and leaving the last, logits) of the parent.
ParentStates = Callable[[torch.Tensor], tuple[list[torch.Tensor], torch.Tensor]]


@dataclass(frozen=True)
class KdSettings(TrainingSettings):
    kl_weight: float = 1.0
    cosine_weight: float = 1.0
    lm_weight: float = 0.0


@dataclass(frozen=True)
class KdLosses:
    total: torch.Tensor
    kl: torch.Tensor
    cosine: torch.Tensor
    lm: torch.Tensor


@dataclass(frozen=True)
class KdOutcome:
    before: dict[str, float]  # held-out losses of the child as it came in (total, kl, cosine, lm)
    after: dict[str, float]
    train_loss: dict[str, list[float]]  # per step


def cosine_loss(child_states, parent_states) -> torch.Tensor:
    """Σ over layer outputs of the mean (1 − cosine) between the child's and the parent's residual stream."""
    return sum(
        (1 - F.cosine_similarity(c.float(), p.float(), dim=-1)).mean()
        for c, p in zip(child_states[1:], parent_states[1:], strict=True)
    )


def kd_losses(child: nn.Module, parent_states: ParentStates, input_ids: torch.Tensor, s: KdSettings) -> KdLosses:
    input_ids = input_ids.to(next(child.parameters()).device)  # batches are read on the host
    with torch.no_grad():
        p_states, p_logits = parent_states(input_ids)
    with compute(p_logits.dtype, p_logits.device):  # fp32 master weights, the parent's compute dtype
        out = child(input_ids, use_cache=False, output_hidden_states=True)
    kl = kl_divergence(p_logits, out.logits)
    cos = cosine_loss(out.hidden_states, p_states)
    logits = out.logits[:, :-1].float()
    lm = F.cross_entropy(logits.flatten(0, 1), input_ids[:, 1:].flatten())
    total = s.kl_weight * kl + s.cosine_weight * cos + s.lm_weight * lm
    return KdLosses(total, kl, cos, lm)


@torch.no_grad()
def evaluate(child: nn.Module, parent_states: ParentStates, blocks: torch.Tensor, s: KdSettings) -> dict[str, float]:
    """Mean of each loss term over held-out blocks."""
    sums = {"total": 0.0, "kl": 0.0, "cosine": 0.0, "lm": 0.0}
    batches = 0
    for start in range(0, len(blocks), s.batch_size):
        losses = kd_losses(child, parent_states, blocks[start : start + s.batch_size], s)
        for k in sums:
            sums[k] += getattr(losses, k).item()
        batches += 1
    return {k: v / batches for k, v in sums.items()}


def distill(
    child: nn.Module,
    parent_states: ParentStates,
    train_blocks: torch.Tensor,
    eval_blocks: torch.Tensor,
    settings: KdSettings,
    checkpoint_dir: Path,
    rank: int = 0,
    world: int = 1,
    on_step: Callable[[int, dict[str, float]], None] = lambda step, losses: None,
) -> KdOutcome:
    """Train every parameter of `child` for `settings.steps` steps; resumes from `checkpoint_dir` if it can.
    A child sharded by FSDP2 (`fully_shard`) over the `world` ranks trains sharded; a whole one by DDP."""
    if settings.batch_size % world:
        raise ValueError(f"batch size {settings.batch_size} does not split over {world} processes")
    sharded = isinstance(child, FSDPModule)
    if sharded:
        checkpoint_dir = checkpoint_dir / f"rank{rank}-of{world}"
    trained = nn.ModuleDict({"child": child})
    optimizer = torch.optim.AdamW(child.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    state = None
    if not sharded or _one_step_everywhere(saved_step(checkpoint_dir, repr(settings))):
        state = load_checkpoint(checkpoint_dir, trained, optimizer, tag=repr(settings))
    if state is None:
        child.eval()
        state = TrainingState(initial=evaluate(child, parent_states, eval_blocks, settings),
                              train_loss={k: [] for k in ("total", "kl", "cosine", "lm")})
    model = child
    if world > 1 and not sharded:
        model = nn.parallel.DistributedDataParallel(child)
    child.train()
    share = settings.batch_size // world
    while state.step < settings.steps:
        for group in optimizer.param_groups:
            group["lr"] = settings.learning_rate_at(state.step)
        batch = train_blocks[batch_indices(state.step, len(train_blocks), settings.batch_size, settings.seed)]
        losses = kd_losses(model, parent_states, batch[rank * share : (rank + 1) * share], settings)
        losses.total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        values = {k: round(getattr(losses, k).item(), 6) for k in state.train_loss}
        for k, v in values.items():
            state.train_loss[k].append(v)
        state.step += 1
        on_step(state.step, values)
        if (rank == 0 or sharded) and state.step % settings.checkpoint_every == 0 and state.step < settings.steps:
            save_checkpoint(checkpoint_dir, trained, optimizer, state, tag=repr(settings))
    child.eval()
    return KdOutcome(state.initial, evaluate(child, parent_states, eval_blocks, settings), state.train_loss)


def _one_step_everywhere(step: int | None) -> bool:
    """Every rank saved its shards at the same step (a kill while ranks were saving leaves them apart: then
    training starts over)."""
    import torch.distributed as dist

    steps = [None] * dist.get_world_size()
    dist.all_gather_object(steps, step)
    return steps[0] is not None and len(set(steps)) == 1
