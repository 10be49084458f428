"""Subblock modules of a heterogeneous decoder: one implementation for BLD, scoring and the child model.

This file imports only torch and transformers, so that a realized child can ship it beside its
weights and load with `trust_remote_code=True` on a machine without puzzle installed.

Every subblock maps the residual stream `hidden` [batch, seq, hidden] to what it adds to it
(its own pre-norm included), so a decoder layer is `h = h + attention(h); h = h + ffn(h)`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def causal_mask(q_len: int, kv_len: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[q_len, kv_len] bool, True where a query may attend; queries are the last q_len positions."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device).unsqueeze(1)
    k_pos = torch.arange(kv_len, device=device).unsqueeze(0)
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= q_pos - k_pos < window
    return allowed


class Attention(nn.Module):
    """Causal GQA softmax attention, full or windowed.

    Covers the dense families: q/k/v bias (Qwen2, Llama's attention_bias), o bias (Llama's
    attention_bias), per-head q/k RMS norms (Qwen3).
    """

    def __init__(
        self,
        hidden_size: int,
        num_attention_heads: int,
        num_key_value_heads: int,
        head_dim: int,
        window: int | None,
        rms_norm_eps: float,
        attention_bias: bool = False,
        output_bias: bool = False,
        qk_norm: bool = False,
        attn_implementation: str = "sdpa",
    ):
        super().__init__()
        if num_attention_heads % num_key_value_heads:
            raise ValueError(f"{num_key_value_heads} KV heads do not divide {num_attention_heads} query heads")
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.window = window
        self.attn_implementation = attn_implementation
        self.layer_idx: int | None = None  # set by the model that owns it, for the KV cache
        self.input_layernorm = RMSNorm(hidden_size, rms_norm_eps)
        self.q_proj = nn.Linear(hidden_size, num_attention_heads * head_dim, bias=attention_bias)
        self.k_proj = nn.Linear(hidden_size, num_key_value_heads * head_dim, bias=attention_bias)
        self.v_proj = nn.Linear(hidden_size, num_key_value_heads * head_dim, bias=attention_bias)
        self.o_proj = nn.Linear(num_attention_heads * head_dim, hidden_size, bias=output_bias)
        self.q_norm = RMSNorm(head_dim, rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, rms_norm_eps) if qk_norm else None

    def forward(self, hidden: torch.Tensor, position_embeddings, cache=None, padding_mask=None) -> torch.Tensor:
        b, s, _ = hidden.shape
        x = self.input_layernorm(hidden)
        q = self.q_proj(x).view(b, s, -1, self.head_dim)
        k = self.k_proj(x).view(b, s, -1, self.head_dim)
        v = self.v_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q.transpose(1, 2), k.transpose(1, 2), *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out = self._attend(q, k, v, padding_mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))

    def _attend(self, q, k, v, padding_mask) -> torch.Tensor:
        q_len, kv_len = q.shape[2], k.shape[2]
        groups = self.num_attention_heads // self.num_key_value_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        plain_causal = self.window is None and padding_mask is None and q_len == kv_len
        if self.attn_implementation == "sdpa" and plain_causal:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        allowed = causal_mask(q_len, kv_len, self.window, q.device)[None, None]
        if padding_mask is not None:  # [batch, kv_len], 1 for real tokens
            allowed = allowed & padding_mask[:, None, None, -kv_len:].bool()
        if self.attn_implementation == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        scores = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


class LinearAttention(nn.Module):
    """Attention replaced by one Linear: every token attends only to itself, W = W_O · W_V."""

    def __init__(self, hidden_size: int, rms_norm_eps: float, bias: bool = False):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden_size, rms_norm_eps)
        self.linear = nn.Linear(hidden_size, hidden_size, bias=bias)

    def forward(self, hidden: torch.Tensor, position_embeddings=None, cache=None, padding_mask=None) -> torch.Tensor:
        return self.linear(self.input_layernorm(hidden))


class MLP(nn.Module):
    """Gated (SwiGLU) FFN of any intermediate size."""

    def __init__(self, hidden_size: int, intermediate_size: int, rms_norm_eps: float, hidden_act: str = "silu"):
        super().__init__()
        if hidden_act != "silu":
            raise ValueError(f"hidden_act {hidden_act!r} is not supported (silu only)")
        self.post_attention_layernorm = RMSNorm(hidden_size, rms_norm_eps)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.post_attention_layernorm(hidden)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LinearMLP(nn.Module):
    """FFN replaced by one Linear, W = W_down · W_up."""

    def __init__(self, hidden_size: int, rms_norm_eps: float):
        super().__init__()
        self.post_attention_layernorm = RMSNorm(hidden_size, rms_norm_eps)
        self.linear = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(self.post_attention_layernorm(hidden))


class NoOp(nn.Module):
    """A removed subblock: adds nothing, holds no weights and no cache."""

    def forward(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(hidden)


class KVCache:
    """Per-layer KV cache for decoding. A windowed layer keeps only what its next queries can see."""

    def __init__(self, windows: dict[int, int | None]):
        self.windows = windows
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int):
        if layer_idx in self.keys:
            k = torch.cat([self.keys[layer_idx], k], dim=2)
            v = torch.cat([self.values[layer_idx], v], dim=2)
        window = self.windows.get(layer_idx)
        # The next query sees its own key plus the window - 1 before it.
        keep = k.shape[2] if window is None else min(k.shape[2], window - 1)
        self.keys[layer_idx], self.values[layer_idx] = k[:, :, k.shape[2] - keep :], v[:, :, v.shape[2] - keep :]
        return k, v

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))
