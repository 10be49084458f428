"""Children of hybrid (Nemotron-H) parents: each layer's block as a `block_configs` entry of the Nemotron-H
Puzzle layout (`blocks.modeling_hybrid`), and its weights cut from the parent layer's mixer.

A hybrid layer is one mixer, so a block keeps one slot (the other is `noop`) or removes the layer:
- Mamba-2 with fewer heads: the same count kept in each B/C group (its gated norm normalizes per group),
  the highest-scoring in each; B, C and the convolution over them are kept whole;
- attention with fewer KV heads: K and V heads mean-pooled in consecutive groups, as for the dense families;
  window attention: the same weights, only the mask changes;
- an MLP replaced by one Linear: W = W_down · W_up, as for the dense families;
- an MLP with fewer channels, and routed experts with fewer of them (the router's rows and biases cut alike,
  the shared expert kept), the highest-scoring kept.
Scores come from calibration where the caller has them; otherwise from the weights alone (a head's or
channel's output-projection norm, an expert's).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.models.nemotron_h.modeling_nemotron_h import (
    NemotronHAttention, NemotronHMamba2Mixer, NemotronHMLP, NemotronHMoE, NemotronHRMSNorm,
)

from puzzle.blocks.heads import mean_pool_kv_heads
from puzzle.blocks.modeling_hybrid import CACHE, MAMBA_CACHE, NemotronHLinearMLP, NemotronHPuzzleConfig
from puzzle.blocks.specs import AttentionKind, AttentionSpec, BlockChoice, FfnKind, ParentShape
from puzzle.errors import PuzzleError


def _removed(choice: BlockChoice) -> bool:
    return choice.attention.removed and choice.ffn.removed


def kept_layers(choices: list[BlockChoice]) -> list[int]:
    """The parent layers that keep an entry in a hybrid child's `block_configs` (a removed layer has none)."""
    return [i for i, c in enumerate(choices) if not _removed(c)]


def hybrid_block_config(choice: BlockChoice, shape: ParentShape, layer: int) -> dict | None:
    """Layer `layer`'s `block_configs` entry (None: the layer is removed), with only the words that differ
    from the parent's, as the released layout writes them."""
    a, f = choice.attention, choice.ffn
    if _removed(choice):
        return None
    problem = f"layer {layer}: {choice.id} does not fit a hybrid layer whose block is {BlockChoice(shape.attention, shape.ffn).id}"
    if shape.mixer is AttentionKind.mamba and a.kind is AttentionKind.mamba and f.removed:
        return _entry("mamba", mamba_num_heads=(a.mamba_num_heads, shape.mamba.num_heads))
    if shape.mixer is AttentionKind.attention and a.kind is AttentionKind.attention and f.removed:
        return _entry("attention", num_key_value_heads=(a.num_key_value_heads, shape.num_key_value_heads),
                      sliding_window=(a.window, shape.window))
    if shape.has_ffn and not shape.is_moe and a.removed and f.kind is FfnKind.dense:
        return _entry("mlp", intermediate_size=(f.intermediate_size, shape.intermediate_size))
    if shape.has_ffn and not shape.is_moe and a.removed and f.kind is FfnKind.linear:
        return {"block_type": "mlp", "replace_with_linear": True}
    if shape.is_moe and a.removed and f.kind is FfnKind.moe:
        return _entry("moe", n_routed_experts=(f.num_experts, shape.num_experts),
                      num_experts_per_tok=(f.experts_per_token, shape.experts_per_token))
    raise PuzzleError(problem)


def _entry(block_type: str, **words: tuple[int | None, int | None]) -> dict:
    return {"block_type": block_type, **{word: mine for word, (mine, parent) in words.items() if mine != parent}}


def hybrid_child_config(parent_config, choices: list[BlockChoice], shapes: list[ParentShape]) -> NemotronHPuzzleConfig:
    """The child's config: the parent's global words, and one block per kept layer."""
    blocks = [hybrid_block_config(c, s, i) for i, (c, s) in enumerate(zip(choices, shapes))]
    kept = [b for b in blocks if b is not None]
    if not kept:
        raise PuzzleError("every layer of the child is removed; keep at least one")
    words = {k: v for k, v in parent_config.to_dict().items()
             if k not in ("model_type", "architectures", "layers_block_type", "auto_map", "transformers_version",
                          "num_hidden_layers", "hybrid_override_pattern")}
    config = NemotronHPuzzleConfig(**words, block_configs=kept)
    config.architectures = ["NemotronHPuzzleForCausalLM"]
    config.auto_map = {"AutoConfig": "modeling_hybrid.NemotronHPuzzleConfig",
                       "AutoModelForCausalLM": "modeling_hybrid.NemotronHPuzzleForCausalLM"}
    return config


