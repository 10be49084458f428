"""The scores stage (`puzzle score`): replace-1-block scores of every block of every layer (docs/design.md §5).

A block is an (attention, FFN) pair: decoupled candidates composed, plus coupled pairs from the
library. Each layer's scores are written atomically as soon as the layer is done, so a killed run
resumes at the first unfinished layer. In a multi-process job the unfinished layers are sharded over the
ranks (each on its own device); a layer's scores do not depend on who computes them, so N processes
write what one does.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from puzzle.io import atomic_path, atomic_write_json
from puzzle.data import job_blocks
from puzzle.distill.library import Library
from puzzle.distill.scoring import METRICS, ParentReference
from puzzle.distributed import LayerPipeline, Workers, layer_shares
from puzzle.memory import model_shape, placement, scores_plan, target
from puzzle.parents import load_parent, parent_config
from puzzle.pipeline import StageContext
from puzzle.progress import progress_bar
from puzzle.rundir import Stage


@dataclass(frozen=True)
class ScoreSummary:
    table: Path
    frame: pd.DataFrame
    scored_now: int
    seconds: float


def run(ctx: StageContext, team: Workers) -> ScoreSummary | None:
    started = time.time()
    config, score_dir = ctx.config, ctx.directory
    pipeline = None
    hf_config = parent_config(config.parent)
    tgt = target(config, processes=team.world)
    whole = scores_plan(config, model_shape(config, hf_config), tgt, None)
    if team.world > 1 and placement(config, hf_config, tgt, whole) == "layers":
        # Each rank holds a share of the layers; every rank takes part in every layer's scores.
        layers = hf_config.num_hidden_layers
        share = layer_shares(layers, team.world)[team.rank]
        parent = load_parent(config.parent, share, head=share.stop == layers)
        pipeline = LayerPipeline(share, team.rank, team.world, parent.adapter.config.hidden_size, parent.dtype,
                                 parent.device)
    else:
        parent = load_parent(config.parent)
    library = Library(ctx.run.stage_dir(Stage.library), parent.adapter)
    blocks = job_blocks(config, parent.tokenizer).validation[: config.scoring.validation_blocks]
    todo = [i for i in range(len(library.layers)) if not _layer_done(score_dir, i, ctx.key)]
    team.barrier()  # every rank has seen the same finished layers before any rank writes
    mine = todo if pipeline is not None else team.shard(todo)
    total = sum(len(library.layers[i].blocks()) for i in todo)
    if mine:
        reference = ParentReference(parent.adapter, blocks.to(parent.device), config.scoring.batch_size, pipeline)
        # The rank that writes draws the bar: rank 0, or the pipeline's last rank.
        shown = team.is_main if pipeline is None else pipeline.last
        with progress_bar() as bar:
            task = bar.add_task("score blocks", total=sum(len(library.layers[i].blocks()) for i in mine), status="",
                                visible=shown)
            for i in mine:
                _score_layer(library, reference, i, score_dir, ctx.key,
                             lambda desc: bar.update(task, advance=1, status=desc))
    team.barrier()
    if not team.is_main:
        return None
    frame = pd.concat([pd.read_csv(_layer_file(score_dir, i)) for i in range(len(library.layers))], ignore_index=True)
    table = score_dir / "scores.csv"
    with atomic_path(table) as tmp:
        frame.to_csv(tmp, index=False)
    ctx.record.outputs = {"table": table.name, "blocks": len(frame), "metric": config.scoring.metric}
    return ScoreSummary(table, frame, total, time.time() - started)


def read(ctx: StageContext) -> ScoreSummary:
    table = ctx.directory / "scores.csv"
    return ScoreSummary(table, pd.read_csv(table), 0, 0.0)


def _layer_file(score_dir: Path, layer: int) -> Path:
    return score_dir / "layers" / f"L{layer:02d}.csv"


def _layer_done(score_dir: Path, layer: int, key: str) -> bool:
    marker = score_dir / "layers" / f"L{layer:02d}.json"
    if not (marker.is_file() and _layer_file(score_dir, layer).is_file()):
        return False
    return json.loads(marker.read_text()).get("fingerprint") == key


def _score_layer(library: Library, reference: ParentReference, layer: int, score_dir: Path, key: str, tick) -> None:
    """Score every block of `layer` and write the layer's rows. In a pipeline, the rank holding the layer loads
    its modules, and the last rank, which measures, writes."""
    rows = []
    space = library.layers[layer]
    holds = layer in reference.held
    attention_modules = {s: library.module(layer, s) for s in space.attention} if holds else {}
    ffn_modules = {s: library.module(layer, s) for s in space.ffn} if holds else {}
    for block in space.blocks():
        attention = ffn = None
        if holds and block.coupled:
            attention, ffn = library.pair(layer, block.attention, block.ffn)
        elif holds:
            attention, ffn = attention_modules[block.attention], ffn_modules[block.ffn]
        metrics = reference.score(layer, attention, ffn)
        if metrics is not None:
            rows.append({"layer": layer, **block.to_json(), **metrics.__dict__})
            tick(f"L{layer} {block} kl {metrics.kl:.4f}")
    if not rows:
        return  # another rank of the pipeline measured and writes this layer
    with atomic_path(_layer_file(score_dir, layer)) as tmp:
        pd.DataFrame(rows, columns=["layer", "attention", "ffn", "coupled", *METRICS]).to_csv(tmp, index=False)
    atomic_write_json(score_dir / "layers" / f"L{layer:02d}.json", {"fingerprint": key})
