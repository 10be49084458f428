"""The parent stage: the parent loaded through its family adapter and measured on the held-out text."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from puzzle.io import atomic_write_json, read_json
from puzzle.data import job_blocks
from puzzle.distill.metrics import next_token_loss, perplexity
from puzzle.distributed import Workers
from puzzle.parents import load_parent
from puzzle.pipeline import StageContext
from puzzle.sharding import held_bytes


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


def validation_loss(adapter, blocks, batch_size: int, rank: int = 0, world: int = 1) -> tuple[float, int]:
    """Mean next-token loss of the model behind `adapter`, run layer by layer, and the tokens it covers; over
    `world` ranks, each taking its share of the blocks."""
    return next_token_loss(adapter.logits, blocks, batch_size, adapter.device, rank, world)


def run(ctx: StageContext, team: Workers) -> ParentSummary | None:
    """On several processes the parent is sharded over them by FSDP2 (read a layer at a time) where its
    weights can be read by key, and each process measures its share of the held-out blocks."""
    config = ctx.config
    parent = load_parent(config.parent, sharded=team.world > 1)
    blocks = job_blocks(config, parent.tokenizer)
    loss, tokens = validation_loss(parent.adapter, blocks.validation[: config.eval.validation_blocks],
                                   config.eval.batch_size, team.rank, team.world)
    held = team.gather(held_bytes(parent.model))
    if not team.is_main:
        return None
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
        validation_perplexity=perplexity(loss),
        validation_tokens=tokens,
    )
    atomic_write_json(ctx.directory / "summary.json", asdict(summary))
    ctx.record.outputs = {"summary": "summary.json", "data_fingerprint": blocks.fingerprint, "processes": team.world,
                          "parent_sharded": parent.sharded, "parent_bytes_per_rank": held}
    return summary


def read(ctx: StageContext) -> ParentSummary:
    return ParentSummary.from_json(read_json(ctx.directory / "summary.json"))