def mamba_heads_kept(mixer, num_heads: int, scores: torch.Tensor | None = None) -> torch.Tensor:
    """The indices of the `num_heads` heads kept, in order: num_heads / groups from each group."""
    heads, groups, head_dim = mixer.num_heads, mixer.n_groups, mixer.head_dim
    if not 0 < num_heads <= heads or num_heads % groups:
        raise PuzzleError(f"a Mamba layer of {heads} heads in {groups} groups keeps a multiple of {groups} heads up "
                          f"to {heads}; got {num_heads}")
    if scores is None:
        scores = mixer.out_proj.weight.detach().float().reshape(-1, heads, head_dim).norm(dim=(0, 2))
    per, keep = heads // groups, num_heads // groups
    return torch.cat([scores[g * per:(g + 1) * per].topk(keep).indices.sort().values + g * per for g in range(groups)])


def mamba_state(mixer, kept: torch.Tensor) -> dict[str, torch.Tensor]:
    """The mixer's weights for the kept heads (`mamba_heads_kept`), under the mixer's own names."""
    head_dim, inner = mixer.head_dim, mixer.intermediate_size
    device = mixer.in_proj.weight.device  # the scores that chose `kept` may live elsewhere
    kept = kept.to(device)
    channels = (kept[:, None] * head_dim + torch.arange(head_dim, device=device)).flatten()
    bc = torch.arange(2 * inner, 2 * inner + 2 * mixer.n_groups * mixer.ssm_state_size, device=device)
    # in_proj's rows: z (gate), then x, B and C (the convolution's channels), then dt, one per head.
    in_rows = torch.cat([channels, inner + channels, bc, 2 * inner + 2 * mixer.n_groups * mixer.ssm_state_size + kept])
    conv_rows = torch.cat([channels, bc - inner])
    state = {"in_proj.weight": mixer.in_proj.weight[in_rows], "conv1d.weight": mixer.conv1d.weight[conv_rows],
             "dt_bias": mixer.dt_bias[kept], "A_log": mixer.A_log[kept], "D": mixer.D[kept],
             "norm.weight": mixer.norm.weight[channels], "out_proj.weight": mixer.out_proj.weight[:, channels]}
    if mixer.in_proj.bias is not None:
        state["in_proj.bias"] = mixer.in_proj.bias[in_rows]
    if mixer.conv1d.bias is not None:
        state["conv1d.bias"] = mixer.conv1d.bias[conv_rows]
    if mixer.out_proj.bias is not None:
        state["out_proj.bias"] = mixer.out_proj.bias
    return state


def attention_state(mixer, num_key_value_heads: int) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in mixer.state_dict().items()}
    heads, head_dim = mixer.k_proj.out_features // mixer.head_dim, mixer.head_dim
    for name in ("k_proj.weight", "v_proj.weight"):
        state[name] = mean_pool_kv_heads(state[name], heads, num_key_value_heads, head_dim)
    return state


