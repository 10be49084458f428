"""The child stage (`puzzle realize`): assemble the chosen architecture from the library and save it as a
Hugging Face checkpoint in the format of `puzzle.checkpoint` (docs/design.md §8)."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from puzzle.errors import PuzzleError
from puzzle.blocks.hybrid import kept_layers
from puzzle.blocks.specs import BlockChoice
from puzzle.checkpoint import (
    build_child, checkpoint_parameters, child_choices, child_config, child_info, saved_dtype, streamed_child_tensors,
    write_checkpoint, write_child,
)
from puzzle.config import PuzzleConfig
from puzzle.distill.library import Library
from puzzle.engines import EngineVerdict, servability
from puzzle.kv_fp8 import calibration_key, job_kv_calibration
from puzzle.parents import load_parent, parent_config, parent_device, parent_skeleton, readable_by_key
from puzzle.pipeline import StageContext
from puzzle.rundir import RunDir, Stage
from puzzle.sharding import CheckpointReader
from puzzle.solutions import read_solutions


@dataclass(frozen=True)
class RealizeSummary:
    directory: Path
    choices: list[BlockChoice]
    parameters: int
    parent_parameters: int
    engines: list[EngineVerdict]
    seconds: float


def _solution(config: PuzzleConfig, run: RunDir) -> list[BlockChoice]:
    """The blocks of the solution realize.solution names."""
    found = read_solutions(run.stage_dir(Stage.search) / "solutions.json").solutions
    index = config.realize.solution
    if not 0 <= index < len(found):
        raise PuzzleError(f"solution {index} does not exist: the search found {len(found)} (indices 0..{len(found) - 1})")
    return found[index].blocks


def key_extra(config: PuzzleConfig, run: RunDir) -> str:
    # The solution's blocks, not the file's time: an identical re-search leaves the child (and KD) valid.
    blocks = [b.to_json() for b in _solution(config, run)]
    return hashlib.sha256(json.dumps(blocks).encode()).hexdigest()[:16] + "-" + calibration_key(config)


def parent_parameters(config: PuzzleConfig) -> int:
    local = Path(config.parent.path)
    if local.is_dir():
        return checkpoint_parameters(local)
    return sum(p.numel() for p in load_parent(config.parent).model.parameters())


def run(ctx: StageContext) -> RealizeSummary:
    started = time.time()
    config = ctx.config
    choices = _solution(config, ctx.run)
    directory = ctx.directory / "checkpoint"
    info = {"solution": config.realize.solution, "layers": [c.to_json() for c in choices]}
    if readable_by_key(config.parent, parent_config(config.parent)):
        engines = _streamed(config, ctx.run, choices, directory, info)
    else:
        parent = load_parent(config.parent)
        child = build_child(parent, Library(ctx.run.stage_dir(Stage.library), parent.adapter), choices)
        engines = servability(child.config, kept_layers(choices), Path(config.parent.path).expanduser())
        write_checkpoint(directory, child, parent, {**info, "engines": [e.__dict__ for e in engines]},
                         saved_dtype(config), job_kv_calibration(config, parent.tokenizer, parent.device))
    ctx.record.outputs = {"checkpoint": "checkpoint", "solution": config.realize.solution}
    return RealizeSummary(directory, choices, checkpoint_parameters(directory), parent_parameters(config), engines,
                          time.time() - started)


def _streamed(config: PuzzleConfig, run: RunDir, choices: list[BlockChoice], directory: Path,
              info: dict) -> list[EngineVerdict]:
    """The child written a layer at a time on the host, from the library and the parent's files: neither the
    parent nor the child is ever whole in memory (docs/design.md §8)."""
    parent = parent_skeleton(config.parent)
    child = child_config(parent.model.config, choices)
    engines = servability(child, kept_layers(choices), Path(config.parent.path).expanduser())
    tensors = streamed_child_tensors(parent, CheckpointReader(Path(config.parent.path).expanduser()),
                                     Library(run.stage_dir(Stage.library), parent.adapter), choices, parent.model.dtype)
    write_child(directory, child, tensors, dtype=saved_dtype(config), tokenizer=parent.tokenizer,
                generation_config=parent.model.generation_config, info={**info, "engines": [e.__dict__ for e in engines]},
                kv_calibration=job_kv_calibration(config, parent.tokenizer, parent_device(config.parent.device)))
    return engines


def read(ctx: StageContext) -> RealizeSummary:
    directory = ctx.directory / "checkpoint"
    engines = [EngineVerdict(**e) for e in child_info(directory)["engines"]]
    return RealizeSummary(directory, child_choices(directory), checkpoint_parameters(directory),
                          parent_parameters(ctx.config), engines, 0.0)
