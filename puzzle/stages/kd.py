"""The kd stage (`puzzle kd`): global knowledge distillation of the realized child against its parent
(docs/design.md §9).

Writes kd/checkpoint (the distilled child, in the realized child's format), summary.json (held-out
losses before and after) and train_log.csv (losses per step). Resumable: training state is saved every
kd.checkpoint_every steps under kd/resume and picked up after a kill.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from puzzle.errors import PuzzleError
from puzzle.io import atomic_path, atomic_write_json, read_json
from puzzle.checkpoint import child_choices, child_info, load_child, load_child_sharded, saved_dtype, write_checkpoint, write_child
from puzzle.config import PuzzleConfig
from puzzle.data import job_blocks
from puzzle.distill.kd import distill
from puzzle.distributed import Workers
from puzzle.kv_fp8 import KvCalibration, calibration_key, job_kv_calibration
from puzzle.parents import load_parent
from puzzle.pipeline import StageContext
from puzzle.progress import progress_bar
from puzzle.rundir import RunDir, Stage
from puzzle.sharding import full_tensors, held_bytes, is_sharded


@dataclass(frozen=True)
class KdSummary:
    directory: Path
    steps: int
    tokens: int
    before: dict[str, float]  # held-out losses of the realized child: total, kl, cosine, lm
    after: dict[str, float]
    seconds: float


def child_source(config: PuzzleConfig, run: RunDir) -> tuple[Path, str]:
    """The checkpoint to distill and what identifies its content (for the stage's key)."""
    if config.kd.child is not None:
        path = Path(config.kd.child)
        return path, f"{path.resolve()}@{(path / 'config.json').stat().st_mtime_ns}"
    path = run.stage_dir(Stage.child) / "checkpoint"
    done = run.done_fingerprint(Stage.child)
    if done is None or not path.is_dir():
        raise PuzzleError(f"{path} does not exist; run `puzzle realize` first (or set kd.child)")
    return path, done


def key_extra(config: PuzzleConfig, run: RunDir) -> str:
    return f"{child_source(config, run)[1]}-{calibration_key(config)}"


def run(ctx: StageContext, team: Workers) -> KdSummary | None:
    started = time.time()
    config, directory = ctx.config, ctx.directory
    source, _ = child_source(config, ctx.run)
    s = config.kd_settings()
    sharded = config.kd.shard and team.world > 1
    parent = load_parent(config.parent, sharded=sharded)  # the teacher too, where it can be read a layer at a time
    device = parent.device
    # Trained in fp32 (master weights and AdamW state), computed in the parent's dtype, saved in saved_dtype's.
    child = (load_child_sharded(source, torch.float32, device, offload=config.kd.offload) if sharded
             else load_child(source, torch.float32, device))
    child.model.activation_checkpointing = config.kd.activation_checkpointing
    blocks = job_blocks(config, parent.tokenizer)

    with progress_bar() as bar:
        task = bar.add_task("global KD", total=s.steps, status="", visible=team.is_main)
        outcome = distill(
            child, _teacher(parent, source), blocks.train, blocks.validation[: config.kd.eval_blocks], s,
            directory / "resume" / hashlib.sha256(ctx.key.encode()).hexdigest()[:16], team.rank, team.world,
            on_step=lambda step, losses: bar.update(
                task, completed=step, status=f"loss {losses['total']:.4f} (KL {losses['kl']:.4f})"),
        )
    held = team.gather(held_bytes(parent.model))
    tokens = s.steps * s.batch_size * blocks.train.length
    info = {**child_info(source), "kd": {"source": str(source), "steps": s.steps, "tokens": tokens}}
    calibration = job_kv_calibration(config, parent.tokenizer, device) if team.is_main else None
    _write_child(directory / "checkpoint", child, parent, saved_dtype(config), info, team, calibration)
    if not team.is_main:
        return None
    with atomic_path(directory / "train_log.csv") as tmp:
        pd.DataFrame(outcome.train_loss).rename_axis("step").to_csv(tmp)
    summary = KdSummary(directory / "checkpoint", s.steps, tokens, outcome.before, outcome.after,
                        time.time() - started)
    atomic_write_json(directory / "summary.json", {**asdict(summary), "directory": "checkpoint"})
    shutil.rmtree(directory / "resume", ignore_errors=True)
    parallel = "none" if team.world == 1 else "fsdp2" if sharded else "ddp"
    ctx.record.outputs = {"checkpoint": "checkpoint", "summary": "summary.json", "train_log": "train_log.csv",
                          "processes": team.world, "parallel": parallel, "teacher_sharded": parent.sharded,
                          "offload": sharded and config.kd.offload, "teacher_bytes_per_rank": held}
    return summary


def _teacher(parent, source: Path):
    """The parent's residual streams and logits, as the child's hidden states line up with them. A hybrid child
    (transformers' Nemotron-H) has no layer where the parent's was removed, and its last state is after the
    final norm."""
    if not parent.adapter.family.hybrid:
        return parent.adapter.states_and_logits
    kept = [i for i, c in enumerate(child_choices(source)) if not (c.attention.removed and c.ffn.removed)]

    def states_and_logits(input_ids: torch.Tensor):
        states, logits = parent.adapter.states_and_logits(input_ids)
        picked = [states[0]] + [states[i + 1] for i in kept]
        return picked[:-1] + [parent.adapter.final_norm(picked[-1])], logits

    return states_and_logits


def _write_child(directory: Path, child, parent, dtype: torch.dtype, info: dict, team: Workers,
                 calibration: KvCalibration | None) -> None:
    """The distilled child in `dtype`, written by rank 0 (which calibrates its FP8 KV scales when asked). A
    sharded child is gathered a tensor at a time (every rank takes part) and written as it comes: no rank ever
    holds it whole."""
    if not is_sharded(child):
        if team.is_main:
            write_checkpoint(directory, child, parent, info, dtype, calibration)
        return
    tensors = full_tensors(child)
    if not team.is_main:
        for _ in tensors:
            pass
        return
    write_child(directory, child.config, tensors, dtype=dtype, tokenizer=parent.tokenizer,
                generation_config=parent.model.generation_config, info=info, kv_calibration=calibration)


def read(ctx: StageContext) -> KdSummary:
    data = read_json(ctx.directory / "summary.json")
    return KdSummary(ctx.directory / "checkpoint", data["steps"], data["tokens"], data["before"], data["after"],
                     data["seconds"])