def mlp_state(mixer, intermediate_size: int, scores: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    if scores is None:
        scores = mixer.down_proj.weight.detach().float().norm(dim=0) * mixer.up_proj.weight.detach().float().norm(dim=1)
    keep = scores.topk(intermediate_size).indices.sort().values
    state = {"up_proj.weight": mixer.up_proj.weight[keep], "down_proj.weight": mixer.down_proj.weight[:, keep]}
    if mixer.up_proj.bias is not None:
        state.update({"up_proj.bias": mixer.up_proj.bias[keep], "down_proj.bias": mixer.down_proj.bias})
    return state


def linear_mlp_state(mixer) -> dict[str, torch.Tensor]:
    """One Linear in place of down(act(up x)): W = W_down · W_up, as for the dense families."""
    return {"linear_mlp.weight": mixer.down_proj.weight @ mixer.up_proj.weight}


def moe_state(mixer, num_experts: int, scores: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The routed experts kept, with their router rows and score-correction biases; the rest as it was."""
    experts = mixer.experts
    if scores is None:
        scores = experts.down_proj.detach().float().flatten(1).norm(dim=1)
    keep = scores.topk(num_experts).indices.sort().values
    state = dict(mixer.state_dict())
    for name, value in (("experts.up_proj", experts.up_proj), ("experts.down_proj", experts.down_proj),
                        ("gate.weight", mixer.gate.weight), ("gate.e_score_correction_bias",
                                                             mixer.gate.e_score_correction_bias)):
        state[name] = value[keep]
    return state


def mixer_state(kind: str, mixer, spec, scores: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The weights of a `kind` layer's mixer cut to `spec` (an AttentionSpec for a token mixer, an FfnSpec
    otherwise), ranked by `scores` where the caller measured them."""
    if kind == "mamba":
        return mamba_state(mixer, mamba_heads_kept(mixer, spec.mamba_num_heads, scores))
    if kind == "attention":
        return attention_state(mixer, spec.num_key_value_heads)
    if kind == "mlp" and spec.kind is FfnKind.linear:
        return linear_mlp_state(mixer)
    if kind == "mlp":
        return mlp_state(mixer, spec.intermediate_size, scores)
    return moe_state(mixer, spec.num_experts, scores)


def hybrid_child_state(parent_model, choices: list[BlockChoice], shapes: list[ParentShape]) -> dict[str, torch.Tensor]:
    """The child's weights under the layout's names: the kept layers renumbered in order."""
    backbone = parent_model.model
    state = {"model.embeddings.weight": backbone.embeddings.weight, "model.norm_f.weight": backbone.norm_f.weight}
    if not parent_model.config.tie_word_embeddings:
        state["lm_head.weight"] = parent_model.lm_head.weight
    kept = 0
    for i, (choice, shape) in enumerate(zip(choices, shapes)):
        block = hybrid_block_config(choice, shape, i)
        if block is None:
            continue
        kind = block["block_type"]
        spec = choice.attention if kind in ("mamba", "attention") else choice.ffn
        layer = mixer_state(kind, backbone.layers[i].mixer, spec)
        state[f"model.layers.{kept}.norm.weight"] = backbone.layers[i].norm.weight
        state.update({f"model.layers.{kept}.mixer.{name}": value for name, value in layer.items()})
        kept += 1
    return state



class HybridSubblock(nn.Module):
    """A hybrid layer's mixer behind its norm, called as a candidate subblock is: `(hidden, position_embeddings)`
    for a token mixer (Nemotron-H's attention has no position embeddings), `(hidden)` for an FFN; it returns
    what the layer adds to the residual stream."""

    def __init__(self, norm: nn.Module, mixer: nn.Module, block_type: str):
        super().__init__()
        self.norm, self.mixer, self.block_type = norm, mixer, block_type

    @property
    def window(self) -> int | None:
        return getattr(self.mixer.config, "sliding_window", None) if self.block_type == "attention" else None

    def forward(self, hidden: torch.Tensor, position_embeddings=None, cache=None) -> torch.Tensor:
        """`cache`: a `hybrid_cache` in which the mixer's `layer_idx` names its slot."""
        x = self.norm(hidden.to(self.norm.weight.dtype))
        if self.block_type == "mamba":
            return self.mixer(x, **{MAMBA_CACHE: cache})
        if self.block_type == "attention":  # sdpa: causal without a mask, unless a window needs one
            return self.mixer(hidden_states=x, attention_mask=self._window_mask(x, cache), **{CACHE: cache})[0]
        return self.mixer(x)

    def _window_mask(self, x: torch.Tensor, cache) -> torch.Tensor | None:
        """[1, 1, queries, keys] bool for a window; the keys are the slot's stored ones, then the new ones."""
        if self.window is None:
            return None
        slot = cache.layers[self.mixer.layer_idx] if cache is not None else None
        stored = slot.keys.shape[-2] if slot is not None and slot.is_initialized else 0
        q_len = x.shape[1]
        keys = torch.arange(stored + q_len, device=x.device)[None]
        queries = torch.arange(stored, stored + q_len, device=x.device)[:, None]
        return ((keys <= queries) & (queries - keys < self.window))[None, None]


def hybrid_cache(mixers: list[HybridSubblock]):
    """An empty transformers cache with one slot per token mixer, in order: Mamba state, KV, or a window's KV."""
    from transformers import NemotronHConfig
    from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

    cache = DynamicCache(config=NemotronHConfig(layers_block_type=[m.block_type for m in mixers]))
    for i, mixer in enumerate(mixers):
        if mixer.window is not None:
            cache.layers[i] = DynamicSlidingWindowLayer(sliding_window=mixer.window)
    return cache


def _layer_config(parent_config, block: dict):
    config = copy.deepcopy(parent_config)
    for word, value in block.items():
        if word != "block_type":
            setattr(config, word, value)
    config._attn_implementation = "sdpa"
    return config


def init_hybrid(spec, parent, scores: torch.Tensor | None = None) -> HybridSubblock:
    """A candidate of a hybrid layer (`parent`: a `blocks.init.ParentLayer`), its weights cut from the parent's
    mixer; `scores`: channel or expert importances measured on calibration tokens, where the caller has them."""
    shape = parent.shape
    attention = isinstance(spec, AttentionSpec)
    choice = BlockChoice(spec, shape.ffn) if attention else BlockChoice(shape.attention, spec)
    block = hybrid_block_config(choice, shape, layer=-1)
    src = parent.attention if attention else parent.ffn
    config = _layer_config(parent.config, block)
    kind = block["block_type"]
    norm_src = parent.input_norm if attention else parent.post_attention_norm
    with torch.device("meta"):
        if block.get("replace_with_linear"):
            mixer = NemotronHLinearMLP(config)
        else:
            mixer = {"mamba": NemotronHMamba2Mixer, "attention": NemotronHAttention, "mlp": NemotronHMLP,
                     "moe": NemotronHMoE}[kind](config, layer_idx=0)
    state = {k: v.detach().clone() for k, v in mixer_state(kind, src, spec, scores).items()}
    mixer.load_state_dict(state, strict=True, assign=True)
    norm = NemotronHRMSNorm(shape.hidden_size, eps=parent.rms_norm_eps)
    norm.weight.data.copy_(norm_src.weight.data)
    return HybridSubblock(norm, mixer, kind)
