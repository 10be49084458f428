"""Candidate specs: small frozen typed descriptions of what a layer's attention or FFN can become.

A spec says nothing about weights; `blocks.init` builds a module for a spec from the parent layer.
Every spec has a stable `id` used in file names, tables and configs (`attention.kv1`,
`attention.window64`, `ffn.i256`, `ffn.moe4.top2`, …).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class AttentionKind(str, enum.Enum):
    """The token mixer of a layer (its "attention" subblock)."""

    attention = "attention"  # softmax attention: the parent's, fewer KV heads, or a window
    mamba = "mamba"  # a Mamba-2 mixer of a hybrid parent: the parent's heads, or fewer
    linear = "linear"  # one hidden×hidden Linear: each token attends to itself only
    noop = "noop"  # removed, together with its pre-norm


class FfnKind(str, enum.Enum):
    dense = "dense"  # gated FFN of some intermediate size (the parent's, or pruned)
    moe = "moe"  # routed experts of an MoE parent layer: all of them, or the k most important
    linear = "linear"  # one hidden×hidden Linear
    noop = "noop"  # removed, together with its pre-norm


@dataclass(frozen=True, order=True)
class AttentionSpec:
    kind: AttentionKind
    num_key_value_heads: int | None = None
    window: int | None = None  # None: full causal attention
    mamba_num_heads: int | None = None

    def __post_init__(self):
        softmax = self.kind is AttentionKind.attention
        if softmax != (self.num_key_value_heads is not None):
            raise ValueError("num_key_value_heads is set exactly for softmax attention")
        if self.window is not None and (not softmax or self.window <= 0):
            raise ValueError("window must be a positive width of softmax attention")
        mamba = self.kind is AttentionKind.mamba
        if mamba != (self.mamba_num_heads is not None) or (mamba and self.mamba_num_heads <= 0):
            raise ValueError("mamba_num_heads is set exactly for a Mamba mixer, and positive")

    @property
    def id(self) -> str:
        if self.kind is AttentionKind.mamba:
            return f"attention.mamba{self.mamba_num_heads}"
        if self.kind is not AttentionKind.attention:
            return f"attention.{self.kind.value}"
        suffix = f".window{self.window}" if self.window is not None else ""
        return f"attention.kv{self.num_key_value_heads}{suffix}"

    @property
    def removed(self) -> bool:
        return self.kind is AttentionKind.noop

    @property
    def linear(self) -> bool:
        return self.kind is AttentionKind.linear


@dataclass(frozen=True, order=True)
class FfnSpec:
    """An FFN candidate; an MoE one keeps `num_experts` experts and routes each token to `experts_per_token`.

    An expert's intermediate size is not part of the spec: experts keep the parent layer's
    (`ParentShape.intermediate_size`), as attention keeps the parent's head size.
    """

    kind: FfnKind
    intermediate_size: int | None = None
    num_experts: int | None = None
    experts_per_token: int | None = None

    def __post_init__(self):
        dense, moe = self.kind is FfnKind.dense, self.kind is FfnKind.moe
        if dense != (self.intermediate_size is not None):
            raise ValueError("intermediate_size is set exactly for a dense FFN")
        if dense and self.intermediate_size <= 0:
            raise ValueError("intermediate_size must be positive")
        if moe != (self.num_experts is not None) or moe != (self.experts_per_token is not None):
            raise ValueError("num_experts and experts_per_token are set exactly for an MoE FFN")
        if moe and not 0 < self.experts_per_token <= self.num_experts:
            raise ValueError("an MoE FFN routes each token to between 1 and num_experts experts")

    @property
    def id(self) -> str:
        if self.kind is FfnKind.dense:
            return f"ffn.i{self.intermediate_size}"
        if self.kind is FfnKind.moe:
            return f"ffn.moe{self.num_experts}.top{self.experts_per_token}"
        return f"ffn.{self.kind.value}"

    @property
    def experts(self) -> int:
        """Experts held in memory (0 for a dense, linear or removed FFN)."""
        return self.num_experts if self.kind is FfnKind.moe else 0

    @property
    def removed(self) -> bool:
        return self.kind is FfnKind.noop

    @property
    def linear(self) -> bool:
        return self.kind is FfnKind.linear


SubblockSpec = AttentionSpec | FfnSpec


@dataclass(frozen=True)
class MambaShape:
    """A hybrid parent's Mamba-2 mixer: heads of `head_dim` channels, B and C shared by groups of heads."""

    num_heads: int
    head_dim: int
    groups: int
    state_size: int  # per head channel
    conv_kernel: int
    conv_bias: bool = True
    projection_bias: bool = False  # on in_proj and out_proj


