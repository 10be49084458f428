"""Stage functions behind the CLI: plain typed functions, one per stage, each resumable.

Input checks (`preflight`) run before anything is written, so bad input leaves no trace on disk.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from puzzle.blocks.io import atomic_write_json
from puzzle.config import PuzzleConfig
from puzzle.data import check_files, job_blocks
from puzzle.distill_stage import layer_spaces
from puzzle.errors import ConfigError, PuzzleError
from puzzle.eval_stage import eval_problems
from puzzle.kd_stage import kd_problems
from puzzle.families import parent_shapes
from puzzle.parents import load_parent, parent_config
from puzzle.rundir import RunDir, Stage, fingerprint


def preflight(config: PuzzleConfig) -> list[str]:
    """Every problem with the job's inputs that can be seen without loading weights."""
    problems = []
    try:
        shapes = parent_shapes(parent_config(config.parent))
        layer_spaces(shapes, config)
        if config.bld.sequence_length > config.data.sequence_length:
            problems.append(
                f"bld.sequence_length: {config.bld.sequence_length} is longer than data.sequence_length "
                f"({config.data.sequence_length})"
            )
    except PuzzleError as e:
        problems.append(str(e))
    if config.data.files:
        try:
            check_files(config.data.files)
        except PuzzleError as e:
            problems.append(str(e))
    if config.data.tokenizer is not None and not Path(config.data.tokenizer).is_dir():
        problems.append(f"data.tokenizer: {config.data.tokenizer!r} is not a directory")
    return problems + kd_problems(config) + eval_problems(config)


def check_inputs(config: PuzzleConfig) -> None:
    problems = preflight(config)
    if problems:
        raise ConfigError(problems, "inputs")


@dataclass(frozen=True)
class LayerSummary:
    index: int
    attention_type: str
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int


@dataclass(frozen=True)
class ParentSummary:
    source: str
    model_type: str
    parameters: int
    layers: list[LayerSummary]
    validation_loss: float
    validation_perplexity: float
    validation_tokens: int

    @classmethod
    def from_json(cls, data: dict) -> ParentSummary:
        return cls(**{**data, "layers": [LayerSummary(**layer) for layer in data["layers"]]})


@torch.no_grad()
def next_token_loss(logits_of, blocks: torch.Tensor, batch_size: int, device=None) -> tuple[float, int]:
    """Mean next-token cross-entropy over every predicted position of `blocks`, and the count of them."""
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        x = blocks[i : i + batch_size].to(device or blocks.device)
        logits = logits_of(x)[:, :-1].float()
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += x[:, 1:].numel()
    return total / count, count


def validation_loss(adapter, blocks: torch.Tensor, batch_size: int) -> tuple[float, int]:
    """`next_token_loss` of the model behind `adapter`, run layer by layer."""
    return next_token_loss(adapter.logits, blocks, batch_size, next(adapter.model.parameters()).device)


def parent_stage(config: PuzzleConfig) -> ParentSummary:
    """Load the parent through its family adapter and measure it on the held-out text."""
    run = RunDir.of(config)
    key = fingerprint(config, ("parent", "data", "eval"))
    summary_file = run.stage_dir(Stage.parent) / "summary.json"
    if run.is_done(Stage.parent, key):
        return ParentSummary.from_json(json.loads(summary_file.read_text()))
    with run.stage(Stage.parent, key) as record:
        parent = load_parent(config.parent)
        blocks = job_blocks(config.data, parent.tokenizer)
        loss, tokens = validation_loss(
            parent.adapter, blocks.validation[: config.eval.validation_blocks], config.eval.batch_size
        )
        cfg = parent.model.config
        summary = ParentSummary(
            source=parent.source,
            model_type=cfg.model_type,
            parameters=sum(p.numel() for p in parent.model.parameters()),
            layers=[
                LayerSummary(
                    index=i,
                    attention_type=parent.adapter.layer(i).attention_type.value,
                    num_attention_heads=cfg.num_attention_heads,
                    num_key_value_heads=cfg.num_key_value_heads,
                    intermediate_size=cfg.intermediate_size,
                )
                for i in range(parent.adapter.num_layers)
            ],
            validation_loss=loss,
            validation_perplexity=math.exp(loss),
            validation_tokens=tokens,
        )
        atomic_write_json(summary_file, asdict(summary))
        record.outputs = {"summary": "summary.json", "data_fingerprint": blocks.fingerprint}
    return summary
