"""The child of a hybrid (Nemotron-H) parent: the heterogeneous Nemotron-H Puzzle layout, self-contained.

Saved beside a hybrid child's weights and loaded through `auto_map`; it imports only torch and transformers.
`model_type: nemotron_h_puzzle`, `architectures: ["NemotronHPuzzleForCausalLM"]` and a `block_configs` list
with one entry per kept layer, as NVIDIA's Nemotron-H Puzzle checkpoints carry it: `block_type` (mamba,
attention, mlp, moe) and the words of the global config that this layer sets otherwise: `intermediate_size`
(mlp); `moe_intermediate_size`, `n_routed_experts`, `num_experts_per_tok` (moe); and words only this file
reads: `mamba_num_heads` (mamba), `num_key_value_heads` and `sliding_window` (attention: window attention,
whose cache keeps only the window) and `replace_with_linear` (mlp: one hidden×hidden Linear, DeciLM's word).
A removed layer has no entry. Each layer is transformers' own Nemotron-H block built from its layer's config
(a linear MLP's mixer aside), so a layer the search kept computes what the parent's did.
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn
from transformers.cache_utils import CacheLayerMixin, DynamicCache, DynamicSlidingWindowLayer
from transformers.masking_utils import (
    create_causal_mask, create_recurrent_attention_mask, create_sliding_window_causal_mask,
)
from transformers.modeling_outputs import MoeModelOutputWithPast
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs
from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig
from transformers.models.nemotron_h.modeling_nemotron_h import (
    NemotronHBlock, NemotronHForCausalLM, NemotronHMamba2Mixer, NemotronHModel, NemotronHPreTrainedModel,
    NemotronHRMSNorm,
)

# transformers' words for the cache: `past_key_values` (layers, masks, outputs, generate) and `cache_params` (the
# Mamba mixer) up to 5.19, `cache` for all in 5.24. A child loads on both sides, since vLLM pins a transformers
# before the rename.
CACHE = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
MAMBA_CACHE = "cache" if "cache" in inspect.signature(NemotronHMamba2Mixer.forward).parameters else "cache_params"

# A block's type in the released layout, and transformers' word for it in `layers_block_type`.
BLOCK_TYPES = {"mamba": "linear_attention", "attention": "full_attention", "mlp": "mlp", "moe": "moe"}
# The words a block may set over the global config.
BLOCK_WORDS = {
    "mamba": ("mamba_num_heads",),
    "attention": ("num_key_value_heads", "sliding_window"),
    "mlp": ("intermediate_size", "replace_with_linear"),
    "moe": ("moe_intermediate_size", "n_routed_experts", "num_experts_per_tok"),
}


class NemotronHPuzzleConfig(NemotronHConfig):
    model_type = "nemotron_h_puzzle"

    def __post_init__(self, **kwargs):
        blocks = kwargs.get("block_configs", getattr(self, "block_configs", None))
        if blocks is not None:
            for i, block in enumerate(blocks):
                extra = set(block) - {"block_type", *BLOCK_WORDS.get(block.get("block_type"), ())}
                if block.get("block_type") not in BLOCK_TYPES or extra:
                    raise ValueError(f"block_configs[{i}]: {block} is not a block of this layout (block_type one of "
                                     f"{sorted(BLOCK_TYPES)}, with the words {BLOCK_WORDS})")
            self.layers_block_type = [BLOCK_TYPES[b["block_type"]] for b in blocks]
        super().__post_init__(**kwargs)

    def get_nemotron_h_config_for_layer(self, layer: int) -> NemotronHConfig:
        """The global config with layer `layer`'s own words set (the name vLLM's reader asks for)."""
        layer_config = copy.deepcopy(self)
        for word, value in self.block_configs[layer].items():
            if word != "block_type":
                setattr(layer_config, word, value)
        return layer_config


class NemotronHPuzzlePreTrainedModel(NemotronHPreTrainedModel):
    config_class = NemotronHPuzzleConfig

    def _init_weights(self, module):
        # The base initializes a Mamba mixer's per-head parameters with the global head count.
        heads = module.num_heads if isinstance(module, NemotronHMamba2Mixer) else self.config.mamba_num_heads
        if heads == self.config.mamba_num_heads:
            return super()._init_weights(module)
        whole = self.config.mamba_num_heads
        self.config.mamba_num_heads = heads
        try:
            super()._init_weights(module)
        finally:
            self.config.mamba_num_heads = whole


class NemotronHPuzzleCache(DynamicCache):
    """transformers' cache with a window layer's slot holding only its window. transformers asks an attention
    layer how many tokens the cache has seen: a child whose attention layers were all removed counts them
    itself."""

    def __init__(self, config: NemotronHPuzzleConfig):
        super().__init__(config=config)
        for i, block in enumerate(config.block_configs):
            if block.get("sliding_window"):
                self.layers[i] = DynamicSlidingWindowLayer(sliding_window=block["sliding_window"])
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if any(isinstance(layer, CacheLayerMixin) for layer in self.layers):  # an attention layer's cache
            return super().get_seq_length(layer_idx)
        return self.seen_tokens


class NemotronHLinearMLP(nn.Module):
    """An MLP layer replaced by one hidden×hidden Linear."""

    def __init__(self, config):
        super().__init__()
        self.linear_mlp = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear_mlp(hidden_states)


def _block(config: NemotronHPuzzleConfig, layer: int) -> NemotronHBlock:
    block = NemotronHBlock(config.get_nemotron_h_config_for_layer(layer), layer_idx=layer)
    if config.block_configs[layer].get("replace_with_linear"):
        block.mixer = NemotronHLinearMLP(config)
    return block


def _mask_key(block: dict) -> str | None:
    """Which mask a layer reads: one per window width, one for full attention, one for Mamba; none for an FFN."""
    if block["block_type"] == "attention":
        return f"sliding_attention:{block['sliding_window']}" if block.get("sliding_window") else "full_attention"
    return "linear_attention" if block["block_type"] == "mamba" else None


def _masks(config: NemotronHPuzzleConfig, inputs_embeds, attention_mask, cache, position_ids) -> dict:
    """Every mask the layers read, each built once. transformers sizes the causal mask from a full-attention
    layer's cache, so it is built only where one exists."""
    kwargs = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask, CACHE: cache, "position_ids": position_ids}
    masks = {"linear_attention": create_recurrent_attention_mask(config=config, **kwargs)}
    for i, block in enumerate(config.block_configs):
        key = _mask_key(block)
        if key is None or key in masks:
            continue
        if key == "full_attention":
            masks[key] = create_causal_mask(config=config, **kwargs)
        else:
            masks[key] = create_sliding_window_causal_mask(config=config.get_nemotron_h_config_for_layer(i), **kwargs,
                                                           layer_idx=i)
    return masks


