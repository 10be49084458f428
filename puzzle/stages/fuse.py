"""The fuse stage (`puzzle fuse`): FFN Fusion of a child's attention-free runs, measured against the unfused child and the parent.

The fused child is saved in the child's own format (default: the child's directory + `-fused`), its
puzzle_child.json gains a `fusion` entry, and fusion.json beside it holds the runs found, the dependency
of each consecutive FFN pair, the groups fused, and KL and measured speed before and after. KL is on
eval.validation_blocks held-out blocks; speed follows the one timing rule (docs/design.md §14): the
unfused and the fused child timed in turn, eval.speed_repeats rounds, the fastest kept, at the profile's
scenario. The stage's manifest is in the job's fuse/ folder; it runs again each time it is asked for.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from puzzle.errors import PuzzleError
from puzzle.blocks.fusion import Dependency, attention_free_runs, ffn_dependencies, fuse_mlp, fusion_groups, is_fusable
from puzzle.io import atomic_write_json
from puzzle.blocks.modeling_puzzle import DeciLMForCausalLM
from puzzle.checkpoint import child_class, ffn_mult, load_child, saved_dtype, write_checkpoint
from puzzle.config import PuzzleConfig
from puzzle.data import job_blocks
from puzzle.distill.metrics import hf_logits, quality
from puzzle.engines import servability
from puzzle.parents import load_parent
from puzzle.pipeline import StageContext
from puzzle.rundir import RunDir, Stage
from puzzle.search.timing import generation_times


@dataclass(frozen=True)
class Measured:
    parameters: int
    kl_to_parent: float  # mean KL(parent ‖ model) per held-out token
    kl_to_unfused: float  # mean KL(unfused child ‖ model); 0 for the unfused child itself
    prefill_tokens_per_second: float
    decode_tokens_per_second: float


@dataclass(frozen=True)
class FusionSummary:
    source: Path
    runs: list[tuple[int, int]]  # first and last layer of each attention-free run of dense FFNs
    dependencies: list[Dependency]
    fused: list[tuple[int, int]]  # first and last layer of each group fused; empty when nothing was
    before: Measured | None  # None when nothing was fused
    after: Measured | None
    directory: Path | None  # the fused checkpoint
    validation_tokens: int
    seconds: float


def fused_block_configs(block_configs: list[dict], groups: list[range], *, hidden_size: int) -> list[dict]:
    """The child's `block_configs` after fusion: the wide FFN in each group's first layer, none in the rest."""
    blocks = copy.deepcopy(block_configs)
    for group in groups:
        size = sum(blocks[k]["ffn"]["intermediate_size"] for k in group)
        blocks[group.start]["ffn"] = {"no_op": False, "replace_with_linear": False,
                                      "ffn_mult": ffn_mult(size, hidden_size), "intermediate_size": size}
        for k in group[1:]:
            blocks[k]["ffn"] = {"no_op": True, "replace_with_linear": False, "ffn_mult": None}
    return blocks


def _check_groups(model: DeciLMForCausalLM, groups: list[range]) -> None:
    layers = model.model.layers
    taken: set[int] = set()
    for group in groups:
        if len(group) < 2 or group.stop > len(layers) or not all(is_fusable(layers[k]) for k in group):
            raise PuzzleError(f"layers {group.start}..{group.stop - 1} are not a run of attention-free dense FFNs")
        if taken & set(group):
            raise PuzzleError(f"fusion groups overlap at layers {sorted(taken & set(group))}")
        taken |= set(group)


def fuse_child(model: DeciLMForCausalLM, *, groups: list[range]) -> DeciLMForCausalLM:
    """A new child in which each group of attention-free dense FFNs is one wide FFN in its first layer."""
    _check_groups(model, groups)
    layers = model.model.layers
    config = copy.deepcopy(model.config)
    config.block_configs = fused_block_configs(model.config.block_configs, groups, hidden_size=config.hidden_size)
    state = dict(model.state_dict())
    for group in groups:
        prefixes = tuple(f"model.layers.{k}.{part}." for k in group for part in ("mlp", "post_attention_layernorm"))
        state = {name: value for name, value in state.items() if not name.startswith(prefixes)}
        norm, mlp = fuse_mlp(norms=[layers[k].post_attention_layernorm for k in group],
                             mlps=[layers[k].mlp for k in group])
        state[f"model.layers.{group.start}.post_attention_layernorm.weight"] = norm.weight
        state.update({f"model.layers.{group.start}.mlp.{name}": value for name, value in mlp.state_dict().items()})
    parameter = next(model.parameters())
    fused = DeciLMForCausalLM(config).to(device=parameter.device, dtype=parameter.dtype)
    fused.load_state_dict(state, strict=True)
    return fused.eval()


def default_child(config: PuzzleConfig) -> Path:
    """The job's distilled child if it exists, else its realized child."""
    run = RunDir.of(config)
    candidates = [run.stage_dir(stage) / "checkpoint" for stage in (Stage.kd, Stage.child)]
    for path in candidates:
        if (path / "config.json").is_file():
            return path
    raise PuzzleError(f"no child to fuse: neither {candidates[0]} nor {candidates[1]} exists; "
                      "run `puzzle realize` first, or give --child")


