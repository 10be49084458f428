"""The child stage (`puzzle realize`): assemble the chosen architecture from the library and save it as a
Hugging Face checkpoint in the format of `puzzle.checkpoint` (docs/design.md §8)."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from puzzle.errors import PuzzleError
from puzzle.blocks.specs import BlockChoice
from puzzle.checkpoint import build_child, checkpoint_parameters, child_choices, child_info, write_checkpoint
from puzzle.config import PuzzleConfig
from puzzle.distill.library import Library
from puzzle.engines import EngineVerdict, servability
from puzzle.parents import load_parent
from puzzle.pipeline import StageContext
from puzzle.rundir import RunDir, Stage
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
    return hashlib.sha256(json.dumps(blocks).encode()).hexdigest()[:16]


def parent_parameters(config: PuzzleConfig) -> int:
    local = Path(config.parent.path)
    if local.is_dir():
        return checkpoint_parameters(local)
    return sum(p.numel() for p in load_parent(config.parent).model.parameters())


def run(ctx: StageContext) -> RealizeSummary:
    started = time.time()
    config = ctx.config
    choices = _solution(config, ctx.run)
    parent = load_parent(config.parent)
    library = Library(ctx.run.stage_dir(Stage.library), parent.adapter)
    child = build_child(parent, library, choices)
    engines = servability(child.config)
    directory = ctx.directory / "checkpoint"
    write_checkpoint(directory, child, parent, {
        "solution": config.realize.solution,
        "layers": [c.to_json() for c in choices],
        "engines": [e.__dict__ for e in engines],
    })
    ctx.record.outputs = {"checkpoint": "checkpoint", "solution": config.realize.solution}
    return RealizeSummary(directory, choices, checkpoint_parameters(directory),
                          sum(p.numel() for p in parent.model.parameters()), engines, time.time() - started)


def read(ctx: StageContext) -> RealizeSummary:
    directory = ctx.directory / "checkpoint"
    engines = [EngineVerdict(**e) for e in child_info(directory)["engines"]]
    return RealizeSummary(directory, child_choices(directory), checkpoint_parameters(directory),
                          parent_parameters(ctx.config), engines, 0.0)