class NemotronHPuzzleModel(NemotronHPuzzlePreTrainedModel, NemotronHModel):
    def __init__(self, config: NemotronHPuzzleConfig):
        NemotronHPreTrainedModel.__init__(self, config)  # not NemotronHModel's: its layers are all alike
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(_block(config, i) for i in range(config.num_hidden_layers))
        self.norm_f = NemotronHRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.post_init()

    # transformers' own stack: hidden states and router logits recorded, either cache keyword taken.
    @merge_with_config_defaults
    @capture_outputs
    def forward(self, input_ids=None, inputs_embeds=None, position_ids=None, cache=None, use_cache=None,
                attention_mask=None, **kwargs):
        cache = kwargs.pop("past_key_values", cache)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        hidden = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = NemotronHPuzzleCache(config=self.config)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(hidden.shape[1], device=hidden.device) + past)[None]
        masks = attention_mask if isinstance(attention_mask, dict) else _masks(
            self.config, hidden, attention_mask, cache, position_ids)
        for layer, block in zip(self.layers, self.config.block_configs):
            hidden = layer(hidden, attention_mask=masks.get(_mask_key(block)), position_ids=position_ids,
                           use_cache=use_cache, **{CACHE: cache}, **kwargs)
        if isinstance(cache, NemotronHPuzzleCache):
            cache.seen_tokens += hidden.shape[1]
        return MoeModelOutputWithPast(last_hidden_state=self.norm_f(hidden), **{CACHE: cache if use_cache else None})


class NemotronHPuzzleForCausalLM(NemotronHPuzzlePreTrainedModel, NemotronHForCausalLM):
    def __init__(self, config: NemotronHPuzzleConfig):
        NemotronHPreTrainedModel.__init__(self, config)
        self.model = NemotronHPuzzleModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if model_kwargs.get(CACHE) is None and generation_config.use_cache is not False:
            model_kwargs[CACHE] = NemotronHPuzzleCache(config=self.config)
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    @staticmethod
    def create_masks_for_generate(config, inputs_embeds, attention_mask, cache=None, position_ids=None, **kwargs):
        cache = kwargs.pop("past_key_values", cache)
        return _masks(config, inputs_embeds, attention_mask, cache, position_ids)