def _measure(parent, unfused, fused, blocks: torch.Tensor, config: PuzzleConfig) -> tuple[Measured, Measured]:
    batch = config.eval.batch_size
    to_parent, _ = quality(parent.adapter.logits, {"unfused": hf_logits(unfused), "fused": hf_logits(fused)}, blocks,
                           batch)
    to_unfused, _ = quality(hf_logits(unfused), {"fused": hf_logits(fused)}, blocks, batch)
    s = config.profile.scenario
    times = generation_times([unfused, fused], s, config.eval.speed_warmup, config.eval.speed_repeats)

    def measured(name: str, model, kl_to_unfused: float, prefill: float, decode: float) -> Measured:
        return Measured(
            parameters=sum(p.numel() for p in model.parameters()), kl_to_parent=to_parent[name]["kl"],
            kl_to_unfused=kl_to_unfused, prefill_tokens_per_second=s.batch_size * s.prefill_length / prefill,
            decode_tokens_per_second=s.batch_size / decode,
        )

    return measured("unfused", unfused, 0.0, *times[0]), measured("fused", fused, to_unfused["fused"]["kl"], *times[1])


def _child_info(source: Path, fused: DeciLMForCausalLM, groups: list[range], fusion: dict) -> dict:
    """The source's puzzle_child.json with the fused layers renamed, the engines re-judged and `fusion` added."""
    file = source / "puzzle_child.json"
    info = json.loads(file.read_text()) if file.is_file() else {}
    # A checkpoint realized by puzzle names its layers' specs; another DeciLM child may not.
    layers = info.get("layers")
    if layers:
        for group in groups:
            layers[group.start]["ffn"] = f"ffn.i{fused.config.block_configs[group.start]['ffn']['intermediate_size']}"
            for k in group[1:]:
                layers[k]["ffn"] = "ffn.noop"
    return {**info, "engines": [asdict(e) for e in servability(fused.config)], "fusion": fusion}


def _paths(config: PuzzleConfig, child: Path | None, output: Path | None) -> tuple[Path, Path]:
    source = default_child(config) if child is None else Path(child)
    if not (source / "config.json").is_file():
        raise PuzzleError(f"--child: {source} is not a child checkpoint (no config.json)")
    if child_class(source) is not DeciLMForCausalLM:
        raise PuzzleError(f"--child: {source} is a hybrid (Nemotron-H Puzzle) child; fusion joins the FFNs of "
                          "attention-free runs of DeciLM children only")
    target = source.with_name(source.name + "-fused") if output is None else Path(output)
    if target.resolve() == source.resolve():
        raise PuzzleError(f"--output: {target} is the child itself; the fused child needs a directory of its own")
    return source, target


def key_extra(config: PuzzleConfig, run: RunDir, *, child: Path | None = None, output: Path | None = None,
              include_last: bool = False, max_distance: float | None = None) -> str:
    source, target = _paths(config, child, output)
    stamp = (source / "config.json").stat().st_mtime_ns
    return f"{source.resolve()}@{stamp}->{target.resolve()}/{include_last}/{max_distance}"


def run(ctx: StageContext, *, child: Path | None = None, output: Path | None = None, include_last: bool = False,
        max_distance: float | None = None) -> FusionSummary:
    """Fuse the attention-free runs of `child` (default: the job's distilled child, else its realized one)
    and save the result to `output`. Nothing is written when no run has 2 FFNs left to fuse."""
    started = time.time()
    config = ctx.config
    source, target = _paths(config, child, output)
    parent = load_parent(config.parent)
    parameter = next(parent.model.parameters())
    unfused = load_child(source, parameter.dtype, parameter.device)
    runs = attention_free_runs(unfused)
    span = [(r.start, r.stop - 1) for r in runs]
    if not runs:
        return FusionSummary(source, [], [], [], None, None, None, 0, time.time() - started)
    blocks = job_blocks(config, parent.tokenizer).validation[: config.eval.validation_blocks]
    dependencies = ffn_dependencies(unfused, runs=runs, blocks=blocks, batch_size=config.eval.batch_size)
    groups = fusion_groups(runs, dependencies, include_last=include_last, max_distance=max_distance)
    if not groups:
        return FusionSummary(source, span, dependencies, [], None, None, None, blocks.numel(), time.time() - started)
    fused = fuse_child(unfused, groups=groups)
    before, after = _measure(parent, unfused, fused, blocks.to(parameter.device), config)
    fusion = {"source": str(source), "groups": [[g.start, g.stop - 1] for g in groups], "include_last": include_last,
              "max_distance": max_distance, "dependencies": [asdict(d) for d in dependencies],
              "before": asdict(before), "after": asdict(after)}
    write_checkpoint(target, fused, parent, _child_info(source, fused, groups, fusion), saved_dtype(config))
    summary = FusionSummary(source, span, dependencies, [(g.start, g.stop - 1) for g in groups], before, after, target,
                            blocks.numel(), time.time() - started)
    atomic_write_json(target.parent / "fusion.json", {**asdict(summary), "scenario": asdict(config.profile.scenario)})
    ctx.record.outputs = {"checkpoint": str(target), "fusion": str(target.parent / "fusion.json")}
    return summary
