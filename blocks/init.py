"""Training-free initialization of candidate subblocks from the parent layer (docs/design.md §3).

- pruned FFN: keep the channels of highest contribution C_j = mean|x_j| · ‖W_down[:, j]‖₂;
- fewer KV heads: mean-pool the K and V heads inside each merged group (queries unchanged);
- window attention: the parent's weights, only the mask changes;
- linear attention: W = W_O · W_V (V heads expanded to the query heads first), and linear FFN: W = W_down ·
  W_up (the gate is dropped), where BLD has no least-squares fit on calibration (`distill.bld.linear_fits`);
- MoE experts: keep the k most important experts (see `distill.experts`), slice the router rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from puzzle.errors import PuzzleError
from puzzle.blocks.heads import expand_kv_heads, mean_pool_kv_heads
from puzzle.blocks.hybrid import init_hybrid
from puzzle.blocks.modeling_puzzle import MLP, Attention, LinearAttention, LinearMLP, MoE, NoOp
from puzzle.blocks.specs import AttentionKind, AttentionSpec, FfnKind, FfnSpec, ParentShape


@dataclass(frozen=True)
class ParentLayer:
    """The parent layer's subblocks, as modules with the standard Hugging Face names (q_proj, …, down_proj)."""

    attention: nn.Module | None  # None: a hybrid layer without one
    ffn: nn.Module | None
    input_norm: nn.Module | None
    post_attention_norm: nn.Module | None
    shape: ParentShape
    rms_norm_eps: float
    config: object | None = None  # the parent's transformers config: a hybrid layer's mixers are built from it

    @property
    def device(self) -> torch.device:
        """Where the layer's weights are (a hybrid layer has only one of the two norms)."""
        norm = self.input_norm if self.input_norm is not None else self.post_attention_norm
        return norm.weight.device


def _copy(dst: nn.Module, src: nn.Module) -> None:
    """Copy a parameter or norm, refusing silent shape changes."""
    for name, p in src.named_parameters(recurse=False):
        getattr(dst, name).data.copy_(p.data)


def init_attention(spec: AttentionSpec, parent: ParentLayer, attn_implementation: str = "sdpa",
                   head_scores: torch.Tensor | None = None) -> nn.Module:
    """`head_scores`: a Mamba layer's head importances measured on calibration tokens (hybrid parents)."""
    shape, src = parent.shape, parent.attention
    if spec.kind is AttentionKind.noop:
        return NoOp()
    if shape.hybrid:
        return init_hybrid(spec, parent, head_scores)
    if spec.kind is AttentionKind.linear:
        return _linear_attention(parent)
    # The family's parts come from the shape, as the child config's do, so a candidate always fits its child.
    bias = shape.attention_bias
    module = Attention(
        shape.hidden_size, shape.num_attention_heads, spec.num_key_value_heads, shape.head_dim, spec.window,
        parent.rms_norm_eps, attention_bias=bias, output_bias=shape.attention_output_bias, qk_norm=shape.qk_norm,
        attn_implementation=attn_implementation, sinks=shape.attention_sinks,
    )
    _copy(module.input_layernorm, parent.input_norm)
    _copy(module.q_proj, src.q_proj)
    _copy(module.o_proj, src.o_proj)
    for name in ("k_proj", "v_proj"):
        for param in ("weight", "bias") if bias else ("weight",):
            pooled = mean_pool_kv_heads(
                getattr(getattr(src, name), param).data, shape.num_key_value_heads, spec.num_key_value_heads,
                shape.head_dim,
            )
            getattr(getattr(module, name), param).data.copy_(pooled)
    if module.q_norm is not None:
        _copy(module.q_norm, src.q_norm)
        _copy(module.k_norm, src.k_norm)
    if module.sinks is not None:  # one per query head, and pooling KV heads keeps every query head
        module.sinks.data.copy_(src.sinks.data)
    return module


def _linear_attention(parent: ParentLayer) -> LinearAttention:
    shape, src = parent.shape, parent.attention
    w_v = expand_kv_heads(src.v_proj.weight.data, shape.num_key_value_heads, shape.num_attention_heads, shape.head_dim)
    w_o = src.o_proj.weight.data
    bias = shape.attention_bias or shape.attention_output_bias
    module = LinearAttention(shape.hidden_size, parent.rms_norm_eps, bias=bias)
    _copy(module.input_layernorm, parent.input_norm)
    module.linear_attn.weight.data.copy_(w_o @ w_v)
    if bias:
        b = torch.zeros(shape.hidden_size, dtype=w_o.dtype)
        if shape.attention_bias:
            b_v = expand_kv_heads(src.v_proj.bias.data, shape.num_key_value_heads, shape.num_attention_heads, shape.head_dim)
            b = b + w_o @ b_v
        if shape.attention_output_bias:
            b = b + src.o_proj.bias.data
        module.linear_attn.bias.data.copy_(b)
    return module


