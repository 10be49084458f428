"""`puzzle profile`: parameters, memory and time of every subblock candidate for a scenario."""

from __future__ import annotations

import copy
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from puzzle.blocks.costs import Scenario, active_parameters, parameters
from puzzle.blocks.errors import PuzzleError
from puzzle.blocks.init import shaped_module
from puzzle.blocks.io import atomic_path
from puzzle.blocks.specs import AttentionKind, AttentionSpec, FfnKind, FfnSpec, SubblockSpec, spec_from_id
from puzzle.distill.library import Library
from puzzle.config import ProfileSection, PuzzleConfig
from puzzle.parents import load_parent
from puzzle.progress import progress_bar
from puzzle.rundir import RunDir, Stage, fingerprint
from puzzle.search.hardware import gpu
from puzzle.search.profile import (
    CostRow,
    Timing,
    WholeModel,
    analytic_times,
    differential_times,
    kv_bytes,
    local_device_name,
    outside_times,
    time_model,
    weight_bytes,
)


def scenario_of(section: ProfileSection) -> Scenario:
    try:
        return Scenario(
            batch_size=section.batch_size, prefill_length=section.prefill_length, decode_length=section.decode_length,
            weight_dtype=section.weight_dtype, kv_dtype=section.kv_dtype,
        )
    except ValueError as e:
        raise PuzzleError(f"profile: {e}") from None


def check_profile_section(section: ProfileSection) -> None:
    scenario_of(section)
    if section.device != "local":
        gpu(section.device)
    elif section.weight_dtype == "fp8":
        raise PuzzleError("profile.weight_dtype: fp8 can only be profiled analytically; name a GPU in profile.device")


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


# Columns of profile.csv; a profile written in an older format is measured again.
PROFILE_FORMAT = 2


@dataclass(frozen=True)
class ProfileSummary:
    table: Path
    rows: list[CostRow]
    checks: list[AdditiveCheck]
    device: str
    seconds: float


def profile_stage(config: PuzzleConfig, check_models: int = 0) -> ProfileSummary:
    started = time.time()
    section = config.profile
    check_profile_section(section)
    scenario = scenario_of(section)
    run = RunDir.of(config)
    lib_dir = run.stage_dir(Stage.library)
    if not (lib_dir / "space.json").is_file():
        raise PuzzleError(f"no library in {lib_dir}; run `puzzle distill` first")
    # A measured profile is reused as it is: measuring again would move the search's choice with the
    # machine's load and redo every stage after it. Its format is part of the key.
    key = fingerprint(config, ("parent", "profile")) + f"-{run.done_fingerprint(Stage.library)}-v{PROFILE_FORMAT}"
    table = run.stage_dir(Stage.profile) / "profile.csv"
    if run.is_done(Stage.profile, key) and table.is_file() and not check_models:
        rows = read_profile(table)
        return ProfileSummary(table, rows, [], rows[0].device, time.time() - started)
    with run.stage(Stage.profile, key) as record:
        parent = load_parent(config.parent)
        library = Library(lib_dir, parent.adapter)
        rows = cost_rows(config, parent, library, scenario)
        checks = []
        if section.device == "local" and check_models:
            checks = additive_checks(config, parent, library, rows, scenario, check_models)
        with atomic_path(table) as tmp:
            pd.DataFrame([asdict(r) for r in rows]).to_csv(tmp, index=False)
        record.outputs = {"table": table.name, "device": rows[0].device, "method": rows[0].method}
    return ProfileSummary(table, rows, checks, rows[0].device, time.time() - started)


def read_profile(table: Path) -> list[CostRow]:
    return [CostRow(**r) for r in pd.read_csv(table).to_dict("records")]


def _device_name(section: ProfileSection, device: torch.device) -> str:
    return gpu(section.device).name if section.device != "local" else local_device_name(device)


def cost_rows(config: PuzzleConfig, parent, library: Library, scenario: Scenario) -> list[CostRow]:
    section = config.profile
    adapter = parent.adapter
    device = parent.model.device
    dtype = _torch_dtype(section)
    name = _device_name(section, device)
    method = "measured" if section.device == "local" else "analytic"
    timings: dict[tuple, tuple[Timing, Timing]] = {}
    specs = [(i, s) for i, layer in enumerate(library.layers) for s in (*layer.attention, *layer.ffn)]
    rows = []
    with progress_bar() as bar:
        task = bar.add_task(f"profile ({method}, {name})", total=len(specs), status="")
        for i, spec in specs:
            shape = adapter.shape(i)
            if (spec, shape) not in timings:
                timings[(spec, shape)] = _times(config, parent, i, spec, scenario, dtype)
            prefill, decode = timings[(spec, shape)]
            params = parameters(spec, shape)
            rows.append(
                CostRow(
                    layer=i, subblock="attention" if isinstance(spec, AttentionSpec) else "ffn", candidate=spec.id,
                    params=params, experts=spec.experts if isinstance(spec, FfnSpec) else 0,
                    active_params=active_parameters(spec, shape),
                    weight_bytes=weight_bytes(params, scenario), kv_bytes=kv_bytes(spec, shape, scenario),
                    prefill_seconds=prefill.best, decode_seconds=decode.best, prefill_median=prefill.median,
                    decode_median=decode.median, prefill_spread=prefill.spread, decode_spread=decode.spread,
                    method=method, device=name,
                )
            )
            bar.update(task, advance=1, status=f"L{i} {spec.id}")
    rows.append(_fixed_row(config, parent, scenario, dtype, method, name))
    return rows


