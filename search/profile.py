"""Cost of every subblock candidate for a scenario (docs/design.md §6): measured here, or a roofline for a named GPU.

Measured times come from the real modules, timed the way they run inside a model: pre-norm included,
prefill on [batch, prefill_length] hidden states, decode as one new token per sequence against a KV
cache holding the average decode context. Candidates with the same spec have the same shapes in every
layer, so each spec is timed once and its time used for every layer that offers it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from torch import nn

from puzzle.blocks.costs import DTYPE_BYTES, Scenario, decode_work, prefill_work
from puzzle.blocks.hybrid import HybridSubblock, hybrid_cache
from puzzle.blocks.modeling_puzzle import new_kv_cache
from puzzle.blocks.specs import ParentShape, SubblockSpec
from puzzle.search.hardware import GpuSpec
from puzzle.search.timing import Timing, measure, measure_pair


@dataclass(frozen=True)
class CostRow:
    layer: int  # -1 for the costs outside the blocks (embeddings, final norm, lm_head)
    subblock: str  # "attention" | "ffn" | "fixed"
    candidate: str
    params: int
    experts: int  # routed experts held (0 outside MoE layers)
    active_params: int  # parameters one token computes with: an MoE's router and routed experts only
    weight_bytes: float
    kv_bytes: float
    prefill_seconds: float  # the fastest repeat: what the cost model uses
    decode_seconds: float  # per decode step (one token per sequence), fastest repeat
    prefill_median: float
    decode_median: float
    prefill_spread: float  # interquartile range / median
    decode_spread: float
    method: str  # "measured" | "analytic"
    device: str
    unreliable: str = ""  # why this measured row cannot be trusted after re-measuring; empty when it can

    def latency(self, scenario: Scenario) -> float:
        return scenario.latency(self.prefill_seconds, self.decode_seconds)


class Stack:
    """Decoder layers run as a model runs them, on hidden states: the unit every timing is taken on."""

    def __init__(self, layers: list[tuple[nn.Module, nn.Module]], rotary, scenario: Scenario, hidden_size: int,
                 device, dtype):
        self.layers, self.rotary, self.device = layers, rotary, device
        b, p, self.ctx = scenario.batch_size, scenario.prefill_length, scenario.decode_context
        self.x = torch.randn(b, p, hidden_size, device=device, dtype=dtype)
        self.step = torch.randn(b, 1, hidden_size, device=device, dtype=dtype)
        mixers = [a for a, _ in layers if isinstance(a, HybridSubblock)]
        if mixers:
            # A hybrid's: Mamba states and KV, filled by a prefill of the decode context.
            self.cache = hybrid_cache(mixers)
            for slot, mixer in enumerate(mixers):
                mixer.mixer.layer_idx = slot
            with torch.no_grad():
                self.run(torch.randn(b, self.ctx, hidden_size, device=device, dtype=dtype),
                         torch.arange(self.ctx, device=device)[None], self.cache)
            return
        # The child's own cache, filled with the decode context as a prefill would leave it.
        softmax = [a for a, _ in layers if hasattr(a, "num_key_value_heads")]
        self.cache = new_kv_cache([a.window for a in softmax])
        for slot, attention in enumerate(softmax):
            attention.layer_idx = slot
            kv = torch.randn(b, attention.num_key_value_heads, self.ctx, attention.head_dim, device=device, dtype=dtype)
            self.cache.update(kv, kv.clone(), slot)

    def run(self, h: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        pe = self.rotary(h, positions)
        for attention, ffn in self.layers:
            h = h + attention(h, pe, cache=cache)
            h = h + ffn(h)
        return h

    def prefill(self) -> torch.Tensor:
        return self.run(self.x, torch.arange(self.x.shape[1], device=self.device)[None], None)

    def decode(self) -> torch.Tensor:
        position = torch.tensor([[self.ctx]], device=self.device)
        return _restoring(self.cache, lambda: self.run(self.step, position, self.cache))


def _difference(ta: list[float], tb: list[float], n: int) -> Timing:
    """Per-layer cost from paired stack timings: fastest minus fastest, and the median paired difference."""
    diffs = [x - y for x, y in zip(ta, tb)]
    median = statistics.median(diffs)
    q = statistics.quantiles(diffs, n=4) if len(diffs) >= 2 else [median] * 3
    spread = (q[2] - q[0]) / abs(median) if median else 0.0
    return Timing(max(0.0, (min(ta) - min(tb)) / n), max(0.0, median / n), spread)


def differential_times(
    candidate: list[nn.Module], partner: list[nn.Module], baseline: list[nn.Module], is_attention: bool,
    rotary, scenario: Scenario, hidden_size: int, device, dtype, warmup: int, repeats: int,
) -> tuple[Timing, Timing]:
    """Per-layer time of a subblock, measured inside a model-sized stack.

    Every layer of a stack gets a copy of the candidate, beside the parent's other subblock
    (`partner`); the same stack with the candidate removed (`baseline`, no-ops) is timed too. The
    difference divided by the layer count is the candidate's cost with the cache pressure of a whole
    model: timed alone, over and over, a small module would find its weights already in the
    processor's caches and look faster than it is inside a model.
    """
    def stack(subblocks):
        pairs = list(zip(subblocks, partner)) if is_attention else list(zip(partner, subblocks))
        return Stack(pairs, rotary, scenario, hidden_size, device, dtype)

    with_candidate, without = stack(candidate), stack(baseline)
    n = len(candidate)
    prefill = _difference(*measure_pair(with_candidate.prefill, without.prefill, device, warmup, repeats), n)
    decode = _difference(*measure_pair(with_candidate.decode, without.decode, device, warmup, repeats), n)
    return prefill, decode


def _restoring(cache, fn):
    """Run a decode step, then put the cache back, so every timed step sees the same context."""
    saved = [_saved(layer) for layer in cache.layers]
    out = fn()
    for layer, state in zip(cache.layers, saved):
        for name, value in state.items():
            setattr(layer, name, value)
    return out


def _saved(layer) -> dict:
    """What a decode step changes in a cache layer: a KV layer's tensors (replaced, not written), a Mamba
    layer's states (written in place, so copied)."""
    if hasattr(layer, "recurrent_states"):
        return {name: {k: None if v is None else v.clone() for k, v in getattr(layer, name).items()}
                for name in ("conv_states", "recurrent_states")}
    state = {"keys": layer.keys, "values": layer.values}
    if getattr(layer, "cumulative_length", None) is not None:
        state["cumulative_length"] = layer.cumulative_length
    return state


