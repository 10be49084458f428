"""Cost of every subblock candidate for a scenario (DESIGN §6): measured here, or a roofline for a named GPU.

Measured times come from the real modules, timed the way they run inside a model: pre-norm included,
prefill on [batch, prefill_length] hidden states, decode as one new token per sequence against a KV
cache holding the average decode context. Candidates with the same spec have the same shapes in every
layer, so each spec is timed once and its time used for every layer that offers it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from blocks.costs import DTYPE_BYTES, Scenario, decode_work, kv_cache_bytes, prefill_work
from blocks.modeling_puzzle import KVCache
from blocks.specs import AttentionSpec, ParentShape, SubblockSpec
from search.hardware import GpuSpec


@dataclass(frozen=True)
class Timing:
    median: float
    spread: float  # interquartile range / median


@dataclass(frozen=True)
class CostRow:
    layer: int  # -1 for the costs outside the blocks (embeddings, final norm, lm_head)
    subblock: str  # "attention" | "ffn" | "fixed"
    candidate: str
    params: int
    weight_bytes: float
    kv_bytes: float
    prefill_seconds: float
    decode_seconds: float  # per decode step (one token per sequence)
    prefill_spread: float
    decode_spread: float
    method: str  # "measured" | "analytic"
    device: str

    def latency(self, scenario: Scenario) -> float:
        """Time per batch: the prefill plus every decode step."""
        return self.prefill_seconds + scenario.decode_length * self.decode_seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> Timing:
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [median, median, median]
    return Timing(median, (q[2] - q[0]) / median if median > 0 else 0.0)


def time_subblock(
    module: nn.Module, spec: SubblockSpec, rotary, scenario: Scenario, hidden_size: int, device, dtype, warmup, repeats
) -> tuple[Timing, Timing]:
    """(prefill, decode step) timings of one subblock module."""
    b, p, ctx = scenario.batch_size, scenario.prefill_length, scenario.decode_context
    x = torch.randn(b, p, hidden_size, device=device, dtype=dtype)
    step = torch.randn(b, 1, hidden_size, device=device, dtype=dtype)
    is_attention = isinstance(spec, AttentionSpec)
    pe_prefill = rotary(x, torch.arange(p, device=device)[None]) if is_attention else None
    pe_step = rotary(step, torch.tensor([[ctx]], device=device)) if is_attention else None

    def prefill():
        return module(x, pe_prefill) if is_attention else module(x)

    def decode():
        if not is_attention:
            return module(step)
        return module(step, pe_step, cache=cache)

    cache = None
    if is_attention and spec.kind.value == "attention":
        cache = _filled_cache(module, spec, b, ctx, device, dtype)
        module.layer_idx = 0
    prefill_t = measure(prefill, device, warmup, repeats)
    decode_t = measure(lambda: _restoring(cache, decode), device, warmup, repeats)
    return prefill_t, decode_t


def _filled_cache(module, spec: AttentionSpec, batch: int, ctx: int, device, dtype) -> KVCache:
    cache = KVCache({0: spec.window})
    tokens = ctx if spec.window is None else min(ctx, spec.window - 1)
    shape = (batch, spec.num_key_value_heads, tokens, module.head_dim)
    cache.keys[0] = torch.randn(shape, device=device, dtype=dtype)
    cache.values[0] = torch.randn(shape, device=device, dtype=dtype)
    return cache


def _restoring(cache: KVCache | None, fn):
    """Run a decode step, then put the cache back, so every timed step sees the same context."""
    if cache is None:
        return fn()
    keys, values = dict(cache.keys), dict(cache.values)
    out = fn()
    cache.keys, cache.values = keys, values
    return out


def analytic_times(spec: SubblockSpec, shape: ParentShape, scenario: Scenario, gpu: GpuSpec) -> tuple[float, float]:
    """Roofline: the larger of compute time and memory time, for prefill and for one decode step."""
    peak = gpu.peak_flops(scenario.weight_dtype)
    out = []
    for work in (prefill_work(spec, shape, scenario), decode_work(spec, shape, scenario)):
        out.append(max(work.flops / peak, work.bytes / gpu.bandwidth))
    return out[0], out[1]


def weight_bytes(params: int, scenario: Scenario) -> float:
    return params * DTYPE_BYTES[scenario.weight_dtype]


def kv_bytes(spec: SubblockSpec, shape: ParentShape, scenario: Scenario) -> float:
    return kv_cache_bytes(spec, shape, scenario)


def time_model(
    embed: nn.Module, rotary, layers: list[tuple[nn.Module, nn.Module]], norm: nn.Module, head: nn.Module,
    scenario: Scenario, device, warmup: int, repeats: int,
) -> tuple[Timing, Timing]:
    """(prefill, decode step) of a whole model made of `layers`, to check the additive cost model."""
    b, p, ctx = scenario.batch_size, scenario.prefill_length, scenario.decode_context
    ids = torch.randint(0, embed.num_embeddings, (b, p), device=device)
    step_ids = torch.randint(0, embed.num_embeddings, (b, 1), device=device)
    windows = {}
    for i, (attention, _) in enumerate(layers):
        attention.layer_idx = i
        windows[i] = getattr(attention, "window", None)

    def run(x_ids, positions, cache):
        h = embed(x_ids)
        pe = rotary(h, positions)
        for attention, ffn in layers:
            h = h + attention(h, pe, cache=cache)
            h = h + ffn(h)
        return head(norm(h))

    prefill = measure(lambda: run(ids, torch.arange(p, device=device)[None], None), device, warmup, repeats)
    cache = KVCache(windows)
    with torch.no_grad():
        context_ids = torch.randint(0, embed.num_embeddings, (b, ctx), device=device)
        run(context_ids, torch.arange(ctx, device=device)[None], cache)
    position = torch.tensor([[ctx]], device=device)
    decode = measure(lambda: _restoring(cache, lambda: run(step_ids, position, cache)), device, warmup, repeats)
    return prefill, decode