@dataclass(frozen=True)
class ParentShape:
    """What the specs of a layer are measured against: the parent layer's own sizes, and the parts its family
    adds to every candidate of that layer (biases, norms, sinks), which the costs count and a child records."""

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int  # of the dense FFN, or of each expert in an MoE layer
    window: int | None = None  # the parent layer's own sliding window, if any
    num_experts: int | None = None  # None: a dense FFN layer
    experts_per_token: int | None = None
    normalize_expert_weights: bool = True  # top-k routing weights renormalized to sum to 1 (Mixtral; Qwen3-MoE's norm_topk_prob)
    attention_bias: bool = False  # on q, k and v (Qwen2; Llama's, Qwen3's and GPT-OSS's attention_bias)
    attention_output_bias: bool = False  # on o (Llama's, Qwen3's and GPT-OSS's attention_bias; not Qwen2)
    qk_norm: bool = False  # per-head RMS norms of q and k (Qwen3)
    attention_sinks: bool = False  # a learned softmax sink logit per query head (GPT-OSS)
    expert_bias: bool = False  # biases on the router and on each expert's projections (GPT-OSS)
    swiglu_limit: float | None = None  # GPT-OSS's clamped expert activation; None: plain SwiGLU
    swiglu_alpha: float = 1.702  # its sigmoid's slope
    # A hybrid parent's layer holds one mixer: softmax attention or Mamba-2 in the attention slot, or an FFN alone.
    mixer: AttentionKind = AttentionKind.attention  # noop: an FFN-only layer
    has_ffn: bool = True
    mamba: MambaShape | None = None  # with mixer mamba
    rotary: bool = True  # False: attention without position embeddings (Nemotron-H)

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def hybrid(self) -> bool:
        """A layer of a hybrid parent: one of its two slots is empty."""
        return self.mixer is not AttentionKind.attention or not self.has_ffn

    @property
    def attention(self) -> AttentionSpec:
        if self.mixer is AttentionKind.mamba:
            return AttentionSpec(AttentionKind.mamba, mamba_num_heads=self.mamba.num_heads)
        if self.mixer is not AttentionKind.attention:
            return AttentionSpec(self.mixer)
        return AttentionSpec(AttentionKind.attention, self.num_key_value_heads, self.window)

    @property
    def ffn(self) -> FfnSpec:
        if not self.has_ffn:
            return FfnSpec(FfnKind.noop)
        if self.is_moe:
            return FfnSpec(FfnKind.moe, num_experts=self.num_experts, experts_per_token=self.experts_per_token)
        return FfnSpec(FfnKind.dense, self.intermediate_size)


@dataclass(frozen=True)
class BlockChoice:
    """What one layer of a child is: an attention spec, an FFN spec, and whether the two were trained as a
    pair (a coupled library entry) or apart. Travels typed from the search to solutions.json, realize, eval
    and the report (docs/design.md §2)."""

    attention: AttentionSpec
    ffn: FfnSpec
    coupled: bool = False

    def __post_init__(self):
        if not (isinstance(self.attention, AttentionSpec) and isinstance(self.ffn, FfnSpec)):
            raise ValueError("a block is an attention spec and an FFN spec")

    @property
    def id(self) -> str:
        """`attention.kv1+ffn.i256`: the pair, without the coupled flag."""
        return f"{self.attention.id}+{self.ffn.id}"

    def __str__(self) -> str:
        return self.id + (" (coupled)" if self.coupled else "")

    @classmethod
    def from_id(cls, text: str, coupled: bool = False) -> BlockChoice:
        """Inverse of `.id`: 'attention.kv1+ffn.i256'."""
        attention, sep, ffn = text.partition("+")
        if not sep:
            raise ValueError(f"{text!r} is not a block (expected 'attention.…+ffn.…', e.g. attention.kv1+ffn.i256)")
        a, f = spec_from_id(attention.strip()), spec_from_id(ffn.strip())
        if not (isinstance(a, AttentionSpec) and isinstance(f, FfnSpec)):
            raise ValueError(f"{text!r} is not a block (expected 'attention.…+ffn.…', e.g. attention.kv1+ffn.i256)")
        return cls(a, f, coupled)

    def to_json(self) -> dict:
        return {"attention": self.attention.id, "ffn": self.ffn.id, "coupled": self.coupled}

    @classmethod
    def from_json(cls, data: dict) -> BlockChoice:
        return cls(spec_from_id(data["attention"]), spec_from_id(data["ffn"]), bool(data["coupled"]))


def is_parent(spec: SubblockSpec, shape: ParentShape) -> bool:
    return spec == (shape.attention if isinstance(spec, AttentionSpec) else shape.ffn)


def needs_training(spec: SubblockSpec, shape: ParentShape) -> bool:
    """The parent's own subblock and a removed one have nothing to learn."""
    return not is_parent(spec, shape) and not spec.removed


def spec_from_id(text: str) -> SubblockSpec:
    """Inverse of `.id`, for specs named in configs and files."""
    group, _, rest = text.partition(".")
    parts = rest.split(".")
    try:
        if group == "attention":
            if parts == ["linear"]:
                return AttentionSpec(AttentionKind.linear)
            if parts == ["noop"]:
                return AttentionSpec(AttentionKind.noop)
            if len(parts) == 1 and parts[0].startswith("mamba"):
                return AttentionSpec(AttentionKind.mamba, mamba_num_heads=int(parts[0][5:]))
            if parts[0].startswith("kv") and len(parts) <= 2:
                window = int(parts[1].removeprefix("window")) if len(parts) == 2 and parts[1].startswith("window") else None
                if len(parts) == 2 and window is None:
                    raise ValueError
                return AttentionSpec(AttentionKind.attention, int(parts[0][2:]), window)
        if group == "ffn":
            if parts == ["linear"]:
                return FfnSpec(FfnKind.linear)
            if parts == ["noop"]:
                return FfnSpec(FfnKind.noop)
            if len(parts) == 1 and parts[0].startswith("i"):
                return FfnSpec(FfnKind.dense, int(parts[0][1:]))
            if len(parts) == 2 and parts[0].startswith("moe") and parts[1].startswith("top"):
                return FfnSpec(FfnKind.moe, num_experts=int(parts[0][3:]), experts_per_token=int(parts[1][3:]))
    except ValueError:
        pass
    raise ValueError(
        f"{text!r} is not a candidate id (examples: attention.kv2, attention.kv2.window64, attention.mamba8, ffn.i256, "
        "ffn.moe4.top2, ffn.noop)"
    )


class Engine(str, enum.Enum):
    """A serving engine a child may be searched for (`target.engine`; the rules are `puzzle.engines`')."""

    transformers = "transformers"
    vllm = "vllm"
    llama_cpp = "llama.cpp"
