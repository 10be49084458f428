"""Subblock modules of a heterogeneous decoder: one implementation for BLD, scoring and the child model.

This file imports only torch and transformers, so that a realized child can ship it beside its
weights and load with `trust_remote_code=True` on a machine without puzzle installed.

Every subblock maps the residual stream `hidden` [batch, seq, hidden] to what it adds to it
(its own pre-norm included), so a decoder layer is `h = h + attention(h); h = h + ffn(h)`.
"""

from __future__ import annotations

import inspect

import torch
import torch.utils.checkpoint
from torch import nn
from torch.nn import functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

# transformers' word for the cache in layers, masks, model outputs and generate: `past_key_values` up to 5.19,
# `cache` in 5.24. A child loads on both sides, since vLLM pins a transformers before the rename.
CACHE = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


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


FP8_E4M3_MAX = 448.0


def fp8_round_trip(x: torch.Tensor, scale: float) -> torch.Tensor:
    """What an FP8 (E4M3) store with this per-tensor scale gives back. Clamped: E4M3 has no infinity, and
    whether an overflowing cast saturates or gives NaN depends on the torch version and device."""
    return (x / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).to(x.dtype) * scale


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
    attention_bias), per-head q/k RMS norms (Qwen3), and GPT-OSS's per-head attention sinks: a learned
    logit per query head that joins every row's softmax and takes probability mass without adding a value.
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
        norm: bool = True,
        sinks: bool = False,
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
        self.kv_fp8_scales: tuple[float, float] | None = None  # (K, V) scales of a simulated FP8 KV cache
        # Library entries carry their pre-norm; in the child model the decoder layer owns it (parent's names).
        self.input_layernorm = RMSNorm(hidden_size, rms_norm_eps) if norm else None
        self.q_proj = nn.Linear(hidden_size, num_attention_heads * head_dim, bias=attention_bias)
        self.k_proj = nn.Linear(hidden_size, num_key_value_heads * head_dim, bias=attention_bias)
        self.v_proj = nn.Linear(hidden_size, num_key_value_heads * head_dim, bias=attention_bias)
        self.o_proj = nn.Linear(num_attention_heads * head_dim, hidden_size, bias=output_bias)
        self.q_norm = RMSNorm(head_dim, rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, rms_norm_eps) if qk_norm else None
        # Zeros, not empty: a module built only to be timed must not compute on uninitialized memory.
        self.sinks = nn.Parameter(torch.zeros(num_attention_heads)) if sinks else None

    def forward(self, hidden: torch.Tensor, position_embeddings, cache=None, padding_mask=None) -> torch.Tensor:
        b, s, _ = hidden.shape
        x = self.input_layernorm(hidden) if self.input_layernorm is not None else hidden
        q = self.q_proj(x).view(b, s, -1, self.head_dim)
        k = self.k_proj(x).view(b, s, -1, self.head_dim)
        v = self.v_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q.transpose(1, 2), k.transpose(1, 2), *position_embeddings)
        if self.kv_fp8_scales is not None:  # K after rotary: what a KV cache stores
            k, v = fp8_round_trip(k, self.kv_fp8_scales[0]), fp8_round_trip(v, self.kv_fp8_scales[1])
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out = self._attend(q, k, v, padding_mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))

    def _attend(self, q, k, v, padding_mask) -> torch.Tensor:
        q_len, kv_len = q.shape[2], k.shape[2]
        groups = self.num_attention_heads // self.num_key_value_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        # sdpa's softmax cannot take the extra sink logit, so attention with sinks always runs eagerly.
        sdpa = self.attn_implementation == "sdpa" and self.sinks is None
        plain_causal = self.window is None and padding_mask is None and q_len == kv_len
        if sdpa and plain_causal:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        # One new token that may see every key in the cache (a window's cache holds no more than the window):
        # no mask to build, and sdpa keeps its fast path, as a decode step of the parent's own code does.
        if sdpa and q_len == 1 and padding_mask is None and (self.window is None or kv_len <= self.window):
            return F.scaled_dot_product_attention(q, k, v)
        allowed = causal_mask(q_len, kv_len, self.window, q.device)[None, None]
        if padding_mask is not None:  # [batch, kv_len], 1 for real tokens
            allowed = allowed & padding_mask[:, None, None, -kv_len:].bool()
        if sdpa:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        scores = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).float()
        if self.sinks is None:
            return torch.softmax(scores, dim=-1).to(q.dtype) @ v
        sink = self.sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        return probs.to(q.dtype) @ v


