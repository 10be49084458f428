"""The library stage (`puzzle distill`): build the replacement library and train it by blockwise local
distillation (docs/design.md §3–4).

Every entry is checked each time the stage runs (its weights' checksum and the settings that trained
it), and only missing or damaged entries are trained. Candidates are trained in the groups of the memory
plan (puzzle/memory.py): balanced by bytes, each fitting beside the parent in one rank's memory; ranks
take groups in turn. The groups are packed from every candidate of the library, finished or not, so a
resumed run finds the same groups and their checkpoints.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from puzzle.errors import PuzzleError
from puzzle.engines import servable_spaces
from puzzle.io import atomic_path
from puzzle.blocks.specs import AttentionKind, AttentionSpec, FfnKind, ParentShape
from puzzle.config import PuzzleConfig
from puzzle.data import job_blocks
from puzzle.distill.bld import Candidate, build_module, ffn_channel_scores, linear_fits, linear_slots, train_candidates
from puzzle.distill.experts import expert_importance
from puzzle.distill.library import (
    ENTRY_FORMAT, LayerSpace, bld_candidates, init_name, layer_spaces, read_entry, write_entry, write_space,
)
from puzzle.distill.schedule import TrainingSettings
from puzzle.distributed import LayerPipeline, Workers, layer_shares
from puzzle.families import parent_shapes
from puzzle.memory import bld_groups, linear_fit_slots, model_shape, placement, target
from puzzle.parents import load_parent, parent_config
from puzzle.pipeline import StageContext
from puzzle.progress import progress_bar
from puzzle.rundir import fingerprint


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
    groups: int = 0  # groups trained now


def job_spaces(config: PuzzleConfig, shapes: list[ParentShape]) -> list[LayerSpace]:
    """The library's layer spaces, without the subblocks the target engine serves in no layer."""
    return targeted_spaces(config, shapes)[0]


def targeted_spaces(config: PuzzleConfig, shapes: list[ParentShape]) -> tuple[list[LayerSpace], list[str]]:
    """The library's layer spaces as `target.engine` leaves them, and the candidates it removed."""
    spaces = layer_spaces(shapes, config.library, config.bld.coupled_pairs, every_pair=config.bld.mode == "coupled")
    return servable_spaces(config.target.engine, spaces, shapes)


def entry_fingerprint(config: PuzzleConfig) -> str:
    # Not the library section: adding a candidate must not invalidate the ones already trained. The
    # expert ranking is in it: it decides which experts a kept-k entry holds.
    keys = ("run.seed", "parent", "data", "bld", "library.expert_importance")
    return f"{fingerprint(config, keys)}-v{ENTRY_FORMAT}"


