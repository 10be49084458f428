"""The search space of one layer: which attention and FFN candidates a run considers."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from puzzle.errors import PuzzleError
from puzzle.blocks.specs import AttentionKind, AttentionSpec, FfnKind, FfnSpec, ParentShape


PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]


class SpaceOptions(BaseModel):
    """The candidates every layer offers: the job config's `library` section, defined once here (and
    validated when the config loads) so that `blocks` needs nothing from the config module."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)

    kv_heads: list[PositiveInt] | Literal["divisors"] = Field(
        "divisors", description="KV-head counts for GQA candidates: a list, or every divisor of the parent's count."
    )
    windows: list[PositiveInt] = Field(default_factory=lambda: [64, 128], description="Window widths for window attention.")
    linear_attention: bool = Field(True, description="Include attention replaced by one hidden×hidden Linear.")
    noop_attention: bool = Field(True, description="Include removing attention.")
    ffn_fractions: list[Fraction] = Field(
        default_factory=lambda: [0.875, 0.75, 0.5, 0.25, 0.1],
        description="Pruned FFN sizes as fractions of the parent's intermediate size, in (0, 1].",
    )
    ffn_sizes: list[PositiveInt] = Field(default_factory=list, description="Pruned FFN sizes given exactly.")
    ffn_grid: int | None = Field(
        None, ge=1, description="Round pruned FFN sizes up to this multiple (256 = what serving engines accept)."
    )
    linear_ffn: bool = Field(True, description="Include FFN replaced by one hidden×hidden Linear.")
    noop_ffn: bool = Field(True, description="Include removing the FFN.")
    experts: list[PositiveInt] = Field(
        default_factory=list,
        description="MoE parents: numbers of experts k to keep per layer (the k most important; from the parent's "
        "experts per token up to its expert count).",
    )
    experts_per_token: list[PositiveInt] = Field(
        default_factory=list,
        description="MoE parents: fewer experts each token is routed to (top-k), from 1 up to the parent's; offered "
        "with every number of experts kept that is at least as large.",
    )
    mamba_fractions: list[Fraction] = Field(
        default_factory=lambda: [0.75, 0.5],
        description="Hybrid parents: Mamba heads kept, as fractions of the parent's, rounded up to a multiple of its "
        "B/C groups.",
    )
    expert_importance: Literal["routed", "masking"] = Field(
        "routed",
        description="How experts are ranked: routed = mean gate weight × ‖expert output‖; masking = output damage "
        "when the expert is masked and its tokens re-routed.",
    )


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def attention_candidates(shape: ParentShape, options: SpaceOptions) -> list[AttentionSpec]:
    """The parent's attention first, then every variant, without duplicates. A hybrid layer keeps its kind of
    mixer (no linear attention: its Mamba layers already mix tokens cheaply), and has no attention to offer
    when it is an FFN layer."""
    if shape.mixer is AttentionKind.noop:
        return [shape.attention]
    if shape.mixer is AttentionKind.mamba:
        groups, heads = shape.mamba.groups, shape.mamba.num_heads
        counts = {min(heads, groups * math.ceil(f * heads / groups)) for f in options.mamba_fractions}
        specs = [shape.attention] + [AttentionSpec(AttentionKind.mamba, mamba_num_heads=n) for n in sorted(counts, reverse=True)]
        return list(dict.fromkeys(specs + ([AttentionSpec(AttentionKind.noop)] if options.noop_attention else [])))
    divisor_counts = options.kv_heads == "divisors"
    kv_counts = divisors(shape.num_key_value_heads) if divisor_counts else list(options.kv_heads)
    for kv in kv_counts:
        if shape.num_key_value_heads % kv:
            raise PuzzleError(
                f"library.kv_heads: {kv} does not divide the parent's {shape.num_key_value_heads} KV heads; "
                f"use divisors of it: {divisors(shape.num_key_value_heads)}"
            )
    specs = [shape.attention]
    specs += [AttentionSpec(AttentionKind.attention, kv, shape.window) for kv in sorted(kv_counts, reverse=True)]
    specs += [
        AttentionSpec(AttentionKind.attention, shape.num_key_value_heads, w)
        for w in sorted(options.windows)
        if shape.window is None or w < shape.window
    ]
    if options.linear_attention and not shape.hybrid:
        specs.append(AttentionSpec(AttentionKind.linear))
    if options.noop_attention:
        specs.append(AttentionSpec(AttentionKind.noop))
    return list(dict.fromkeys(specs))


def pruned_size(fraction: float, intermediate_size: int, grid: int | None) -> int:
    size = max(1, round(fraction * intermediate_size))
    if grid is not None:
        size = min(intermediate_size, grid * math.ceil(size / grid))
    return size


def ffn_candidates(shape: ParentShape, options: SpaceOptions) -> list[FfnSpec]:
    """The parent's FFN first, then pruned sizes (largest first), linear and no-op (a hybrid layer has no FFN
    at all where it has a token mixer)."""
    if not shape.has_ffn:
        return [shape.ffn]
    if shape.is_moe:
        return moe_candidates(shape, options)
    sizes = [pruned_size(f, shape.intermediate_size, options.ffn_grid) for f in options.ffn_fractions]
    for size in options.ffn_sizes:
        if size > shape.intermediate_size:
            raise PuzzleError(
                f"library.ffn_sizes: {size} is outside 1..{shape.intermediate_size} (the parent's intermediate size)"
            )
        if options.ffn_grid is not None and size % options.ffn_grid:
            raise PuzzleError(f"library.ffn_sizes: {size} is not on the grid of {options.ffn_grid} (library.ffn_grid)")
        sizes.append(size)
    specs = [shape.ffn] + [FfnSpec(FfnKind.dense, s) for s in sorted(set(sizes), reverse=True)]
    if options.linear_ffn:
        specs.append(FfnSpec(FfnKind.linear))
    if options.noop_ffn:
        specs.append(FfnSpec(FfnKind.noop))
    return list(dict.fromkeys(specs))


def moe_candidates(shape: ParentShape, options: SpaceOptions) -> list[FfnSpec]:
    """An MoE layer's FFN options: all its experts, the k most important (most first), each also routing every
    token to fewer experts (`experts_per_token`), and no-op.

    Dense-FFN options do not apply: no linear FFN (it has no training-free init from routed experts)
    and no pruned widths (pruning inside experts is not offered).
    """
    top, total = shape.experts_per_token, shape.num_experts
    for k in options.experts:
        if not top <= k <= total:
            raise PuzzleError(
                f"library.experts: {k} is outside {top}..{total} (at least the {top} experts each token is routed "
                f"to, at most the parent's {total} experts)"
            )
    for t in options.experts_per_token:
        if t > top:
            raise PuzzleError(f"library.experts_per_token: {t} is more than the parent's {top} experts per token; "
                              f"use 1..{top}")
    counts = sorted({total, *options.experts}, reverse=True)
    tops = sorted({top, *options.experts_per_token}, reverse=True)
    specs = [shape.ffn] + [FfnSpec(FfnKind.moe, num_experts=k, experts_per_token=t) for k in counts for t in tops]
    if options.noop_ffn:
        specs.append(FfnSpec(FfnKind.noop))
    return list(dict.fromkeys(specs))


def check_not_empty(attention: list[AttentionSpec], ffn: list[FfnSpec]) -> None:
    if len(attention) == 1 and len(ffn) == 1:
        raise PuzzleError(
            "library: the candidate list is empty (only the parent's own subblocks); enable kv_heads, windows, "
            "ffn_fractions, ffn_sizes, experts, experts_per_token, linear or noop options"
        )
