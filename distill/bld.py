"""Blockwise local distillation (docs/design.md §4).

Each candidate learns to reproduce what the parent's block adds to the residual stream, given the
parent's input to that block. Decoupled candidates replace one subblock and keep the other one of
the parent, frozen; coupled candidates replace both. Loss: normalized MSE
`MSE(child_delta, parent_delta) / MSE(parent_delta, 0)`.

One parent forward per batch feeds every candidate of a group, whatever their layers: the parent's
activations are computed once under no_grad, then each candidate runs only its own layer on them.
Candidates share no parameters and see the same batches, so one AdamW over a group is the same as one
optimizer each, and a library trained in several groups equals the one trained in one.

`adapter` is the family adapter of `puzzle.families` (passed in: distill does not import puzzle).

With a `pipeline` (`puzzle.distributed.LayerPipeline`), this process holds only a contiguous range of the
parent's layers: it receives the residual stream from the rank before, runs its layers, sends the stream
on, and trains the candidates of its own layers. Every rank then makes the same parent passes in the same
order, so ranks without a group to train still take part (`train_candidates` with no candidates).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from puzzle.blocks.init import init_attention, init_ffn
from puzzle.blocks.specs import AttentionKind, AttentionSpec, FfnSpec
from puzzle.distill.checkpoint import TrainingState, load_checkpoint, save_checkpoint, saved_step
from puzzle.distill.precision import compute
from puzzle.distill.schedule import TrainingSettings, batch_indices


@dataclass(frozen=True, order=True)
class Candidate:
    """One training subject: an attention, an FFN, or a coupled pair, in one layer."""

    layer: int
    attention: AttentionSpec | None = None
    ffn: FfnSpec | None = None

    def __post_init__(self):
        if self.attention is None and self.ffn is None:
            raise ValueError("a candidate replaces at least one subblock")

    @property
    def subblocks(self) -> str:
        return "+".join(s.id for s in (self.attention, self.ffn) if s is not None)

    @property
    def key(self) -> str:
        return f"L{self.layer:02d}.{self.subblocks}"

    @property
    def module_name(self) -> str:
        """`key` as a submodule name (torch forbids dots there)."""
        return self.key.replace(".", "_")


@dataclass(frozen=True)
class ParentActivations:
    """The parent's residual stream around every layer for one batch (no grad)."""

    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    block_input: list[torch.Tensor]
    attention_delta: list[torch.Tensor]
    block_delta: list[torch.Tensor | None]  # attention + FFN contribution: the target of every candidate
    # (None for the layers another rank of a pipeline holds, in every list)

    def ffn_input(self, layer: int) -> torch.Tensor:
        return self.block_input[layer] + self.attention_delta[layer]

    @property
    def like(self) -> torch.Tensor:
        """A tensor of the parent's dtype and device."""
        return next(t for t in self.block_delta if t is not None)


@torch.no_grad()
def parent_activations(adapter, input_ids: torch.Tensor, pipeline=None) -> ParentActivations:
    if pipeline is None or pipeline.first:
        hidden = adapter.embed(input_ids)
    else:
        hidden = pipeline.receive(tuple(input_ids.shape))
    ctx = adapter.context(hidden)
    n = adapter.num_layers
    inputs, attn, blocks = [None] * n, [None] * n, [None] * n
    for i in range(n) if pipeline is None else pipeline.layers:
        a = adapter.attention_delta(i, hidden, ctx)
        f = adapter.ffn_delta(i, hidden + a)
        inputs[i], attn[i], blocks[i] = hidden, a, a + f
        hidden = hidden + a + f
    if pipeline is not None and not pipeline.last:
        pipeline.send(hidden)
    return ParentActivations(ctx.candidate_position_embeddings, inputs, attn, blocks)


def _output_projection(adapter, layer: int) -> nn.Linear | None:
    """The projection whose input channels pruning cuts: a dense FFN's down_proj, a Mamba mixer's out_proj."""
    shape, parts = adapter.shape(layer), adapter.layer(layer)
    if shape.mixer is AttentionKind.mamba:
        return parts.attention.out_proj
    return parts.ffn.down_proj if shape.has_ffn and not shape.is_moe else None


