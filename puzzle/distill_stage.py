"""`puzzle distill`: build the replacement library and train it by blockwise local distillation."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from puzzle.blocks.errors import PuzzleError
from puzzle.blocks.io import atomic_path
from puzzle.blocks.space import SpaceOptions, attention_candidates, check_not_empty, ffn_candidates
from puzzle.blocks.specs import AttentionSpec, FfnKind, FfnSpec, ParentShape, needs_training, spec_from_id
from puzzle.distill.bld import Candidate, build_module, ffn_channel_scores, train_candidates
from puzzle.distill.experts import expert_importance
from puzzle.distill.library import ENTRY_FORMAT, LayerSpace, init_name, read_entry, write_entry, write_space
from puzzle.distill.schedule import TrainingSettings
from puzzle.config import PuzzleConfig
from puzzle.data import job_blocks
from puzzle.distributed import Workers, workers
from puzzle.parents import load_parent
from puzzle.progress import progress_bar
from puzzle.rundir import RunDir, Stage, fingerprint


def space_options(config: PuzzleConfig) -> SpaceOptions:
    lib = config.library
    return SpaceOptions(
        kv_heads=None if lib.kv_heads == "divisors" else tuple(lib.kv_heads),
        windows=tuple(lib.windows),
        linear_attention=lib.linear_attention,
        noop_attention=lib.noop_attention,
        ffn_fractions=tuple(lib.ffn_fractions),
        ffn_sizes=tuple(lib.ffn_sizes),
        ffn_grid=lib.ffn_grid,
        linear_ffn=lib.linear_ffn,
        noop_ffn=lib.noop_ffn,
        experts=tuple(lib.experts),
    )


def _coupled_pairs(config: PuzzleConfig, attention: list[AttentionSpec], ffn: list[FfnSpec]):
    if config.bld.mode == "coupled":
        return [(a, f) for a in attention for f in ffn]
    pairs = []
    for text in config.bld.coupled_pairs:
        try:
            a, f = (spec_from_id(part) for part in text.split("+"))
        except ValueError as e:
            raise PuzzleError(f"bld.coupled_pairs: {text!r}: {e}") from None
        if not (isinstance(a, AttentionSpec) and isinstance(f, FfnSpec)):
            raise PuzzleError(f"bld.coupled_pairs: {text!r} must be 'attention.…+ffn.…'")
        if a not in attention or f not in ffn:
            raise PuzzleError(f"bld.coupled_pairs: {text!r} names a candidate that is not in the library")
        pairs.append((a, f))
    return pairs


def layer_spaces(shapes: list[ParentShape], config: PuzzleConfig) -> list[LayerSpace]:
    options = space_options(config)
    if options.experts and not any(s.is_moe for s in shapes):
        raise PuzzleError("library.experts: the parent has no MoE layers; leave it empty for a dense parent")
    spaces = []
    for shape in shapes:
        attention, ffn = attention_candidates(shape, options), ffn_candidates(shape, options)
        check_not_empty(attention, ffn)
        spaces.append(LayerSpace(attention, ffn, _coupled_pairs(config, attention, ffn)))
    return spaces


def bld_candidates(spaces: list[LayerSpace], shapes: list[ParentShape]) -> list[Candidate]:
    out = []
    for i, (space, shape) in enumerate(zip(spaces, shapes)):
        out += [Candidate(i, attention=a) for a in space.attention if needs_training(a, shape)]
        out += [Candidate(i, ffn=f) for f in space.ffn if needs_training(f, shape)]
        out += [
            Candidate(i, attention=a, ffn=f)
            for a, f in space.coupled
            if needs_training(a, shape) or needs_training(f, shape)
        ]
    return list(dict.fromkeys(out))


def entry_fingerprint(config: PuzzleConfig) -> str:
    # Not the library section: adding a candidate must not invalidate the ones already trained. The
    # expert ranking is in it: it decides which experts a kept-k entry holds.
    keys = ("run.seed", "parent", "data", "bld", "library.expert_importance")
    return f"{fingerprint(config, keys)}-v{ENTRY_FORMAT}"


def recut(blocks: torch.Tensor, length: int) -> torch.Tensor:
    """Cut data blocks into BLD blocks; BLD uses only the training split, so validation stays unseen."""
    if length > blocks.shape[1]:
        raise PuzzleError(
            f"bld.sequence_length: {length} is longer than data.sequence_length ({blocks.shape[1]}); "
            "lower it or raise data.sequence_length"
        )
    per = blocks.shape[1] // length
    return blocks[:, : per * length].reshape(-1, length)


@dataclass(frozen=True)
class LibraryRow:
    key: str
    layer: int
    subblocks: str
    init: str
    initial_nmse: float
    final_nmse: float
    kept_initialization: bool
    trained_now: bool


@dataclass(frozen=True)
class LibrarySummary:
    directory: Path
    rows: list[LibraryRow]
    trained_now: int
    seconds: float


def distill_stage(config: PuzzleConfig) -> LibrarySummary:
    import time

    started = time.time()
    w = workers()
    run = RunDir.of(config)
    lib_dir = run.stage_dir(Stage.library)
    stage_key = fingerprint(config, ("run.seed", "parent", "data", "library", "bld"))
    lock = run.stage(Stage.library, stage_key) if w.is_main else run.lock(Stage.library, suffix=f"rank{w.rank}")
    with lock as record:
        summary = _distill(config, w, lib_dir, started)
        if w.is_main:
            record.outputs = {
                "candidates": len(summary.rows),
                "trained_now": summary.trained_now,
                "table": "table.csv",
                "space": "space.json",
            }
    return summary


def _distill(config: PuzzleConfig, w: Workers, lib_dir: Path, started: float) -> LibrarySummary:
    import time

    parent = load_parent(config.parent)
    adapter = parent.adapter
    shapes = [adapter.shape(i) for i in range(adapter.num_layers)]
    spaces = layer_spaces(shapes, config)
    candidates = bld_candidates(spaces, shapes)
    entry_key = entry_fingerprint(config)
    todo = [c for c in candidates if read_entry(lib_dir, c, entry_key) is None]
    w.barrier()  # every rank has seen the same finished entries before any rank writes new ones
    shard = w.shard(todo)
    if shard:
        _train_shard(config, parent, shard, lib_dir, entry_key, w, len(todo))
    w.barrier()
    rows = []
    for c in candidates:
        row = read_entry(lib_dir, c, entry_key)
        if row is None:
            raise PuzzleError(f"library entry {c.key} was not written; see the log of the process that trained it")
        rows.append(
            LibraryRow(
                c.key, c.layer, c.subblocks, row["init"], row["initial_nmse"], row["final_nmse"],
                row["kept_initialization"], c in todo,
            )
        )
    if w.is_main:
        write_space(lib_dir, spaces, entry_key)
        _write_table(lib_dir / "table.csv", rows)
    return LibrarySummary(lib_dir, rows, len(todo), time.time() - started)


@dataclass
class BldJob:
    """Everything one process needs to train its candidates."""

    candidates: list[Candidate]
    modules: nn.ModuleDict
    train: torch.Tensor
    held_out: torch.Tensor
    settings: TrainingSettings


def prepare_bld(config: PuzzleConfig, parent, candidates: list[Candidate]) -> BldJob:
    bld = config.bld
    adapter = parent.adapter
    device = next(parent.model.parameters()).device
    data = job_blocks(config.data, parent.tokenizer)
    steps = math.ceil(bld.tokens_per_candidate / (bld.batch_size * bld.sequence_length))
    settings = TrainingSettings(
        learning_rate=bld.learning_rate, schedule=bld.schedule, warmup_fraction=bld.warmup_fraction, steps=steps,
        batch_size=bld.batch_size, seed=config.run.seed, checkpoint_every=bld.checkpoint_every,
    )
    scores = ffn_scores(config, adapter, data, candidates, device)
    modules = nn.ModuleDict(
        {c.module_name: build_module(c, adapter, scores, config.parent.attn_implementation) for c in candidates}
    ).to(device)
    return BldJob(
        candidates=candidates,
        modules=modules,
        train=recut(data.train, bld.sequence_length).to(device),
        held_out=recut(data.validation, bld.sequence_length)[: bld.eval_blocks].to(device),
        settings=settings,
    )


def ffn_scores(config: PuzzleConfig, adapter, data, candidates: list[Candidate], device) -> list | None:
    """Per layer, what FFN candidates are cut by: channel contributions (dense), expert importances (MoE)."""
    kinds = {c.ffn.kind for c in candidates if c.ffn is not None}
    if not kinds & {FfnKind.dense, FfnKind.moe}:
        return None
    calibration = data.calibration(config.data.calibration_blocks).to(device)
    batch = config.eval.batch_size
    channels = ffn_channel_scores(adapter, calibration, batch) if FfnKind.dense in kinds else [None] * adapter.num_layers
    experts = [None] * adapter.num_layers
    if FfnKind.moe in kinds:
        experts = expert_importance(adapter, calibration, batch_size=batch, method=config.library.expert_importance)
    return [c if c is not None else e for c, e in zip(channels, experts)]


def _train_shard(config, parent, shard, lib_dir, entry_key, w: Workers, total: int) -> None:
    adapter = parent.adapter
    job = prepare_bld(config, parent, shard)
    steps = job.settings.steps
    checkpoint = lib_dir / ".bld" / f"{entry_key}-rank{w.rank}-of{w.world}"
    with progress_bar() as bar:
        # Rank 0 draws the bar for everyone: ranks step in lockstep, each over its shard.
        task = bar.add_task(f"BLD {total} candidates", total=steps * total, status="", visible=w.is_main)

        def on_step(step: int, losses: dict[str, float]) -> None:
            mean = sum(losses.values()) / len(losses)
            bar.update(task, completed=step * total, status=f"step {step}/{steps} mean nMSE {mean:.4f}")

        results = train_candidates(
            shard, job.modules, adapter, job.train, job.held_out, job.settings, checkpoint, on_step=on_step
        )
    for result in results:
        c = result.candidate
        spec = c.attention if c.attention is not None else c.ffn
        shape = adapter.shape(c.layer)
        parent_spec = shape.attention if isinstance(spec, AttentionSpec) else shape.ffn
        init = init_name(spec, parent_spec) if c.attention is None or c.ffn is None else "coupled"
        tokens = steps * job.settings.batch_size * config.bld.sequence_length
        write_entry(lib_dir, result, init=init, steps=steps, tokens=tokens, fingerprint=entry_key)
    shutil.rmtree(checkpoint, ignore_errors=True)


def _write_table(path: Path, rows: list[LibraryRow]) -> None:
    import pandas as pd

    frame = pd.DataFrame([r.__dict__ for r in rows])
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
