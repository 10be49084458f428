"""Costs of every subblock candidate at a scenario, measured here or by the roofline (docs/design.md §6),
and the check of the additive cost model against whole models (`puzzle profile --check N`).

Shared by the profile stage and by the search's batch-size sweep, which profiles at other batch sizes.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, replace

import torch

from puzzle.blocks.costs import Scenario, active_parameters, kv_cache_bytes, parameters
from puzzle.blocks.init import shaped_module
from puzzle.blocks.specs import (
    AttentionKind, AttentionSpec, BlockChoice, FfnKind, FfnSpec, ParentShape, SubblockSpec, spec_from_id,
)
from puzzle.config import ProfileSection, PuzzleConfig
from puzzle.distill.library import Library
from puzzle.progress import progress_bar
from puzzle.search.hardware import gpu
from puzzle.search.profile import (
    CostRow,
    WholeModel,
    analytic_times,
    differential_times,
    outside_times,
    predicted_latency,
    time_model,
    weight_bytes,
)
from puzzle.search.timing import Timing, local_device_name


def _torch_dtype(section: ProfileSection) -> torch.dtype:
    """The dtype modules are timed in (fp8 weights exist only in the analytic model)."""
    return torch.float32 if section.weight_dtype in ("float32", "fp8") else getattr(torch, section.weight_dtype)


@dataclass(frozen=True)
class AdditiveCheck:
    model: str
    scenario: str
    predicted_seconds: float
    measured_seconds: float

    @property
    def error(self) -> float:
        return self.predicted_seconds / self.measured_seconds - 1


# A measured row is re-measured, then refused by the search, when a time is zero or negative, when a
# candidate (every one prunes the parent's subblock) is timed this much slower than the parent's own
# subblock of its layer, or when its repeats spread so widely that the same noise in every layer would
# move a child's predicted latency by more than this share of the parent's. The spread counts in seconds,
# not as a ratio: a 100 % spread of a 0.1 ms row cannot move the search, a 20 % spread of the largest can.
SLOWER_LIMIT = 1.25
NOISE_SHARE = 0.10


def unreliable_rows(rows: list[CostRow], shapes: list[ParentShape], scenario: Scenario) -> dict[tuple[int, str], str]:
    """(layer, candidate) → why its measured costs cannot be trusted."""
    by_key = {(r.layer, r.candidate): r for r in rows}
    parent = sum(by_key[(i, s.id)].latency(scenario) for i, shape in enumerate(shapes) for s in (shape.attention, shape.ffn))
    parent += next(r for r in rows if r.layer == -1).latency(scenario)
    found = {}
    for r in rows:
        if r.method != "measured" or (r.layer >= 0 and spec_from_id(r.candidate).removed):
            continue  # a removed subblock costs nothing by construction
        why = []
        if min(r.prefill_seconds, r.decode_seconds) <= 0:
            why.append("a zero or negative time")
        noise = scenario.latency(r.prefill_spread * r.prefill_median, r.decode_spread * r.decode_median)
        if noise * (1 if r.layer < 0 else len(shapes)) > NOISE_SHARE * parent:
            why.append(f"repeats spread {max(r.prefill_spread, r.decode_spread):.0%} ({noise * 1e3:.3g} ms a batch, "
                       f"of the parent's {parent * 1e3:.3g} ms)")
        if r.layer >= 0:
            shape = shapes[r.layer]
            own = by_key[(r.layer, (shape.attention if r.subblock == "attention" else shape.ffn).id)]
            if r is not own and own.latency(scenario) <= 0:  # under heavy load a difference of timings can be 0
                why.append(f"the parent's {own.candidate}, which it prunes, timed zero")
            elif r is not own and r.latency(scenario) > SLOWER_LIMIT * own.latency(scenario):
                why.append(f"timed {r.latency(scenario) / own.latency(scenario):.2f}x the parent's {own.candidate}, "
                           "which it prunes")
        if why:
            found[(r.layer, r.candidate)] = ", ".join(why)
    return found


def cost_rows(config: PuzzleConfig, shapes: list[ParentShape], space, scenario: Scenario, hf_config,
              parent=None) -> list[CostRow]:
    """Every candidate's costs at `scenario`, and the fixed row. `space`: the library's layers. A measured
    profile needs the loaded `parent`; the analytic one (profile.device names a GPU) needs only its config.

    Measured rows that look wrong (`unreliable_rows`) are measured once more with twice the repeats; what
    still looks wrong is marked in the row, and the search refuses it unless search.allow_unreliable_profile."""
    rows = _cost_rows(config, shapes, space, scenario, hf_config, parent, config.profile.repeats)
    suspects = unreliable_rows(rows, shapes, scenario)
    if not suspects:
        return rows
    again = _cost_rows(config, shapes, space, scenario, hf_config, parent, 2 * config.profile.repeats, set(suspects))
    by_key = {(r.layer, r.candidate): r for r in again}
    rows = [by_key.get((r.layer, r.candidate), r) for r in rows]
    still = unreliable_rows(rows, shapes, scenario)
    return [replace(r, unreliable=still.get((r.layer, r.candidate), "")) for r in rows]


def _cost_rows(config: PuzzleConfig, shapes: list[ParentShape], space, scenario: Scenario, hf_config, parent,
               repeats: int, only: set[tuple[int, str]] | None = None) -> list[CostRow]:
    """The rows of every candidate and the fixed row, or of the (layer, candidate) keys in `only`."""
    section = config.profile
    method = "measured" if section.device == "local" else "analytic"
    dtype = _torch_dtype(section)
    name = gpu(section.device).name if method == "analytic" else local_device_name(parent.model.device)
    timings: dict[tuple, tuple[Timing, Timing]] = {}
    specs = [(i, s) for i, layer in enumerate(space) for s in (*layer.attention, *layer.ffn)
             if only is None or (i, s.id) in only]
    rows = []
    with progress_bar() as bar:
        task = bar.add_task(f"profile ({method}, {name})" + (" again" if only else ""), total=len(specs), status="")
        for i, spec in specs:
            shape = shapes[i]
            if (spec, shape) not in timings:
                timings[(spec, shape)] = _times(config, parent, shape, i, spec, scenario, dtype, repeats)
            prefill, decode = timings[(spec, shape)]
            params = parameters(spec, shape)
            rows.append(
                CostRow(
                    layer=i, subblock="attention" if isinstance(spec, AttentionSpec) else "ffn", candidate=spec.id,
                    params=params, experts=spec.experts if isinstance(spec, FfnSpec) else 0,
                    active_params=active_parameters(spec, shape),
                    weight_bytes=weight_bytes(params, scenario), kv_bytes=kv_cache_bytes(spec, shape, scenario),
                    prefill_seconds=prefill.best, decode_seconds=decode.best, prefill_median=prefill.median,
                    decode_median=decode.median, prefill_spread=prefill.spread, decode_spread=decode.spread,
                    method=method, device=name,
                )
            )
            bar.update(task, advance=1, status=f"L{i} {spec.id}")
    if only is None or any(layer == -1 for layer, _ in only):
        rows.append(_fixed_row(config, hf_config, parent, scenario, dtype, method, name, repeats))
    return rows


@dataclass(frozen=True)
class Fit:
    """Whether the parent's weights and KV cache at the scenario fit the profiled GPUs' memory."""

    device: str
    gpus: int
    weight_bytes: float
    kv_bytes: float
    capacity_bytes: float

    @property
    def fits(self) -> bool:
        return self.weight_bytes + self.kv_bytes <= self.capacity_bytes

    def describe(self) -> str:
        need = (self.weight_bytes + self.kv_bytes) / 2**30
        verdict = "fits" if self.fits else "does NOT fit: the times above assume it would"
        return (f"parent at this scenario: weights {self.weight_bytes / 2**30:.2f} GiB + KV cache "
                f"{self.kv_bytes / 2**30:.2f} GiB = {need:.2f} GiB on {self.gpus}× {self.device} "
                f"({self.capacity_bytes / 2**30:.0f} GiB): {verdict}")


def parent_fit(rows: list[CostRow], shapes: list[ParentShape], device: str, gpus: int) -> Fit:
    """The roofline's fit check: weights and KV split evenly over `gpus` (tensor parallelism)."""
    by_key = {(r.layer, r.candidate): r for r in rows}
    parent = [by_key[(i, s.attention.id)] for i, s in enumerate(shapes)] + [by_key[(i, s.ffn.id)] for i, s in enumerate(shapes)]
    fixed = next(r for r in rows if r.layer == -1)
    weights = fixed.weight_bytes + sum(r.weight_bytes for r in parent)
    return Fit(device, gpus, weights, sum(r.kv_bytes for r in parent), gpus * gpu(device).memory_gib * 2**30)