@torch.no_grad()
def ffn_channel_scores(adapter, calibration: torch.Tensor, batch_size: int, pipeline=None) -> list[torch.Tensor | None]:
    """Channel contribution C_j = mean|x_j| · ‖W[:, j]‖ per dense layer, x the input of down_proj W; for a Mamba
    layer the same over out_proj, summed per head (None for MoE and attention layers, and for the layers another
    rank of a pipeline holds)."""
    sums = [None] * adapter.num_layers
    count = 0
    hooks = []
    held = range(adapter.num_layers) if pipeline is None else pipeline.layers
    projections = {i: p for i in held if (p := _output_projection(adapter, i)) is not None}
    for i, projection in projections.items():
        def hook(_module, args, i=i):
            x = args[0].abs().flatten(0, -2).sum(0)
            sums[i] = x if sums[i] is None else sums[i] + x

        hooks.append(projection.register_forward_pre_hook(hook))
    try:
        for start in range(0, len(calibration), batch_size):
            x = calibration[start : start + batch_size]
            parent_activations(adapter, x, pipeline)
            count += x.numel()
    finally:
        for h in hooks:
            h.remove()
    scores = [(s / count) * projections[i].weight.norm(dim=0) if i in projections else None for i, s in enumerate(sums)]
    for i in projections:
        mamba = adapter.shape(i).mamba
        if adapter.shape(i).mixer is AttentionKind.mamba:
            scores[i] = scores[i].reshape(mamba.num_heads, mamba.head_dim).sum(1)
    return scores


@dataclass(frozen=True)
class LinearSlot:
    """A subblock that a linear candidate replaces: `layer`'s attention or FFN, fitted with a bias or without."""

    layer: int
    attention: bool
    bias: bool


@dataclass(frozen=True)
class LinearFit:
    weight: torch.Tensor  # [hidden, hidden], float32, on the host
    bias: torch.Tensor | None


def linear_slots(candidates, adapter) -> list[LinearSlot]:
    """The subblocks some candidate replaces by one Linear; an attention's keeps the parent's biases."""
    slots = set()
    for c in candidates:
        if c.attention is not None and c.attention.linear:
            shape = adapter.shape(c.layer)
            slots.add(LinearSlot(c.layer, True, shape.attention_bias or shape.attention_output_bias))
        if c.ffn is not None and c.ffn.linear:
            slots.add(LinearSlot(c.layer, False, False))
    return sorted(slots, key=lambda s: (s.layer, not s.attention))


def _slot_io(adapter, acts: ParentActivations, slot: LinearSlot) -> tuple[torch.Tensor, torch.Tensor]:
    """A subblock's normalized input and what it adds to the residual stream, one row per token."""
    parts, i = adapter.layer(slot.layer), slot.layer
    if slot.attention:
        x, y = parts.input_norm(acts.block_input[i]), acts.attention_delta[i]
    else:
        x, y = parts.post_attention_norm(acts.ffn_input(i)), acts.block_delta[i] - acts.attention_delta[i]
    return x.flatten(0, -2).float(), y.flatten(0, -2).float()


def _solve(xtx: torch.Tensor, xty: torch.Tensor, bias: bool) -> LinearFit:
    """Ridge least squares, the ridge 1e-4 of the inputs' mean square: calibration tokens may not span every
    direction of the hidden state."""
    n = xtx.shape[0] - (0 if bias else 1)
    a, b = xtx[:n, :n].double(), xty[:n].double()
    ridge = 1e-4 * a.diagonal()[: xtx.shape[0] - 1].mean().clamp_min(1e-12)
    w = torch.linalg.solve(a + ridge * torch.eye(n, dtype=a.dtype, device=a.device), b).float().cpu()  # kept on the host
    return LinearFit(w[: xtx.shape[0] - 1].T.contiguous(), w[-1] if bias else None)


