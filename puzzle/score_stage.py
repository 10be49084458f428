"""`puzzle score`: replace-1-block scores of every block candidate of every layer.

A block is an (attention, FFN) pair: decoupled candidates composed, plus coupled pairs from the
library. Each layer's scores are written atomically as soon as the layer is done, so a killed run
resumes at the first unfinished layer.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from puzzle.blocks.errors import PuzzleError
from puzzle.blocks.io import atomic_path, atomic_write_json
from puzzle.blocks.specs import spec_from_id
from puzzle.distill.library import Library
from puzzle.distill.scoring import METRICS, ParentReference
from puzzle.config import PuzzleConfig
from puzzle.data import job_blocks
from puzzle.parents import load_parent
from puzzle.progress import progress_bar
from puzzle.rundir import RunDir, Stage, fingerprint


@dataclass(frozen=True)
class ScoreSummary:
    table: Path
    frame: pd.DataFrame
    scored_now: int
    seconds: float


def layer_blocks(library: Library, layer: int) -> list[tuple[str, str, bool]]:
    """(attention id, FFN id, coupled) for every block of the layer: decoupled compositions, then coupled pairs."""
    space = library.layers[layer]
    blocks = [(a.id, f.id, False) for a in space.attention for f in space.ffn]
    return blocks + [(a.id, f.id, True) for a, f in space.coupled]


def score_stage(config: PuzzleConfig) -> ScoreSummary:
    started = time.time()
    run = RunDir.of(config)
    lib_dir = run.stage_dir(Stage.library)
    if not (lib_dir / "space.json").is_file():
        raise PuzzleError(f"no library in {lib_dir}; run `puzzle distill` first")
    score_dir = run.stage_dir(Stage.scores)
    space_fp = json.loads((lib_dir / "space.json").read_text())["fingerprint"]
    key = fingerprint(config, ("parent", "data", "scoring")) + "-" + space_fp
    with run.stage(Stage.scores, key) as record:
        parent = load_parent(config.parent)
        library = Library(lib_dir, parent.adapter)
        blocks = job_blocks(config.data, parent.tokenizer).validation[: config.scoring.validation_blocks]
        todo = [i for i in range(len(library.layers)) if not _layer_done(score_dir, i, key)]
        total = sum(len(layer_blocks(library, i)) for i in todo)
        if todo:
            reference = ParentReference(parent.adapter, blocks.to(parent.model.device), config.scoring.batch_size)
            with progress_bar() as bar:
                task = bar.add_task("score blocks", total=total, status="")
                for i in todo:
                    _score_layer(library, reference, i, score_dir, key, lambda desc: bar.update(task, advance=1, status=desc))
        frame = pd.concat([pd.read_csv(_layer_file(score_dir, i)) for i in range(len(library.layers))], ignore_index=True)
        table = score_dir / "scores.csv"
        with atomic_path(table) as tmp:
            frame.to_csv(tmp, index=False)
        record.outputs = {"table": table.name, "blocks": len(frame), "metric": config.scoring.metric}
    return ScoreSummary(table, frame, total, time.time() - started)


def _layer_file(score_dir: Path, layer: int) -> Path:
    return score_dir / "layers" / f"L{layer:02d}.csv"


def _layer_done(score_dir: Path, layer: int, key: str) -> bool:
    marker = score_dir / "layers" / f"L{layer:02d}.json"
    if not (marker.is_file() and _layer_file(score_dir, layer).is_file()):
        return False
    return json.loads(marker.read_text()).get("fingerprint") == key


def _score_layer(library: Library, reference: ParentReference, layer: int, score_dir: Path, key: str, tick) -> None:
    rows = []
    attention_modules = {s.id: library.module(layer, s) for s in library.layers[layer].attention}
    ffn_modules = {s.id: library.module(layer, s) for s in library.layers[layer].ffn}
    for attention_id, ffn_id, coupled in layer_blocks(library, layer):
        if coupled:
            attention, ffn = library.pair(layer, spec_from_id(attention_id), spec_from_id(ffn_id))
        else:
            attention, ffn = attention_modules[attention_id], ffn_modules[ffn_id]
        metrics = reference.score(layer, attention, ffn)
        rows.append({"layer": layer, "attention": attention_id, "ffn": ffn_id, "coupled": coupled, **metrics.__dict__})
        tick(f"L{layer} {attention_id} {ffn_id} kl {metrics.kl:.4f}")
    with atomic_path(_layer_file(score_dir, layer)) as tmp:
        pd.DataFrame(rows, columns=["layer", "attention", "ffn", "coupled", *METRICS]).to_csv(tmp, index=False)
    atomic_write_json(score_dir / "layers" / f"L{layer:02d}.json", {"fingerprint": key})
