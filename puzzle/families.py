"""One adapter over the decoder families: dense Llama, Mistral, Qwen2, Qwen3, MoE Mixtral, Qwen3-MoE,
GPT-OSS, and the Nemotron-H hybrids (transformers 5.x).

The adapter exposes, per layer, the attention and FFN subblocks with their norms, and builds what a
layer needs to run alone: rotary position embeddings, the causal or sliding-window mask of its
attention type, and the KV cache. An MoE layer's FFN subblock is the parent's sparse block (router
`gate` and fused `experts`; GPT-OSS: `router` and biased `experts`), exposed where a dense layer
exposes its MLP. Later stages run any layer, subblock or replacement candidate through it without
depending on a family's `forward`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.masking_utils import (
    create_causal_mask, create_recurrent_attention_mask, create_sliding_window_causal_mask,
)

from puzzle.blocks.init import ParentLayer
from puzzle.blocks.modeling_hybrid import MAMBA_CACHE
from puzzle.blocks.modeling_puzzle import CACHE
from puzzle.blocks.specs import AttentionKind, MambaShape, ParentShape
from puzzle.errors import PuzzleError
from puzzle.sharding import gathered


class AttentionType(str, enum.Enum):
    full = "full_attention"
    sliding = "sliding_attention"
    recurrent = "linear_attention"  # a Mamba layer's: the padding mask only


def _uniform_types(config: PretrainedConfig) -> list[AttentionType]:
    return [AttentionType.full] * config.num_hidden_layers


def _mistral_types(config: PretrainedConfig) -> list[AttentionType]:
    kind = AttentionType.sliding if getattr(config, "sliding_window", None) else AttentionType.full
    return [kind] * config.num_hidden_layers


def _declared_types(config: PretrainedConfig) -> list[AttentionType]:
    """Qwen2/Qwen3 declare each layer's attention in `layer_types`."""
    return [AttentionType(t) for t in config.layer_types[: config.num_hidden_layers]]


@dataclass(frozen=True)
class ExpertLayout:
    """An MoE layer's routed experts, as its config describes them."""

    num_experts: int
    experts_per_token: int
    intermediate_size: int  # of each expert
    normalize_expert_weights: bool
    bias: bool = False  # router and expert biases
    swiglu_limit: float | None = None  # clamped activation


def _dense(config: PretrainedConfig) -> list[ExpertLayout | None]:
    return [None] * config.num_hidden_layers


def _mixtral_experts(config: PretrainedConfig) -> list[ExpertLayout | None]:
    layout = ExpertLayout(config.num_local_experts, config.num_experts_per_tok, config.intermediate_size, True)
    return [layout] * config.num_hidden_layers


def _qwen3_moe_experts(config: PretrainedConfig) -> list[ExpertLayout | None]:
    """Qwen3-MoE layers are sparse every `decoder_sparse_step` layers, except the dense `mlp_only_layers`."""
    layout = ExpertLayout(config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size,
                          config.norm_topk_prob)
    return [
        layout if i not in config.mlp_only_layers and config.num_experts > 0 and (i + 1) % config.decoder_sparse_step == 0
        else None
        for i in range(config.num_hidden_layers)
    ]


def _gpt_oss_experts(config: PretrainedConfig) -> list[ExpertLayout | None]:
    """Every GPT-OSS layer is sparse; its softmax over the top-k logits equals renormalized top-k probabilities."""
    layout = ExpertLayout(
        config.num_local_experts, config.num_experts_per_tok, config.intermediate_size, True, bias=True,
        swiglu_limit=config.swiglu_limit,
    )
    return [layout] * config.num_hidden_layers


def _nemotron_h_experts(config: PretrainedConfig) -> list[ExpertLayout | None]:
    layout = ExpertLayout(config.n_routed_experts, config.num_experts_per_tok, config.moe_intermediate_size,
                          config.norm_topk_prob)
    return [layout if t == "moe" else None for t in hybrid_mixers(config)]


def hybrid_mixers(config: PretrainedConfig) -> list[str]:
    """A Nemotron-H parent's mixer per layer: mamba, attention, mlp or moe."""
    unknown = sorted({t for t in config.layers_block_type if t not in HYBRID_MIXERS})
    if unknown:
        raise PuzzleError(f"parent.path: layers_block_type names layer types {unknown} that puzzle does not know; it "
                          f"knows {', '.join(sorted(HYBRID_MIXERS))}")
    return [HYBRID_MIXERS[t] for t in config.layers_block_type]


def _configured_bias(config: PretrainedConfig) -> tuple[bool, bool]:
    """(q/k/v bias, o bias): `attention_bias` puts a bias on all four projections, or on none."""
    bias = bool(getattr(config, "attention_bias", False))
    return bias, bias