class LinearAttention(nn.Module):
    """Attention replaced by one Linear: every token attends only to itself, W = W_O · W_V."""

    def __init__(self, hidden_size: int, rms_norm_eps: float, bias: bool = False, norm: bool = True):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden_size, rms_norm_eps) if norm else None
        self.linear_attn = nn.Linear(hidden_size, hidden_size, bias=bias)  # DeciLM's name

    def forward(self, hidden: torch.Tensor, position_embeddings=None, cache=None, padding_mask=None) -> torch.Tensor:
        return self.linear_attn(self.input_layernorm(hidden) if self.input_layernorm is not None else hidden)


class MLP(nn.Module):
    """Gated (SwiGLU) FFN of any intermediate size."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, rms_norm_eps: float, hidden_act: str = "silu", norm: bool = True
    ):
        super().__init__()
        if hidden_act != "silu":
            raise ValueError(f"hidden_act {hidden_act!r} is not supported (silu only)")
        self.post_attention_layernorm = RMSNorm(hidden_size, rms_norm_eps) if norm else None
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.post_attention_layernorm(hidden) if self.post_attention_layernorm is not None else hidden
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LinearMLP(nn.Module):
    """FFN replaced by one Linear, W = W_down · W_up."""

    def __init__(self, hidden_size: int, rms_norm_eps: float, norm: bool = True):
        super().__init__()
        self.post_attention_layernorm = RMSNorm(hidden_size, rms_norm_eps) if norm else None
        self.linear_mlp = nn.Linear(hidden_size, hidden_size, bias=False)  # DeciLM's name

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.post_attention_layernorm(hidden) if self.post_attention_layernorm is not None else hidden
        return self.linear_mlp(x)


class Experts(nn.Module):
    """SwiGLU experts as fused 3-D weights, in the Mixtral / Qwen3-MoE layout (gate rows above up rows).

    GPT-OSS experts also fit: `bias` adds its per-expert gate/up and down biases, and `swiglu_limit` its
    clamped activation, (up + 1) · gate · sigmoid(alpha · gate) with gate ≤ limit and |up| ≤ limit. Its
    interleaved gate/up columns are reordered into this layout when the weights are copied.
    """

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, bias: bool = False,
        swiglu_limit: float | None = None, swiglu_alpha: float = 1.702,
    ):
        super().__init__()
        # Zeros, not empty: a module built only to be timed must not compute on uninitialized memory.
        self.gate_up_proj = nn.Parameter(torch.zeros(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.zeros(num_experts, hidden_size, intermediate_size))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(num_experts, 2 * intermediate_size)) if bias else None
        self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, hidden_size)) if bias else None
        self.swiglu_limit = swiglu_limit
        self.swiglu_alpha = swiglu_alpha

    def _bias(self, bias: torch.Tensor | None, index: int) -> torch.Tensor | None:
        return None if bias is None else bias[index]

    def _activate(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.swiglu_limit is None:
            return F.silu(gate) * up
        gate = gate.clamp(max=self.swiglu_limit)
        up = up.clamp(-self.swiglu_limit, self.swiglu_limit)
        return (up + 1) * gate * torch.sigmoid(gate * self.swiglu_alpha)

    def expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        gate_up = F.linear(x, self.gate_up_proj[index], self._bias(self.gate_up_proj_bias, index))
        gate, up = gate_up.chunk(2, dim=-1)
        return F.linear(self._activate(gate, up), self.down_proj[index], self._bias(self.down_proj_bias, index))

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [tokens, hidden]; each token's chosen experts `indices` [tokens, k] and their `weights`."""
        out = torch.zeros_like(x)
        # Experts in ascending order, the order the parents sum them in.
        for e in indices.unique().tolist():
            token, slot = torch.where(indices == e)
            routed = self.expert(e, x[token]) * weights[token, slot, None]
            out = out.index_add(0, token, routed.to(x.dtype))
        return out