def channel_contribution(down_input_abs_mean: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """C_j = mean over tokens of |x_j| · ‖W_down[:, j]‖₂, for x the input of down_proj."""
    return down_input_abs_mean * w_down.norm(dim=0)


def init_ffn(spec: FfnSpec, parent: ParentLayer, channel_scores: torch.Tensor | None = None) -> nn.Module:
    """`channel_scores`: importance of what pruning removes, channels of a dense FFN or experts of an MoE FFN."""
    shape, src = parent.shape, parent.ffn
    if spec.kind is FfnKind.noop:
        return NoOp()
    if shape.hybrid:
        return init_hybrid(spec, parent, channel_scores)
    if spec.kind is FfnKind.moe:
        return _init_moe(spec, parent, channel_scores)
    if spec.kind is FfnKind.linear:
        module = LinearMLP(shape.hidden_size, parent.rms_norm_eps)
        _copy(module.post_attention_layernorm, parent.post_attention_norm)
        module.linear_mlp.weight.data.copy_(src.down_proj.weight.data @ src.up_proj.weight.data)
        return module
    size = spec.intermediate_size
    if size > shape.intermediate_size:
        raise PuzzleError(f"FFN size {size} is larger than the parent's {shape.intermediate_size}")
    module = MLP(shape.hidden_size, size, parent.rms_norm_eps)
    _copy(module.post_attention_layernorm, parent.post_attention_norm)
    if size == shape.intermediate_size:
        keep = torch.arange(size)
    else:
        if channel_scores is None:
            raise PuzzleError("pruning an FFN needs channel contributions measured on calibration tokens")
        # Sorted so that pruning keeps the parent's channel order (makes 'keep all' exactly the parent).
        keep = channel_scores.topk(size).indices.sort().values
    module.gate_proj.weight.data.copy_(src.gate_proj.weight.data[keep])
    module.up_proj.weight.data.copy_(src.up_proj.weight.data[keep])
    module.down_proj.weight.data.copy_(src.down_proj.weight.data[:, keep])
    return module


def _init_moe(spec: FfnSpec, parent: ParentLayer, expert_scores: torch.Tensor | None) -> MoE:
    shape, src = parent.shape, parent.ffn
    if not shape.is_moe or spec.experts_per_token > shape.experts_per_token:
        raise PuzzleError(f"{spec.id} does not fit a parent layer with FFN {shape.ffn.id}")
    if spec.num_experts > shape.num_experts:
        raise PuzzleError(f"{spec.num_experts} experts are more than the parent layer's {shape.num_experts}")
    module = MoE(
        shape.hidden_size, spec.num_experts, spec.experts_per_token, shape.intermediate_size, parent.rms_norm_eps,
        shape.normalize_expert_weights, bias=shape.expert_bias, swiglu_limit=shape.swiglu_limit,
        swiglu_alpha=shape.swiglu_alpha,
    )
    _copy(module.post_attention_layernorm, parent.post_attention_norm)
    if spec.num_experts == shape.num_experts:
        keep = torch.arange(spec.num_experts)
    else:
        if expert_scores is None:
            raise PuzzleError("keeping fewer experts needs expert importances measured on calibration tokens")
        # Sorted so that the kept experts stay in the parent's order (keeping all is exactly the parent).
        keep = expert_scores.topk(spec.num_experts).indices.sort().values
    if hasattr(src, "router"):  # GPT-OSS's names and weight layout
        _copy_gpt_oss_experts(module, src, keep)
        return module
    module.gate.weight.data.copy_(src.gate.weight.data[keep])
    module.experts.gate_up_proj.data.copy_(src.experts.gate_up_proj.data[keep])
    module.experts.down_proj.data.copy_(src.experts.down_proj.data[keep])
    return module


def _deinterleave(gate_up: torch.Tensor) -> torch.Tensor:
    """GPT-OSS alternates gate and up along its last dim; the child stacks all gates above all ups."""
    return torch.cat([gate_up[..., ::2], gate_up[..., 1::2]], dim=-1)


def _copy_gpt_oss_experts(module: MoE, src: nn.Module, keep: torch.Tensor) -> None:
    """GPT-OSS stores expert weights as [in, out] (x @ W); the child, like nn.Linear, as [out, in]."""
    module.gate.weight.data.copy_(src.router.weight.data[keep])
    module.gate.bias.data.copy_(src.router.bias.data[keep])
    experts = src.experts
    module.experts.gate_up_proj.data.copy_(_deinterleave(experts.gate_up_proj.data[keep]).transpose(1, 2))
    module.experts.gate_up_proj_bias.data.copy_(_deinterleave(experts.gate_up_proj_bias.data[keep]))
    module.experts.down_proj.data.copy_(experts.down_proj.data[keep].transpose(1, 2))
    module.experts.down_proj_bias.data.copy_(experts.down_proj_bias.data[keep])


def shaped_module(spec: AttentionSpec | FfnSpec, parent: ParentLayer, attn_implementation: str = "sdpa") -> nn.Module:
    """A module with the spec's shapes, for callers that load trained weights into it or only time it.

    A pruned FFN keeps the parent's first channels, an MoE its first experts: no calibration is needed
    for a shape.
    """
    if isinstance(spec, AttentionSpec):
        return init_attention(spec, parent, attn_implementation)
    size = parent.shape.num_experts if parent.shape.is_moe else parent.shape.intermediate_size
    first_first = torch.arange(size, 0, -1, dtype=torch.float32)
    return init_ffn(spec, parent, first_first)