def _qwen2_bias(config: PretrainedConfig) -> tuple[bool, bool]:
    return True, False


@dataclass(frozen=True)
class Family:
    model_type: str
    layer_types: Callable[[PretrainedConfig], list[AttentionType]]
    experts: Callable[[PretrainedConfig], list[ExpertLayout | None]] = _dense
    attention_bias: Callable[[PretrainedConfig], tuple[bool, bool]] = _configured_bias
    qk_norm: bool = False
    attention_sinks: bool = False
    # Transformers runs GPT-OSS eagerly only: sdpa's softmax cannot take its sinks.
    sdpa: bool = True
    # GPT-OSS's rotary embedding gives cos/sin for half a head, which it applies to the two halves.
    half_rotary: bool = False
    # Nemotron-H: each layer one mixer (Mamba-2, attention, MLP or MoE) behind one norm (`HybridAdapter`).
    hybrid: bool = False


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", _uniform_types),
        Family("mistral", _mistral_types),
        Family("qwen2", _declared_types, attention_bias=_qwen2_bias),
        Family("qwen3", _declared_types, qk_norm=True),
        # Both build one mask for every layer: sliding when `sliding_window` is set, else causal.
        Family("mixtral", _mistral_types, _mixtral_experts),
        Family("qwen3_moe", _mistral_types, _qwen3_moe_experts, qk_norm=True),
        Family("gpt_oss", _declared_types, _gpt_oss_experts, attention_sinks=True, sdpa=False, half_rotary=True),
        Family("nemotron_h", _uniform_types, _nemotron_h_experts, hybrid=True),
    )
}

# Nemotron-H's layer types, in transformers 5.x's words and the older ones its configs may still carry.
HYBRID_MIXERS = {"linear_attention": "mamba", "mamba": "mamba", "full_attention": "attention",
                 "attention": "attention", "mlp": "mlp", "moe": "moe"}


def family_for(model_type: str) -> Family:
    family = FAMILIES.get(model_type)
    if family is None:
        raise PuzzleError(
            f"parent.path: model_type '{model_type}' is not supported; supported: {', '.join(sorted(FAMILIES))}"
        )
    return family


def is_dense(model_type: str) -> bool:
    """A family without MoE layers, whose checkpoint names match its modules one to one."""
    return family_for(model_type).experts is _dense


def parent_shapes(config: PretrainedConfig) -> list[ParentShape]:
    """Every layer's sizes, from the config alone (no weights needed)."""
    family = family_for(config.model_type)
    if family.hybrid:
        return _hybrid_shapes(config)
    attention_bias, attention_output_bias = family.attention_bias(config)
    shapes = []
    for kind, experts in zip(family.layer_types(config), family.experts(config)):
        shape = ParentShape(
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            intermediate_size=config.intermediate_size,
            window=config.sliding_window if kind is AttentionType.sliding else None,
            attention_bias=attention_bias,
            attention_output_bias=attention_output_bias,
            qk_norm=family.qk_norm,
            attention_sinks=family.attention_sinks,
        )
        if experts is not None:
            shape = replace(
                shape, intermediate_size=experts.intermediate_size, num_experts=experts.num_experts,
                experts_per_token=experts.experts_per_token, normalize_expert_weights=experts.normalize_expert_weights,
                expert_bias=experts.bias, swiglu_limit=experts.swiglu_limit,
            )
        shapes.append(shape)
    return shapes


def _hybrid_shapes(config: PretrainedConfig) -> list[ParentShape]:
    """A Nemotron-H layer as a pair of slots, one of them empty: Mamba or attention (no RoPE) in the attention
    slot, an MLP or MoE in the FFN slot."""
    mamba = MambaShape(config.mamba_num_heads, config.mamba_head_dim, config.n_groups, config.ssm_state_size,
                       config.conv_kernel, conv_bias=config.use_conv_bias, projection_bias=config.use_bias)
    base = ParentShape(
        hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        intermediate_size=config.intermediate_size, rotary=False,
    )
    shapes = []
    for mixer, experts in zip(hybrid_mixers(config), _nemotron_h_experts(config)):
        if mixer == "mamba":
            shapes.append(replace(base, mixer=AttentionKind.mamba, mamba=mamba, has_ffn=False))
        elif mixer == "attention":
            shapes.append(replace(base, has_ffn=False))
        elif mixer == "mlp":
            shapes.append(replace(base, mixer=AttentionKind.noop))
        else:
            shapes.append(replace(base, mixer=AttentionKind.noop, intermediate_size=experts.intermediate_size,
                                  num_experts=experts.num_experts, experts_per_token=experts.experts_per_token,
                                  normalize_expert_weights=experts.normalize_expert_weights))
    return shapes