@torch.no_grad()
def linear_fits(adapter, calibration: torch.Tensor, batch_size: int, slots: list[LinearSlot], per_pass: int,
                pipeline=None) -> dict[LinearSlot, LinearFit]:
    """The least-squares Linear from each slot's normalized input to what the parent's subblock adds, on the
    calibration tokens: where a linear candidate starts (the products W_down·W_up and W_O·W_V start further
    from the parent than removing the subblock on the shipped parents). X^T X and X^T Y (X with a ones
    column) take 2(h+1)² float32 per slot, so a pass fits `per_pass` slots, as many as the memory plan
    finds room for (`puzzle.memory.linear_fit_slots`); in a pipeline every rank makes as many passes as the
    rank with the most, each rank fitting its own layers."""
    chunks = [slots[k : k + per_pass] for k in range(0, len(slots), per_pass)]
    passes = len(chunks) if pipeline is None else pipeline.most(len(chunks))
    fits = {}
    for n in range(passes):
        stats = {}
        for start in range(0, len(calibration), batch_size):
            acts = parent_activations(adapter, calibration[start : start + batch_size], pipeline)
            for slot in chunks[n] if n < len(chunks) else []:
                x, y = _slot_io(adapter, acts, slot)
                x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
                xtx, xty = stats.get(slot, (0.0, 0.0))
                stats[slot] = (xtx + x.T @ x, xty + x.T @ y)
        fits.update({slot: _solve(xtx, xty, slot.bias) for slot, (xtx, xty) in stats.items()})
    return fits


def build_module(candidate: Candidate, adapter, channel_scores: list[torch.Tensor | None] | None,
                 attn_impl: str, fits: dict[LinearSlot, LinearFit] | None = None) -> nn.ModuleDict:
    """`channel_scores`: per layer, channel contributions of a dense FFN or expert importances of an MoE FFN;
    `fits`: where linear candidates start (`linear_fits`), else from the parent's weights alone."""
    parent = adapter.parent_layer(candidate.layer)
    parts = {}
    scores = channel_scores[candidate.layer] if channel_scores is not None else None
    fit = {(s.layer, s.attention): f for s, f in (fits or {}).items()}
    if candidate.attention is not None:
        parts["attention"] = init_attention(candidate.attention, parent, attn_impl, scores)
        if candidate.attention.linear:
            _start_at(parts["attention"], fit.get((candidate.layer, True)))
    if candidate.ffn is not None:
        parts["ffn"] = init_ffn(candidate.ffn, parent, scores)
        if candidate.ffn.linear:
            _start_at(parts["ffn"], fit.get((candidate.layer, False)))
    return nn.ModuleDict(parts)


def _start_at(module: nn.Module, fit: LinearFit | None) -> None:
    """Put a linear candidate's one Linear at its least-squares fit."""
    if fit is None:
        return
    linear = next(m for m in module.modules() if isinstance(m, nn.Linear))
    linear.weight.data.copy_(fit.weight)
    if linear.bias is not None:
        linear.bias.data.copy_(fit.bias)


def predict(candidate: Candidate, module: nn.ModuleDict, adapter, acts: ParentActivations) -> torch.Tensor:
    """The candidate block's contribution to the residual stream, the frozen parent standing in for the rest."""
    i = candidate.layer
    h = acts.block_input[i]
    if "attention" in module:
        a = module["attention"](h, acts.position_embeddings)
    else:
        a = acts.attention_delta[i]
    f = module["ffn"](h + a) if "ffn" in module else adapter.ffn_delta(i, h + a)
    return a + f


def normalized_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    prediction, target = prediction.float(), target.float()  # reduced in fp32 whatever the parent's dtype
    return (prediction - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)


@torch.no_grad()
def evaluate(candidates, modules, adapter, eval_blocks: torch.Tensor, batch_size: int,
             pipeline=None) -> dict[str, float]:
    """Mean normalized MSE of every candidate on held-out blocks, one parent pass per batch."""
    totals = {c.key: 0.0 for c in candidates}
    batches = 0
    for start in range(0, len(eval_blocks), batch_size):
        acts = parent_activations(adapter, eval_blocks[start : start + batch_size], pipeline)
        with compute(acts.like.dtype, acts.like.device):
            for c in candidates:
                prediction = predict(c, modules[c.module_name], adapter, acts)
                totals[c.key] += normalized_mse(prediction, acts.block_delta[c.layer]).item()
        batches += 1
    return {k: v / batches for k, v in totals.items()}