def fixed_parameters(hf_config) -> int:
    """Embeddings, final norm and (unless tied) lm_head, from the config alone."""
    h, v = hf_config.hidden_size, hf_config.vocab_size
    return v * h + h + (0 if hf_config.tie_word_embeddings else v * h)


def _times(config, parent, shape: ParentShape, layer: int, spec: SubblockSpec, scenario: Scenario,
           dtype, repeats: int) -> tuple[Timing, Timing]:
    section = config.profile
    if section.device != "local":
        prefill, decode = analytic_times(spec, shape, scenario, gpu(section.device))
        return Timing(prefill, prefill, 0.0), Timing(decode, decode, 0.0)
    if spec.removed:
        return Timing(0.0, 0.0, 0.0), Timing(0.0, 0.0, 0.0)  # removed: no module, no residual add
    adapter = parent.adapter
    device = parent.model.device
    impl = config.parent.attn_implementation
    is_attention = isinstance(spec, AttentionSpec)
    n = adapter.num_layers

    def modules(make):
        return [make(adapter.parent_layer(layer)).to(device=device, dtype=dtype).eval() for _ in range(n)]

    candidate = modules(lambda p: shaped_module(spec, p, impl))
    partner = modules(lambda p: shaped_module(p.shape.ffn if is_attention else p.shape.attention, p, impl))
    baseline = modules(lambda p: shaped_module(AttentionSpec(AttentionKind.noop) if is_attention else FfnSpec(FfnKind.noop), p, impl))
    return differential_times(
        candidate, partner, baseline, is_attention, parent.adapter.rotary, scenario, shape.hidden_size,
        device, dtype, section.warmup, repeats,
    )


