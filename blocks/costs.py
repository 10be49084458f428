"""Analytic costs of a subblock: parameters, KV-cache bytes, FLOPs and bytes moved (docs/design.md §6).

Pure functions of a spec, the parent layer's shape and a scenario; the measured profile and the
roofline both use them for the memory side, and the roofline for time.

A Mamba-2 mixer (hybrid parents) holds a recurrent state per sequence instead of a KV cache: its size does
not grow with the context, and a decode step reads and writes it once.

An MoE FFN holds all its kept experts in memory, but a token computes with only its router and the
experts it is routed to (its *active* parameters); a batch of tokens reads the weights of every
expert that at least one of them is routed to.
"""

from __future__ import annotations

from dataclasses import dataclass

from puzzle.blocks.specs import AttentionKind, AttentionSpec, FfnKind, FfnSpec, ParentShape, SubblockSpec

DTYPE_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "fp8": 1.0}
# Mamba's SSM state is kept in float32 whatever the weights (transformers' and the released models' default):
# rounding it would compound over every token.
SSM_STATE_BYTES = 4.0


@dataclass(frozen=True)
class Scenario:
    batch_size: int
    prefill_length: int
    decode_length: int
    weight_dtype: str = "bfloat16"
    kv_dtype: str = "bfloat16"

    def __post_init__(self):
        if min(self.batch_size, self.prefill_length, self.decode_length) <= 0:
            raise ValueError("batch size, prefill length and decode length must be positive")

    def latency(self, prefill_seconds: float, decode_step_seconds: float) -> float:
        """Seconds per batch: the prefill and every decode step. The one latency every stage uses."""
        return prefill_seconds + self.decode_length * decode_step_seconds

    @property
    def decode_context(self) -> int:
        """Tokens in the cache at the average decode step."""
        return self.prefill_length + self.decode_length // 2


def _mamba_sizes(spec: AttentionSpec, shape: ParentShape) -> tuple[int, int, int]:
    """(inner channels, convolved channels, in_proj rows) of a Mamba mixer with the spec's heads."""
    m = shape.mamba
    inner = spec.mamba_num_heads * m.head_dim
    conv = inner + 2 * m.groups * m.state_size  # x, then B and C
    return inner, conv, inner + conv + spec.mamba_num_heads  # z, then x, B, C, then dt per head


def parameters(spec: SubblockSpec, shape: ParentShape) -> int:
    h, d = shape.hidden_size, shape.head_dim
    if spec.removed:
        return 0
    if isinstance(spec, AttentionSpec):
        if spec.kind is AttentionKind.mamba:
            inner, conv, rows = _mamba_sizes(spec, shape)
            m = shape.mamba
            # norm, in_proj, the convolution, dt_bias/A_log/D, the gated norm, out_proj; and the biases
            n = h + h * rows + conv * m.conv_kernel + 3 * spec.mamba_num_heads + inner + inner * h
            return n + (conv if m.conv_bias else 0) + (rows + h if m.projection_bias else 0)
        if spec.kind is AttentionKind.linear:  # W_O·W_V, its bias from v's and o's
            return h + h * h + (h if shape.attention_bias or shape.attention_output_bias else 0)
        q, kv = shape.num_attention_heads * d, spec.num_key_value_heads * d
        n = h + h * q + 2 * h * kv + q * h  # norm, q, k, v, o
        n += (q + 2 * kv) if shape.attention_bias else 0
        n += h if shape.attention_output_bias else 0
        n += shape.num_attention_heads if shape.attention_sinks else 0
        return n + (2 * d if shape.qk_norm else 0)
    if spec.kind is FfnKind.linear:
        return h + h * h
    if spec.kind is FfnKind.moe:
        return h + spec.num_experts * (_router_row(shape) + _expert(shape))  # norm, router row and expert each
    return h + 3 * h * spec.intermediate_size


def _router_row(shape: ParentShape) -> int:
    return shape.hidden_size + (1 if shape.expert_bias else 0)


def _expert(shape: ParentShape) -> int:
    h, i = shape.hidden_size, shape.intermediate_size
    return 3 * h * i + ((2 * i + h) if shape.expert_bias else 0)  # gate/up and down, and their biases


def active_parameters(spec: SubblockSpec, shape: ParentShape) -> int:
    """Parameters one token computes with: all of a subblock's, except the experts it is not routed to."""
    if isinstance(spec, FfnSpec) and spec.kind is FfnKind.moe:
        return shape.hidden_size + spec.num_experts * _router_row(shape) + spec.experts_per_token * _expert(shape)
    return parameters(spec, shape)


def kv_cache_bytes(spec: SubblockSpec, shape: ParentShape, scenario: Scenario, tokens: int | None = None) -> float:
    """What a subblock keeps per batch while generating. Softmax attention: 2 · kv_heads · head_dim · bytes ·
    batch · tokens, a window capping the tokens. Mamba: its recurrent state, whatever the tokens (`state_bytes`).
    Nothing else keeps anything."""
    if isinstance(spec, AttentionSpec) and spec.kind is AttentionKind.mamba:
        return state_bytes(spec, shape, scenario)
    if not isinstance(spec, AttentionSpec) or spec.kind is not AttentionKind.attention:
        return 0.0
    tokens = scenario.prefill_length + scenario.decode_length if tokens is None else tokens
    if spec.window is not None:
        tokens = min(tokens, spec.window)
    per_token = 2 * spec.num_key_value_heads * shape.head_dim * DTYPE_BYTES[scenario.kv_dtype]
    return per_token * scenario.batch_size * tokens