def train_step(candidates, modules: nn.ModuleDict, adapter, input_ids: torch.Tensor, optimizer,
               pipeline=None) -> dict[str, float]:
    """One optimizer step of every candidate on one batch, from a single parent pass."""
    acts = parent_activations(adapter, input_ids, pipeline)
    if not candidates:
        return {}  # a pipeline rank with nothing to train passes the stream on
    losses = {}
    for c in candidates:
        with compute(acts.like.dtype, acts.like.device):
            loss = normalized_mse(predict(c, modules[c.module_name], adapter, acts), acts.block_delta[c.layer])
        loss.backward()  # frees this candidate's graph before the next one is built
        losses[c.key] = loss.item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return losses


@dataclass(frozen=True)
class CandidateResult:
    candidate: Candidate
    module: nn.ModuleDict
    initial_nmse: float
    final_nmse: float
    train_loss_first: float
    train_loss_last: float
    kept_initialization: bool  # training did not beat the init on held-out text, so the init is kept


def train_candidates(
    candidates: list[Candidate],
    modules: nn.ModuleDict,
    adapter,
    train_blocks: torch.Tensor,
    eval_blocks: torch.Tensor,
    settings: TrainingSettings,
    checkpoint_dir: Path,
    on_step: Callable[[int, dict[str, float]], None] = lambda step, losses: None,
    pipeline=None,
) -> list[CandidateResult]:
    """Train `candidates` together for `settings.steps` steps; resumes from `checkpoint_dir` if it can.

    `train_blocks` stay where they are (a token file on the host): each step's batch alone goes to the
    device of `eval_blocks`. In a pipeline every rank calls this for each round of groups, with no candidates
    when it has none left, and resumes only at a step every training rank saved."""
    params = [p for p in modules.parameters() if p.requires_grad]
    device = eval_blocks.device
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0, fused=True) if params else None
    # `modules` arrive initialized from the parent, so this is the init even when resuming. It waits on the
    # host: the device's memory is for the training state.
    initial_weights = {k: v.detach().to("cpu", copy=True) for k, v in modules.state_dict().items()}
    tag = repr(settings) + "|" + ",".join(c.key for c in candidates)
    saved = saved_step(checkpoint_dir, tag) if candidates else None
    resume = saved if pipeline is None else pipeline.agree_step(saved, bool(candidates))
    state = None
    if resume is not None:
        state = load_checkpoint(checkpoint_dir, modules, optimizer, tag=tag) if candidates else TrainingState(resume)
    if state is None:
        initial = evaluate(candidates, modules, adapter, eval_blocks, settings.batch_size, pipeline)
        state = TrainingState(initial=initial, train_loss={c.key: [] for c in candidates})
    modules.train()
    while state.step < settings.steps:
        for group in optimizer.param_groups if optimizer else []:
            group["lr"] = settings.learning_rate_at(state.step)
        x = train_blocks[batch_indices(state.step, len(train_blocks), settings.batch_size, settings.seed)].to(device)
        losses = train_step(candidates, modules, adapter, x, optimizer, pipeline)
        for key, loss in losses.items():
            state.train_loss[key].append(round(loss, 6))
        state.step += 1
        on_step(state.step, losses)
        if candidates and state.step % settings.checkpoint_every == 0 and state.step < settings.steps:
            save_checkpoint(checkpoint_dir, modules, optimizer, state, tag=tag)
    modules.eval()
    final = evaluate(candidates, modules, adapter, eval_blocks, settings.batch_size, pipeline)
    results = []
    for c in candidates:
        # Model selection on held-out text: a candidate that training made worse keeps its init.
        kept = final[c.key] >= state.initial[c.key]
        if kept:
            prefix = c.module_name + "."
            modules[c.module_name].load_state_dict(
                {k[len(prefix):]: v for k, v in initial_weights.items() if k.startswith(prefix)}
            )
        losses = state.train_loss[c.key]
        results.append(
            CandidateResult(
                candidate=c,
                module=modules[c.module_name],
                initial_nmse=state.initial[c.key],
                final_nmse=state.initial[c.key] if kept else final[c.key],
                train_loss_first=losses[0] if losses else float("nan"),
                train_loss_last=losses[-1] if losses else float("nan"),
                kept_initialization=kept,
            )
        )
    return results