def run(ctx: StageContext, team: Workers) -> LibrarySummary:
    started = time.time()
    config, lib_dir = ctx.config, ctx.directory
    hf_config = parent_config(config.parent)
    shapes = parent_shapes(hf_config)
    spaces = job_spaces(config, shapes)
    candidates = bld_candidates(spaces, shapes)
    entry_key = entry_fingerprint(config)
    todo = [c for c in candidates if read_entry(lib_dir, c, entry_key) is None]
    team.barrier()  # every rank has seen the same finished entries before any rank writes new ones
    model, tgt = model_shape(config, hf_config), target(config, processes=team.world)
    how = placement(config, hf_config, tgt, bld_groups(config, model, candidates, tgt)[1])
    if how == "layers" and team.world > 1:
        # Each rank holds a share of the layers and trains their candidates; all ranks pass every batch on.
        share = layer_shares(len(shapes), team.world)[team.rank]
        ours = [c for c in candidates if c.layer in share]
        groups, _ = bld_groups(config, model, ours, tgt, 1, share)
        mine = [g for g in ([c for c in group if c in todo] for group in groups) if g]
        held = _train_groups(config, mine, lib_dir, entry_key, team, len(todo),
                             linear_fit_slots(config, model, ours, tgt, share), share)
    else:
        groups, _ = bld_groups(config, model, candidates, tgt)
        groups = [[c for c in group if c in todo] for group in groups]
        mine = [group for group in team.shard(groups) if group]
        fit_slots = linear_fit_slots(config, model, candidates, tgt)
        held = _train_groups(config, mine, lib_dir, entry_key, team, len(todo), fit_slots) if mine else None
    team.barrier()
    rows = []
    for c in candidates:
        row = read_entry(lib_dir, c, entry_key)
        if row is None:
            raise PuzzleError(f"library entry {c.key} was not written; see the log of the process that trained it")
        rows.append(LibraryRow(c.key, c.layer, c.subblocks, row["init"], row["initial_nmse"], row["final_nmse"],
                               row["kept_initialization"], c in todo))
    if team.is_main:
        write_space(lib_dir, spaces, entry_key)
        with atomic_path(lib_dir / "table.csv") as tmp:
            pd.DataFrame([r.__dict__ for r in rows]).to_csv(tmp, index=False)
        ctx.record.outputs = {"candidates": len(rows), "trained_now": len(todo), "table": "table.csv",
                              "space": "space.json", "groups": sum(1 for g in groups if g),
                              "parent_placement": how if team.world > 1 else "replicated",
                              "parent_bytes": model.weight_bytes, "parent_bytes_per_rank": held}
    return LibrarySummary(lib_dir, rows, len(todo), time.time() - started, sum(1 for g in groups if g))


def read(ctx: StageContext) -> LibrarySummary:
    frame = pd.read_csv(ctx.directory / "table.csv")
    rows = [LibraryRow(**{**r, "trained_now": False}) for r in frame.to_dict("records")]
    return LibrarySummary(ctx.directory, rows, 0, 0.0)


@dataclass
class BldJob:
    """What every group of one process shares: the data, the FFN scores that initialize candidates, the schedule."""

    train: object  # BlockSet on the host, read a batch at a time
    held_out: torch.Tensor  # on the device
    scores: list | None
    fits: dict  # where linear candidates start: LinearSlot → LinearFit
    settings: TrainingSettings


def prepare_bld(config: PuzzleConfig, parent, candidates: list[Candidate], fit_slots: int, pipeline=None) -> BldJob:
    """`fit_slots`: the linear subblocks whose least-squares statistics one calibration pass holds
    (`puzzle.memory.linear_fit_slots`)."""
    bld = config.bld
    device = parent.device
    data = job_blocks(config, parent.tokenizer)
    steps = math.ceil(bld.tokens_per_candidate / (bld.batch_size * bld.sequence_length))
    settings = TrainingSettings(
        learning_rate=bld.learning_rate, schedule=bld.schedule, warmup_fraction=bld.warmup_fraction, steps=steps,
        batch_size=bld.batch_size, seed=config.run.seed, checkpoint_every=bld.checkpoint_every,
    )
    slots = linear_slots(candidates, parent.adapter)
    calibration = data.calibration(config.data.calibration_blocks).to(device)
    return BldJob(
        train=data.train.recut(bld.sequence_length),
        held_out=data.validation.recut(bld.sequence_length)[: bld.eval_blocks].to(device),
        scores=ffn_scores(config, parent.adapter, data, candidates, device, pipeline),
        fits=linear_fits(parent.adapter, calibration, config.eval.batch_size, slots, fit_slots, pipeline),
        settings=settings,
    )


def group_modules(config: PuzzleConfig, parent, job: BldJob, group: list[Candidate]) -> nn.ModuleDict:
    """A group's candidates, initialized from the parent, on the parent's device."""
    device = parent.device
    return nn.ModuleDict(
        {c.module_name: build_module(c, parent.adapter, job.scores, config.parent.attn_implementation, job.fits)
         for c in group}
    ).to(device)


