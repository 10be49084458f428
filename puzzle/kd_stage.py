"""`puzzle kd`: global knowledge distillation of the realized child against its parent.

Writes RUN_DIR/kd/checkpoint (the distilled child, in the realized child's format), summary.json
(held-out losses before and after) and train_log.csv (losses per step). Resumable: training state is
saved every kd.checkpoint_every steps under RUN_DIR/kd/resume and picked up after a kill.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from puzzle.blocks.errors import PuzzleError
from puzzle.blocks.io import atomic_path, atomic_write_json
from puzzle.distill.kd import KdSettings, distill
from puzzle.config import PuzzleConfig
from puzzle.data import job_blocks
from puzzle.distributed import workers
from puzzle.parents import load_parent
from puzzle.progress import progress_bar
from puzzle.realize_stage import load_child, write_checkpoint
from puzzle.rundir import RunDir, Stage, fingerprint


@dataclass(frozen=True)
class KdSummary:
    directory: Path
    steps: int
    tokens: int
    before: dict[str, float]  # held-out losses of the realized child: total, kl, cosine, lm
    after: dict[str, float]
    seconds: float


def kd_steps(config: PuzzleConfig) -> int:
    return config.kd.tokens // (config.kd.batch_size * config.data.sequence_length)


def kd_problems(config: PuzzleConfig) -> list[str]:
    """Problems with the kd section that can be seen before any work starts."""
    problems = []
    per_step = config.kd.batch_size * config.data.sequence_length
    if kd_steps(config) == 0:
        problems.append(
            f"kd.tokens: got {config.kd.tokens}; one step takes kd.batch_size × data.sequence_length = {per_step} "
            f"tokens, so the budget is at least {per_step} (or lower kd.batch_size)"
        )
    if config.kd.child is not None and not (Path(config.kd.child) / "config.json").is_file():
        problems.append(f"kd.child: {config.kd.child!r} is not a child checkpoint (no config.json there)")
    return problems


def child_source(config: PuzzleConfig) -> tuple[Path, str]:
    """The checkpoint to distill and what identifies its content (for the stage fingerprint)."""
    if config.kd.child is not None:
        path = Path(config.kd.child)
        return path, f"{path.resolve()}@{(path / 'config.json').stat().st_mtime_ns}"
    run = RunDir.of(config)
    path = run.stage_dir(Stage.child) / "checkpoint"
    done = run.done_fingerprint(Stage.child)
    if done is None or not path.is_dir():
        raise PuzzleError(f"{path} does not exist; run `puzzle realize` first (or set kd.child)")
    return path, done


def settings(config: PuzzleConfig) -> KdSettings:
    kd = config.kd
    return KdSettings(
        learning_rate=kd.learning_rate, schedule=kd.schedule, warmup_fraction=kd.warmup_fraction,
        steps=kd_steps(config), batch_size=kd.batch_size, seed=config.run.seed, checkpoint_every=kd.checkpoint_every,
        kl_weight=kd.kl_weight, cosine_weight=kd.cosine_weight, lm_weight=kd.lm_weight,
    )


def kd_stage(config: PuzzleConfig) -> KdSummary:
    started = time.time()
    problems = kd_problems(config)
    if problems:
        raise PuzzleError("; ".join(problems))
    source, source_key = child_source(config)
    run = RunDir.of(config)
    directory = run.stage_dir(Stage.kd)
    key = fingerprint(config, ("kd", "data", "parent", "run.seed")) + "-" + source_key
    if run.is_done(Stage.kd, key) and (directory / "checkpoint").is_dir():
        return _read_summary(directory, time.time() - started)
    team = workers()
    s = settings(config)
    # Rank 0 keeps the manifest; the other ranks train under locks of their own.
    lock = run.stage(Stage.kd, key) if team.is_main else run.lock(Stage.kd, suffix=f"rank{team.rank}")
    with lock as record:
        parent = load_parent(config.parent)
        child = load_child(source, next(parent.model.parameters()).dtype, parent.model.device)
        blocks = job_blocks(config.data, parent.tokenizer)
        adapter = parent.adapter

        def parent_states(x):
            states = adapter.hidden_states(x.to(parent.model.device))
            return states, adapter.head(states[-1])

        with progress_bar() as bar:
            task = bar.add_task("global KD", total=s.steps, status="", visible=team.is_main)
            outcome = distill(
                child, parent_states, blocks.train, blocks.validation[: config.kd.eval_blocks], s,
                directory / "resume" / hashlib.sha256(key.encode()).hexdigest()[:16], team.rank, team.world,
                on_step=lambda step, losses: bar.update(
                    task, completed=step, status=f"loss {losses['total']:.4f} (KL {losses['kl']:.4f})"),
            )
        if team.is_main:
            write_checkpoint(directory / "checkpoint", child, parent, {
                **json.loads((source / "puzzle_child.json").read_text()),
                "kd": {"source": str(source), "steps": s.steps, "tokens": s.steps * s.batch_size * blocks.train.shape[1]},
            })
            with atomic_path(directory / "train_log.csv") as tmp:
                pd.DataFrame(outcome.train_loss).rename_axis("step").to_csv(tmp)
            summary = KdSummary(directory / "checkpoint", s.steps, s.steps * s.batch_size * blocks.train.shape[1],
                                outcome.before, outcome.after, time.time() - started)
            atomic_write_json(directory / "summary.json", {**asdict(summary), "directory": "checkpoint"})
            shutil.rmtree(directory / "resume", ignore_errors=True)
            record.outputs = {"checkpoint": "checkpoint", "summary": "summary.json", "train_log": "train_log.csv"}
    team.barrier()
    return _read_summary(directory, time.time() - started)


def _read_summary(directory: Path, seconds: float) -> KdSummary:
    data = json.loads((directory / "summary.json").read_text())
    return KdSummary(directory / "checkpoint", data["steps"], data["tokens"], data["before"], data["after"], seconds)