def state_bytes(spec: AttentionSpec, shape: ParentShape, scenario: Scenario) -> float:
    """A Mamba mixer's state for a batch: the SSM state (heads · head_dim · state_size, in float32) and the
    convolution's last conv_kernel − 1 inputs of every convolved channel (in the cache dtype)."""
    _, conv, _ = _mamba_sizes(spec, shape)
    m = shape.mamba
    ssm = spec.mamba_num_heads * m.head_dim * m.state_size * SSM_STATE_BYTES
    window = conv * (m.conv_kernel - 1) * DTYPE_BYTES[scenario.kv_dtype]
    return scenario.batch_size * (ssm + window)


@dataclass(frozen=True)
class Work:
    flops: float
    bytes: float


def _matmul_params(spec: SubblockSpec, shape: ParentShape) -> int:
    """Matmul weights one token multiplies with (an MoE token: the router and its routed experts)."""
    h, d = shape.hidden_size, shape.head_dim
    if spec.removed:
        return 0
    if isinstance(spec, AttentionSpec):
        if spec.kind is AttentionKind.mamba:
            inner, _, rows = _mamba_sizes(spec, shape)
            return h * rows + inner * h
        if spec.kind is AttentionKind.linear:
            return h * h
        q, kv = shape.num_attention_heads * d, spec.num_key_value_heads * d
        return h * q + 2 * h * kv + q * h
    if spec.kind is FfnKind.linear:
        return h * h
    if spec.kind is FfnKind.moe:
        return spec.num_experts * h + spec.experts_per_token * 3 * h * shape.intermediate_size
    return 3 * h * spec.intermediate_size


def _matmul_weights_read(spec: SubblockSpec, shape: ParentShape, tokens: int) -> float:
    """Matmul weights read for `tokens` tokens: an MoE reads each expert that any token is routed to.

    With routing spread evenly, an expert is missed by one token with probability 1 − top/k, so the
    expected number of experts read is k · (1 − (1 − top/k)^tokens): top for one token, k for many.
    """
    if not (isinstance(spec, FfnSpec) and spec.kind is FfnKind.moe):
        return float(_matmul_params(spec, shape))
    h, k, top = shape.hidden_size, spec.num_experts, spec.experts_per_token
    touched = k * (1 - (1 - top / k) ** tokens)
    return k * h + touched * 3 * h * shape.intermediate_size


def _mixing_flops(spec: SubblockSpec, shape: ParentShape, query: int, context: int) -> float:
    """FLOPs per token beyond the matmul weights: softmax attention's scores and weighted values, or Mamba's
    convolution and its state update and read-out (2 multiply-adds per state element each)."""
    if isinstance(spec, AttentionSpec) and spec.kind is AttentionKind.mamba:
        _, conv, _ = _mamba_sizes(spec, shape)
        m = shape.mamba
        return 2 * conv * m.conv_kernel + 4 * spec.mamba_num_heads * m.head_dim * m.state_size
    return 4 * shape.num_attention_heads * shape.head_dim * _attended(spec, query, context)


def _attended(spec: SubblockSpec, query: int, context: int) -> float:
    """Mean number of keys a query attends to."""
    if not isinstance(spec, AttentionSpec) or spec.kind is not AttentionKind.attention:
        return 0.0
    keys = context if query == 1 else (context + 1) / 2  # causal prefill: half the square on average
    return min(keys, spec.window) if spec.window is not None else keys


def prefill_work(spec: SubblockSpec, shape: ParentShape, s: Scenario) -> Work:
    tokens = s.batch_size * s.prefill_length
    weights = _matmul_weights_read(spec, shape, tokens) * DTYPE_BYTES[s.weight_dtype]
    flops = (2 * _matmul_params(spec, shape) + _mixing_flops(spec, shape, s.prefill_length, s.prefill_length)) * tokens
    kv_write = kv_cache_bytes(spec, shape, s, tokens=s.prefill_length)
    activations = 2 * tokens * shape.hidden_size * DTYPE_BYTES[s.weight_dtype] if not spec.removed else 0
    return Work(flops, weights + kv_write + activations)


def decode_work(spec: SubblockSpec, shape: ParentShape, s: Scenario) -> Work:
    """One decode step (one new token per sequence) at the average decode context."""
    ctx = s.decode_context
    weights = _matmul_weights_read(spec, shape, s.batch_size) * DTYPE_BYTES[s.weight_dtype]
    flops = (2 * _matmul_params(spec, shape) + _mixing_flops(spec, shape, 1, ctx)) * s.batch_size
    cache = kv_cache_bytes(spec, shape, s, tokens=ctx)
    # A KV cache is read; Mamba's state is read and written back.
    mamba = isinstance(spec, AttentionSpec) and spec.kind is AttentionKind.mamba
    return Work(flops, weights + cache * (2 if mamba else 1))