def _fixed_row(config, hf_config, parent, scenario: Scenario, dtype, method: str, name: str, repeats: int) -> CostRow:
    """Embeddings, final norm and lm_head: paid by every child alike."""
    h, v = hf_config.hidden_size, hf_config.vocab_size
    params = fixed_parameters(hf_config)
    if method == "analytic":
        g = gpu(config.profile.device)
        peak = g.peak_flops(scenario.weight_dtype)
        head_bytes = h * v * weight_bytes(1, scenario)
        prefill = max(2 * h * v * scenario.batch_size * scenario.prefill_length / peak, head_bytes / g.bandwidth)
        decode = max(2 * h * v * scenario.batch_size / peak, head_bytes / g.bandwidth)
        p_t, d_t = Timing(prefill, prefill, 0.0), Timing(decode, decode, 0.0)
    else:
        impl = config.parent.attn_implementation
        layers = [
            tuple(shaped_module(s, p, impl).to(parent.model.device, dtype).eval() for s in (p.shape.attention, p.shape.ffn))
            for p in (parent.adapter.parent_layer(i) for i in range(parent.adapter.num_layers))
        ]
        embed, norm, head = _outer_modules(parent, dtype)
        model = WholeModel(embed, parent.adapter.rotary, layers, norm, head, scenario, parent.model.device, dtype)
        p_t, d_t = outside_times(model, parent.model.device, config.profile.warmup, repeats)
    return CostRow(
        layer=-1, subblock="fixed", candidate="embeddings+norm+lm_head", params=params, experts=0,
        active_params=params,
        weight_bytes=weight_bytes(params, scenario), kv_bytes=0.0, prefill_seconds=p_t.best, decode_seconds=d_t.best,
        prefill_median=p_t.median, decode_median=d_t.median, prefill_spread=p_t.spread, decode_spread=d_t.spread,
        method=method, device=name,
    )


def _outer_modules(parent, dtype):
    """Copies of the embeddings, final norm and lm_head in the profiled dtype (the parent stays as loaded)."""
    return tuple(copy.deepcopy(x).to(dtype) for x in parent.adapter.outer_modules())


def additive_checks(config, parent, library: Library, rows, scenario: Scenario, n_children: int) -> list[AdditiveCheck]:
    """Predicted (sum of blocks + fixed) against measured whole-model latency: parent and random children."""
    rng = random.Random(config.run.seed)
    adapter = parent.adapter
    choices = {"parent": [BlockChoice(s.attention, s.ffn) for s in adapter.shapes]}
    for k in range(n_children):
        choices[f"random child {k + 1}"] = [
            BlockChoice(rng.choice(layer.attention), rng.choice(layer.ffn)) for layer in library.layers
        ]
    scenarios = {"profile scenario": scenario}
    second = replace(scenario, batch_size=scenario.batch_size * 4, prefill_length=max(1, scenario.prefill_length // 2))
    scenarios[f"batch {second.batch_size}, prefill {second.prefill_length}"] = second
    out = []
    section = config.profile
    dtype = _torch_dtype(section)
    device = parent.model.device
    for scenario_name, sc in scenarios.items():
        sc_rows = rows if sc == scenario else cost_rows(config, adapter.shapes, library.layers, sc, adapter.config, parent)
        for model_name, choice in choices.items():
            layers = []
            for i, block in enumerate(choice):
                attention = shaped_module(block.attention, adapter.parent_layer(i), config.parent.attn_implementation)
                ffn = shaped_module(block.ffn, adapter.parent_layer(i), config.parent.attn_implementation)
                layers.append((attention.to(device, dtype).eval(), ffn.to(device, dtype).eval()))
            embed, norm, head = _outer_modules(parent, dtype)
            model = WholeModel(embed, parent.adapter.rotary, layers, norm, head, sc, device, dtype)
            prefill, decode = time_model(model, device, section.warmup, section.repeats)
            measured = sc.latency(prefill.best, decode.best)
            out.append(AdditiveCheck(model_name, scenario_name, predicted_latency(sc_rows, choice, sc), measured))
    return out