class MoE(nn.Module):
    """Top-k routed experts (Mixtral, Qwen3-MoE, GPT-OSS): a softmax router over the experts this layer keeps.

    `bias` gives the router and the experts biases (GPT-OSS). GPT-OSS's softmax over the top-k logits is
    the renormalized top-k of the full softmax, so it routes with `normalize_expert_weights`.
    """

    def __init__(
        self, hidden_size: int, num_experts: int, experts_per_token: int, intermediate_size: int, rms_norm_eps: float,
        normalize_expert_weights: bool = True, hidden_act: str = "silu", norm: bool = True, bias: bool = False,
        swiglu_limit: float | None = None, swiglu_alpha: float = 1.702,
    ):
        super().__init__()
        if hidden_act != "silu":
            raise ValueError(f"hidden_act {hidden_act!r} is not supported (silu only)")
        if not 0 < experts_per_token <= num_experts:
            raise ValueError(f"{experts_per_token} experts per token cannot be routed among {num_experts} experts")
        self.experts_per_token = experts_per_token
        self.normalize_expert_weights = normalize_expert_weights
        self.post_attention_layernorm = RMSNorm(hidden_size, rms_norm_eps) if norm else None
        self.gate = nn.Linear(hidden_size, num_experts, bias=bias)  # the router, under the Mixtral/Qwen name
        self.experts = Experts(num_experts, hidden_size, intermediate_size, bias, swiglu_limit, swiglu_alpha)

    @property
    def num_experts(self) -> int:
        return self.gate.out_features

    def route(self, x: torch.Tensor, masked: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, indices) [tokens, k]; a `masked` expert is never chosen, its tokens go to their next choices."""
        logits = self.gate(x)
        if masked is not None:
            logits = logits.index_fill(-1, torch.tensor([masked], device=x.device), float("-inf"))
        weights, indices = torch.softmax(logits.float(), dim=-1).topk(self.experts_per_token, dim=-1)
        if self.normalize_expert_weights:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, indices

    def forward(self, hidden: torch.Tensor, masked: int | None = None) -> torch.Tensor:
        x = self.post_attention_layernorm(hidden) if self.post_attention_layernorm is not None else hidden
        flat = x.reshape(-1, x.shape[-1])
        weights, indices = self.route(flat, masked)
        return self.experts(flat, indices, weights).reshape(x.shape)


class NoOp(nn.Module):
    """A removed subblock: adds nothing, holds no weights and no cache."""

    def forward(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(hidden)


def new_kv_cache(windows: list[int | None]) -> Cache:
    """One cache slot per softmax-attention layer (in order); a windowed slot keeps at most its window."""
    layers = [DynamicSlidingWindowLayer(sliding_window=w) if w else DynamicLayer() for w in windows]
    return Cache(layers=layers or [DynamicLayer()])


# --- the child model (Nemotron-NAS / DeciLM layout) -------------------------------------------------

class BlockConfig(dict):
    """A `block_configs` entry (or its attention, ffn or moe part), read by key or by attribute. NVIDIA's
    DeciLM config turns entries into objects and vLLM's reader asks `block.attention.no_op` and
    `hasattr(block.ffn, "ffn_mult")`; a dict keeps config.json exactly as written. A missing word is an
    AttributeError, so `hasattr` tells an absent word from a false one."""

    def __init__(self, entries=(), **words):
        super().__init__(entries, **words)
        for word, value in self.items():
            if isinstance(value, dict) and not isinstance(value, BlockConfig):
                self[word] = BlockConfig(value)

    def __getattr__(self, word: str):
        try:
            return self[word]
        except KeyError:
            raise AttributeError(word) from None


class DeciLMConfig(PretrainedConfig):
    """A heterogeneous decoder: `block_configs` says, per layer, what its attention and FFN are.

    Keys the serving engines read: attention `no_op`, `replace_with_linear`, `n_heads_in_group`
    (query heads per KV head), `window_length`; FFN `no_op`, `replace_with_linear`, `ffn_mult`
    (intermediate = round_up(int(2·ffn_mult·hidden/3), 256)). Exact sizes are also recorded as
    `num_key_value_heads` and `intermediate_size`, which this model reads. An MoE FFN is
    `"moe": {"num_local_experts", "num_experts_per_tok", "intermediate_size" (per expert),
    "norm_topk_prob", "bias" (router and expert biases), "swiglu_limit" and "swiglu_alpha" (a clamped
    activation when the limit is set)}`, a field of this project's own: no engine's DeciLM reader knows it.

    Model-wide: `attention_bias` puts a bias on q, k and v, `attention_output_bias` on o; `qk_norm` adds
    per-head q/k RMS norms; `attention_sinks` a learned sink logit per query head in every softmax layer.
    """

    model_type = "nemotron-nas"

    vocab_size: int = 32000
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    sliding_window: int | None = None  # none model-wide: a window is a layer's (`window_length`)
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_parameters: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_output_bias: bool = False
    qk_norm: bool = False
    attention_sinks: bool = False
    block_configs: list | None = None
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self, **kwargs):
        # `per_layer_config` (transformers 5.x) repeats what block_configs says; it makes per-layer names
        # ambiguous on the model-wide config, but here they are the parent's and every layer reads its own.
        self.allow_global_per_layer_attribute_access = True
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.block_configs is None:
            self.block_configs = [
                {"attention": {"no_op": False, "replace_with_linear": False, "n_heads_in_group": 1},
                 "ffn": {"no_op": False, "replace_with_linear": False, "intermediate_size": self.intermediate_size}}
                for _ in range(self.num_hidden_layers)
            ]
        self.block_configs = [BlockConfig(block) for block in self.block_configs]
        super().__post_init__(**kwargs)


def _attention_of(config: DeciLMConfig, block: dict, attn_implementation: str) -> nn.Module | None:
    a = block["attention"]
    if a.get("no_op"):
        return None
    if a.get("replace_with_linear"):
        bias = config.attention_bias or config.attention_output_bias  # W_O·b_V + b_O
        return LinearAttention(config.hidden_size, config.rms_norm_eps, bias=bias, norm=False)
    kv = a.get("num_key_value_heads") or config.num_attention_heads // a["n_heads_in_group"]
    return Attention(
        config.hidden_size, config.num_attention_heads, kv, config.head_dim, a.get("window_length"),
        config.rms_norm_eps, attention_bias=config.attention_bias, output_bias=config.attention_output_bias,
        qk_norm=config.qk_norm, attn_implementation=attn_implementation, norm=False, sinks=config.attention_sinks,
    )


def _ffn_of(config: DeciLMConfig, block: dict) -> nn.Module | None:
    f = block["ffn"]
    if f.get("no_op"):
        return None
    if f.get("replace_with_linear"):
        return LinearMLP(config.hidden_size, config.rms_norm_eps, norm=False)
    if f.get("moe"):
        m = f["moe"]
        return MoE(
            config.hidden_size, m["num_local_experts"], m["num_experts_per_tok"], m["intermediate_size"],
            config.rms_norm_eps, m["norm_topk_prob"], config.hidden_act, norm=False, bias=m.get("bias", False),
            swiglu_limit=m.get("swiglu_limit"), swiglu_alpha=m.get("swiglu_alpha", 1.702),
        )
    size = f.get("intermediate_size")
    if size is None:
        size = int(2 * f["ffn_mult"] * config.hidden_size / 3)
        size = size + (-size) % 256
    return MLP(config.hidden_size, size, config.rms_norm_eps, config.hidden_act, norm=False)


class DeciLMDecoderLayer(nn.Module):
    """Pre-norm residual layer whose attention and FFN may each be softmax, linear, or absent."""

    def __init__(self, config: DeciLMConfig, layer_idx: int, attn_implementation: str = "sdpa"):
        super().__init__()
        block = config.block_configs[layer_idx]
        self.self_attn = _attention_of(config, block, attn_implementation)
        self.mlp = _ffn_of(config, block)
        if self.self_attn is not None:
            self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.mlp is not None:
            self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden, position_embeddings, cache=None, padding_mask=None):
        if self.self_attn is not None:
            hidden = hidden + self.self_attn(self.input_layernorm(hidden), position_embeddings, cache, padding_mask)
        if self.mlp is not None:
            hidden = hidden + self.mlp(self.post_attention_layernorm(hidden))
        return hidden


class DeciLMPreTrainedModel(PreTrainedModel):
    config_class = DeciLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["DeciLMDecoderLayer"]
    _supports_sdpa = True
    # transformers' default _init_weights covers Linear, Embedding, *RMSNorm and the rotary buffers.


class DeciLMModel(DeciLMPreTrainedModel):
    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        impl = "eager" if getattr(config, "_attn_implementation", None) == "eager" else "sdpa"
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DeciLMDecoderLayer(config, i, impl) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        # Only softmax-attention layers hold a KV cache; they get consecutive cache slots.
        self.cache_windows: list[int | None] = []
        for layer in self.layers:
            if isinstance(layer.self_attn, Attention):
                layer.self_attn.layer_idx = len(self.cache_windows)
                self.cache_windows.append(layer.self_attn.window)
        self.post_init()

    def new_cache(self) -> Cache:
        return new_kv_cache(self.cache_windows)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                inputs_embeds=None, output_hidden_states=False, **kwargs):
        """(final normed hidden states, cache, residual stream entering each layer and leaving the last, or None)."""
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = self.new_cache()
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None and self.cache_windows else 0
            position_ids = (torch.arange(hidden.shape[1], device=hidden.device) + past).unsqueeze(0)
        position_embeddings = self.rotary_emb(hidden, position_ids)
        states = [hidden] if output_hidden_states else None
        # Activation checkpointing (training only): keep each layer's input, recompute the rest in backward.
        recompute = self.training and getattr(self, "activation_checkpointing", False)
        for layer in self.layers:
            if recompute:
                hidden = torch.utils.checkpoint.checkpoint(layer, hidden, position_embeddings, None, attention_mask,
                                                           use_reentrant=False)
            else:
                hidden = layer(hidden, position_embeddings, cache if use_cache else None, attention_mask)
            if states is not None:
                states.append(hidden)
        return self.norm(hidden), (cache if use_cache else None), (tuple(states) if states is not None else None)


class DeciLMForCausalLM(DeciLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # FP8 KV-cache scales stored for vLLM (a child written with them): not weights of this model.
    _keys_to_ignore_on_load_unexpected = [r"self_attn\.[kv]_scale$"]

    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        self.model = DeciLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def set_kv_fp8_scales(self, scales: list[tuple[float, float]] | None) -> None:
        """Simulate an FP8 (E4M3) KV cache: one (K scale, V scale) per softmax-attention layer, in layer order
        (K and V are quantized and dequantized before the cache and the attention); None switches it off."""
        attentions = [layer.self_attn for layer in self.model.layers if isinstance(layer.self_attn, Attention)]
        if scales is not None and (len(scales) != len(attentions) or any(not (k > 0 and v > 0) for k, v in scales)):
            raise ValueError(f"expected {len(attentions)} positive (K scale, V scale) pairs, one per softmax-attention "
                             f"layer; got {scales}")
        for attention, pair in zip(attentions, scales or [None] * len(attentions)):
            attention.kv_fp8_scales = None if pair is None else (float(pair[0]), float(pair[1]))

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if model_kwargs.get(CACHE) is None and generation_config.use_cache is not False:
            model_kwargs[CACHE] = self.model.new_cache()
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                inputs_embeds=None, labels=None, logits_to_keep=0, output_hidden_states=False, **kwargs):
        cache = kwargs.pop("past_key_values", cache)  # generate's word before the rename
        # Hidden states are the residual stream before the final norm (a no-op layer passes its input on).
        hidden, cache, states = self.model(input_ids, attention_mask, position_ids, cache, use_cache, inputs_embeds,
                                           output_hidden_states)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) and logits_to_keep else slice(None)
        logits = self.lm_head(hidden[:, keep])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=states, **{CACHE: cache})