def ffn_scores(config: PuzzleConfig, adapter, data, candidates: list[Candidate], device, pipeline=None) -> list | None:
    """Per layer, what FFN candidates are cut by: channel contributions (dense), expert importances (MoE). In a
    pipeline every rank makes the calibration passes, whatever its own candidates need."""
    kinds = {c.ffn.kind for c in candidates if c.ffn is not None}
    if pipeline is not None:
        kinds.add(FfnKind.dense)  # pipelines hold dense parents only
    mamba = any(c.attention is not None and c.attention.kind is AttentionKind.mamba for c in candidates)
    if not kinds & {FfnKind.dense, FfnKind.moe} and not mamba:
        return None
    calibration = data.calibration(config.data.calibration_blocks).to(device)
    batch = config.eval.batch_size
    channels = (ffn_channel_scores(adapter, calibration, batch, pipeline) if FfnKind.dense in kinds or mamba
                else [None] * adapter.num_layers)
    experts = [None] * adapter.num_layers
    if FfnKind.moe in kinds:
        experts = expert_importance(adapter, calibration, batch_size=batch, method=config.library.expert_importance)
    return [c if c is not None else e for c, e in zip(channels, experts)]


def _train_groups(config: PuzzleConfig, groups: list[list[Candidate]], lib_dir: Path, entry_key: str,
                  team: Workers, total: int, fit_slots: int, share: range | None = None) -> list[int] | None:
    """Train `groups` in turn. With `share`, this rank holds only those layers of the parent, in a pipeline
    whose ranks all run as many rounds as the rank with the most groups (with nothing to train, a rank
    passes the stream on). Returns, in a pipeline, the parent's bytes each rank holds."""
    parent = load_parent(config.parent, share)
    pipeline, held = None, None
    rounds = len(groups)
    if share is not None:
        pipeline = LayerPipeline(share, team.rank, team.world, parent.adapter.config.hidden_size, parent.dtype,
                                 parent.device)
        rounds = pipeline.most(len(groups))
        held = pipeline.gather(sum(p.numel() * p.element_size() for p in parent.model.parameters()
                                   if p.device.type != "meta"))
        if rounds == 0:
            return held
    job = prepare_bld(config, parent, [c for group in groups for c in group], fit_slots, pipeline)
    steps = job.settings.steps
    done = 0
    with progress_bar() as bar:
        # Rank 0 draws the bar for everyone: ranks step in lockstep, each over its own groups.
        task = bar.add_task(f"BLD {total} candidates", total=steps * total, status="", visible=team.is_main)
        for n in range(rounds):
            group = groups[n] if n < len(groups) else []
            modules = group_modules(config, parent, job, group)

            def on_step(step: int, losses: dict[str, float]) -> None:
                mean = sum(losses.values()) / max(1, len(losses))
                bar.update(task, completed=(done + step * len(group)) * team.world,
                           status=f"group {n + 1}/{rounds} step {step}/{steps} mean nMSE {mean:.4f}")

            name = hashlib.sha256(",".join(c.key for c in group).encode()).hexdigest()[:12]
            checkpoint = lib_dir / ".bld" / f"{entry_key}-{name}"
            results = train_candidates(group, modules, parent.adapter, job.train, job.held_out, job.settings,
                                       checkpoint, on_step=on_step, pipeline=pipeline)
            _write_entries(config, parent, results, lib_dir, entry_key, steps)
            shutil.rmtree(checkpoint, ignore_errors=True)
            done += steps * len(group)
            del modules, results  # the next group's state takes this one's place
    return held


def _write_entries(config: PuzzleConfig, parent, results, lib_dir: Path, entry_key: str, steps: int) -> None:
    adapter = parent.adapter
    tokens = steps * config.bld.batch_size * config.bld.sequence_length
    for result in results:
        c = result.candidate
        spec = c.attention if c.attention is not None else c.ffn
        shape = adapter.shape(c.layer)
        parent_spec = shape.attention if isinstance(spec, AttentionSpec) else shape.ffn
        init = init_name(spec, parent_spec) if c.attention is None or c.ffn is None else "coupled"
        write_entry(lib_dir, result, init=init, steps=steps, tokens=tokens, fingerprint=entry_key, dtype=parent.dtype)