def analytic_times(spec: SubblockSpec, shape: ParentShape, scenario: Scenario, gpu: GpuSpec) -> tuple[float, float]:
    """Roofline: the larger of compute time and memory time, for prefill and for one decode step."""
    peak = gpu.peak_flops(scenario.weight_dtype)
    out = []
    for work in (prefill_work(spec, shape, scenario), decode_work(spec, shape, scenario)):
        out.append(max(work.flops / peak, work.bytes / gpu.bandwidth))
    return out[0], out[1]


def weight_bytes(params: int, scenario: Scenario) -> float:
    return params * DTYPE_BYTES[scenario.weight_dtype]


class WholeModel:
    """A Stack with embeddings, final norm and lm_head: the whole-model side of the additive cost model."""

    def __init__(self, embed: nn.Module, rotary, layers: list[tuple[nn.Module, nn.Module]], norm: nn.Module,
                 head: nn.Module, scenario: Scenario, device, dtype):
        self.stack = Stack(layers, rotary, scenario, embed.embedding_dim, device, dtype)
        self.embed, self.norm, self.head = embed, norm, head
        self.ids = torch.randint(0, embed.num_embeddings, (scenario.batch_size, scenario.prefill_length), device=device)
        self.positions = torch.arange(scenario.prefill_length, device=device)[None]
        self.position = torch.tensor([[self.stack.ctx]], device=device)

    def prefill(self) -> torch.Tensor:
        return self.head(self.norm(self.stack.run(self.embed(self.ids), self.positions, None)))

    def decode(self) -> torch.Tensor:
        cache = self.stack.cache
        return _restoring(cache, lambda: self.head(self.norm(self.stack.run(self.embed(self.ids[:, :1]), self.position, cache))))


def time_model(model: WholeModel, device, warmup: int, repeats: int) -> tuple[Timing, Timing]:
    """(prefill, decode step) of a whole model, to check the additive cost model."""
    return measure(model.prefill, device, warmup, repeats), measure(model.decode, device, warmup, repeats)


def outside_times(model: WholeModel, device, warmup: int, repeats: int) -> tuple[Timing, Timing]:
    """Time of the embeddings, final norm and lm_head inside a whole model: the model minus its layers.

    Timed alone, the 4096-way head would find its weights in the caches; inside a model the layers
    have pushed them out.
    """
    prefill = _difference(*measure_pair(model.prefill, model.stack.prefill, device, warmup, repeats), 1)
    decode = _difference(*measure_pair(model.decode, model.stack.decode, device, warmup, repeats), 1)
    return prefill, decode


def read_profile(table) -> list[CostRow]:
    import pandas as pd

    frame = pd.read_csv(table, keep_default_na=False, na_values={"prefill_seconds": ["nan"]})
    if "unreliable" not in frame:
        frame["unreliable"] = ""
    return [CostRow(**{**r, "unreliable": str(r["unreliable"])}) for r in frame.to_dict("records")]


def predicted_latency(rows: list[CostRow], choices, scenario: Scenario) -> float:
    """Σ over layers of the chosen subblocks' latency, plus the fixed costs (the additive cost model)."""
    by_key = {(r.layer, r.candidate): r for r in rows}
    total = next(r for r in rows if r.layer == -1).latency(scenario)
    for i, choice in enumerate(choices):
        total += by_key[(i, choice.attention.id)].latency(scenario) + by_key[(i, choice.ffn.id)].latency(scenario)
    return total