def _times(config, parent, layer: int, spec: SubblockSpec, scenario: Scenario, dtype) -> tuple[Timing, Timing]:
    section = config.profile
    adapter = parent.adapter
    shape = adapter.shape(layer)
    if section.device != "local":
        prefill, decode = analytic_times(spec, shape, scenario, gpu(section.device))
        return Timing(prefill, prefill, 0.0), Timing(decode, decode, 0.0)
    if spec.removed:
        return Timing(0.0, 0.0, 0.0), Timing(0.0, 0.0, 0.0)  # removed: no module, no residual add
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
        device, dtype, section.warmup, section.repeats,
    )


def _fixed_row(config, parent, scenario: Scenario, dtype, method: str, name: str) -> CostRow:
    """Embeddings, final norm and lm_head: paid by every child alike."""
    cfg = parent.model.config
    h, v = cfg.hidden_size, cfg.vocab_size
    params = sum(p.numel() for p in parent.model.model.embed_tokens.parameters())
    params += sum(p.numel() for p in parent.model.model.norm.parameters())
    if not cfg.tie_word_embeddings:
        params += sum(p.numel() for p in parent.model.lm_head.parameters())
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
        p_t, d_t = outside_times(model, parent.model.device, config.profile.warmup, config.profile.repeats)
    return CostRow(
        layer=-1, subblock="fixed", candidate="embeddings+norm+lm_head", params=params, experts=0,
        active_params=params,
        weight_bytes=weight_bytes(params, scenario), kv_bytes=0.0, prefill_seconds=p_t.best, decode_seconds=d_t.best,
        prefill_median=p_t.median, decode_median=d_t.median, prefill_spread=p_t.spread, decode_spread=d_t.spread,
        method=method, device=name,
    )


def _outer_modules(parent, dtype):
    """Copies of the embeddings, final norm and lm_head in the profiled dtype (the parent stays as loaded)."""
    m = parent.model
    return tuple(copy.deepcopy(x).to(dtype) for x in (m.model.embed_tokens, m.model.norm, m.lm_head))


def predicted_latency(rows: list[CostRow], choice: list[tuple[str, str]], scenario: Scenario) -> float:
    """Σ over layers of the chosen subblocks' latency, plus the fixed costs."""
    by_key = {(r.layer, r.candidate): r for r in rows}
    total = next(r for r in rows if r.layer == -1).latency(scenario)
    for i, (attention, ffn) in enumerate(choice):
        total += by_key[(i, attention)].latency(scenario) + by_key[(i, ffn)].latency(scenario)
    return total


def additive_checks(config, parent, library: Library, rows, scenario: Scenario, n_children: int) -> list[AdditiveCheck]:
    """Predicted (sum of blocks + fixed) against measured whole-model latency: parent and random children."""
    rng = random.Random(config.run.seed)
    adapter = parent.adapter
    choices = {"parent": [(s.attention.id, s.ffn.id) for s in (adapter.shape(i) for i in range(adapter.num_layers))]}
    for k in range(n_children):
        choices[f"random child {k + 1}"] = [
            (rng.choice(layer.attention).id, rng.choice(layer.ffn).id) for layer in library.layers
        ]
    scenarios = {"profile scenario": scenario}
    second = Scenario(scenario.batch_size * 4, max(1, scenario.prefill_length // 2), scenario.decode_length,
                      scenario.weight_dtype, scenario.kv_dtype)
    scenarios[f"batch {second.batch_size}, prefill {second.prefill_length}"] = second
    out = []
    section = config.profile
    dtype = _torch_dtype(section)
    device = parent.model.device
    for scenario_name, sc in scenarios.items():
        sc_rows = rows if sc == scenario else cost_rows(config, parent, library, sc)
        for model_name, choice in choices.items():
            layers = []
            for i, (a, f) in enumerate(choice):
                attention = shaped_module(spec_from_id(a), adapter.parent_layer(i), config.parent.attn_implementation)
                ffn = shaped_module(spec_from_id(f), adapter.parent_layer(i), config.parent.attn_implementation)
                layers.append((attention.to(device, dtype).eval(), ffn.to(device, dtype).eval()))
            embed, norm, head = _outer_modules(parent, dtype)
            model = WholeModel(embed, parent.adapter.rotary, layers, norm, head, sc, device, dtype)
            prefill, decode = time_model(model, device, section.warmup, section.repeats)
            measured = prefill.best + sc.decode_length * decode.best
            out.append(AdditiveCheck(model_name, scenario_name, predicted_latency(sc_rows, choice, sc), measured))
    return out