@dataclass(frozen=True)
class LayerParts:
    """The pieces of decoder layer `index`, as the parent holds them."""

    index: int
    attention: nn.Module | None  # None: a hybrid layer without a token mixer
    ffn: nn.Module | None  # None: a hybrid layer without an FFN
    input_norm: nn.Module | None
    post_attention_norm: nn.Module | None
    attention_type: AttentionType
    sliding_window: int | None


@dataclass(frozen=True)
class LayerContext:
    """Everything but the hidden states that a layer needs for one forward pass."""

    position_ids: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # the parent's own, for the parent's attention
    candidate_position_embeddings: tuple[torch.Tensor, torch.Tensor]  # for the project's Attention (`rotary`)
    masks: dict[AttentionType, torch.Tensor | None]
    cache: Cache | None


class FamilyAdapter:
    """Runs a parent layer by layer, or subblock by subblock."""

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.config = model.config
        self.family = family_for(self.config.model_type)
        self.attention_types = self.family.layer_types(self.config)
        self.shapes = parent_shapes(self.config)
        self._backbone = model.model

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def device(self) -> torch.device:
        """Where the parent computes (the rotary frequencies are always real, whatever the parent holds)."""
        return self._backbone.rotary_emb.inv_freq.device

    def layer(self, index: int) -> LayerParts:
        decoder = self._backbone.layers[index]
        kind = self.attention_types[index]
        return LayerParts(
            index=index,
            attention=decoder.self_attn,
            ffn=decoder.mlp,
            input_norm=decoder.input_layernorm,
            post_attention_norm=decoder.post_attention_layernorm,
            attention_type=kind,
            sliding_window=self.config.sliding_window if kind is AttentionType.sliding else None,
        )

    def shape(self, index: int) -> ParentShape:
        return self.shapes[index]

    def parent_layer(self, index: int) -> ParentLayer:
        """The layer as `blocks.init` reads it to initialize candidates."""
        parts = self.layer(index)
        return ParentLayer(
            attention=parts.attention,
            ffn=parts.ffn,
            input_norm=parts.input_norm,
            post_attention_norm=parts.post_attention_norm,
            shape=self.shape(index),
            rms_norm_eps=self.config.rms_norm_eps,
        )

    def outer_modules(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        """The embeddings, the final norm and the head: what runs outside the layers."""
        return self._backbone.embed_tokens, self._backbone.norm, self.model.lm_head

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # A parent sharded by FSDP2 (puzzle.sharding): the embeddings are a unit of their own, or in the root's.
        with gathered(self.model, self._backbone.embed_tokens):
            return self._backbone.embed_tokens(input_ids)

    def context(
        self,
        hidden: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> LayerContext:
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(hidden.shape[1], device=hidden.device) + past).unsqueeze(0)
        mask_kwargs = {"config": self.config, "inputs_embeds": hidden, "attention_mask": attention_mask, CACHE: cache,
                       "position_ids": position_ids}
        masks: dict[AttentionType, torch.Tensor | None] = {}
        if AttentionType.full in self.attention_types:
            masks[AttentionType.full] = create_causal_mask(**mask_kwargs)
        if AttentionType.sliding in self.attention_types:
            masks[AttentionType.sliding] = create_sliding_window_causal_mask(**mask_kwargs)
        position_embeddings = self._backbone.rotary_emb(hidden, position_ids=position_ids)
        return LayerContext(
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            candidate_position_embeddings=self._rotate_half_form(position_embeddings),
            masks=masks,
            cache=cache,
        )

    def _rotate_half_form(self, position_embeddings: tuple[torch.Tensor, torch.Tensor]):
        if not self.family.half_rotary:
            return position_embeddings
        # x·cos + rotate_half(x)·sin with each half's cos/sin repeated is GPT-OSS's rotation of the two halves.
        return tuple(torch.cat([t, t], dim=-1) for t in position_embeddings)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary cos/sin at these positions in the form the project's Attention (every candidate, the child) takes."""
        return self._rotate_half_form(self._backbone.rotary_emb(hidden, position_ids=position_ids))

    def attention_delta(self, index: int, hidden: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """What the attention subblock adds to the residual stream (pre-norm included)."""
        parts = self.layer(index)
        out, _ = parts.attention(
            hidden_states=parts.input_norm(hidden),
            position_embeddings=ctx.position_embeddings,
            attention_mask=ctx.masks[parts.attention_type],
            position_ids=ctx.position_ids,
            **{CACHE: ctx.cache},
        )
        return out

    def ffn_delta(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """What the FFN subblock adds to the residual stream (pre-norm included)."""
        parts = self.layer(index)
        out = parts.ffn(parts.post_attention_norm(hidden))
        # GPT-OSS's MLP also returns its router scores, which only its auxiliary loss reads.
        return out[0] if isinstance(out, tuple) else out

    def run_layer(self, index: int, hidden: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        hidden = hidden + self.attention_delta(index, hidden, ctx)
        return hidden + self.ffn_delta(index, hidden)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        with gathered(self.model, self.model.lm_head):
            return self.model.lm_head(self._backbone.norm(hidden))

    def hidden_states(self, input_ids: torch.Tensor, ctx: LayerContext | None = None) -> list[torch.Tensor]:
        """Residual stream entering each layer, then the output of the last one (L + 1 tensors)."""
        hidden = self.embed(input_ids)
        ctx = ctx or self.context(hidden)
        states = [hidden]
        for i in range(self.num_layers):
            with gathered(self._backbone.layers[i]):  # the parts are called apart: FSDP2's hooks do not see them
                hidden = self.run_layer(i, hidden, ctx)
            states.append(hidden)
        return states

    def states_and_logits(self, input_ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """`hidden_states` and the logits of the last one: the teacher's side of KD (`distill.kd.ParentStates`)."""
        states = self.hidden_states(input_ids.to(self.device))
        return states, self.head(states[-1])

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden_states(input_ids)[-1])


class HybridAdapter(FamilyAdapter):
    """A Nemotron-H parent, whose layers each hold one mixer behind one norm: Mamba-2 or attention (no position
    embeddings) as the layer's attention subblock, an MLP or MoE as its FFN subblock, the other slot empty.
    The norm is the pre-norm of whichever subblock the layer has."""

    def __init__(self, model: PreTrainedModel):
        super().__init__(model)
        self.mixers = hybrid_mixers(self.config)

    @property
    def device(self) -> torch.device:
        return self._backbone.norm_f.weight.device

    def layer(self, index: int) -> LayerParts:
        block = self._backbone.layers[index]
        token_mixer = self.mixers[index] in ("mamba", "attention")
        return LayerParts(
            index=index,
            attention=block.mixer if token_mixer else None,
            ffn=None if token_mixer else block.mixer,
            input_norm=block.norm if token_mixer else None,
            post_attention_norm=None if token_mixer else block.norm,
            attention_type=AttentionType.full,
            sliding_window=None,
        )

    def parent_layer(self, index: int) -> ParentLayer:
        parts = self.layer(index)
        return ParentLayer(attention=parts.attention, ffn=parts.ffn, input_norm=parts.input_norm,
                           post_attention_norm=parts.post_attention_norm, shape=self.shape(index),
                           rms_norm_eps=self.config.layer_norm_epsilon, config=self.config)

    def outer_modules(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return self._backbone.embeddings, self._backbone.norm_f, self.model.lm_head

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        with gathered(self.model, self._backbone.embeddings):
            return self._backbone.embeddings(input_ids)

    def context(self, hidden: torch.Tensor, *, attention_mask: torch.Tensor | None = None, cache: Cache | None = None,
                position_ids: torch.Tensor | None = None) -> LayerContext:
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(hidden.shape[1], device=hidden.device) + past).unsqueeze(0)
        mask_kwargs = {"config": self.config, "inputs_embeds": hidden, "attention_mask": attention_mask, CACHE: cache,
                       "position_ids": position_ids}
        return LayerContext(
            position_ids=position_ids, position_embeddings=None, candidate_position_embeddings=None,
            masks={AttentionType.full: create_causal_mask(**mask_kwargs),
                   AttentionType.recurrent: create_recurrent_attention_mask(**mask_kwargs)},
            cache=cache,
        )

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> None:
        return None

    def attention_delta(self, index: int, hidden: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """What the layer's token mixer adds (nothing for an MLP or MoE layer)."""
        parts = self.layer(index)
        if parts.attention is None:
            return torch.zeros_like(hidden)
        x = parts.input_norm(hidden.to(parts.input_norm.weight.dtype))
        if self.mixers[index] == "mamba":
            return parts.attention(x, attention_mask=ctx.masks[AttentionType.recurrent], **{MAMBA_CACHE: ctx.cache})
        out, _ = parts.attention(hidden_states=x, attention_mask=ctx.masks[AttentionType.full],
                                 position_ids=ctx.position_ids, **{CACHE: ctx.cache})
        return out

    def ffn_delta(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """What the layer's MLP or MoE adds (nothing for a Mamba or attention layer)."""
        parts = self.layer(index)
        if parts.ffn is None:
            return torch.zeros_like(hidden)
        return parts.ffn(parts.post_attention_norm(hidden.to(parts.post_attention_norm.weight.dtype)))

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._backbone.norm_f(hidden)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        with gathered(self.model, self.model.lm_head):
            return self.model.lm_head(self.final_norm(hidden))


def family_adapter(model: PreTrainedModel) -> FamilyAdapter:
    """The adapter of `model`'s family."""
    return HybridAdapter(model) if family_for(model.config.model_type).hybrid else FamilyAdapter(model)
