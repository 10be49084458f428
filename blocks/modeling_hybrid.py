"""The child of a hybrid (Nemotron-H) parent: the heterogeneous Nemotron-H Puzzle layout, self-contained.

Saved beside a hybrid child's weights and loaded through `auto_map`; it imports only torch and transformers.
`model_type: nemotron_h_puzzle`, `architectures: ["NemotronHPuzzleForCausalLM"]` and a `block_configs` list
with one entry per kept layer, as NVIDIA's Nemotron-H Puzzle checkpoints carry it: `block_type` (mamba,
attention, mlp, moe) and the words of the global config that this layer sets otherwise: `intermediate_size`
(mlp); `moe_intermediate_size`, `n_routed_experts`, `num_experts_per_tok` (moe); and two words only this
file reads, `mamba_num_heads` (mamba) and `num_key_value_heads` (attention). A removed layer has no entry.
Each layer is transformers' own Nemotron-H block built from its layer's config, so a layer the search kept
computes what the parent's did.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.cache_utils import CacheLayerMixin, DynamicCache
from transformers.masking_utils import create_recurrent_attention_mask
from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig
from transformers.models.nemotron_h.modeling_nemotron_h import (
    NemotronHBlock, NemotronHForCausalLM, NemotronHMamba2Mixer, NemotronHModel, NemotronHPreTrainedModel,
    NemotronHRMSNorm,
)

# A block's type in the released layout, and transformers' word for it in `layers_block_type`.
BLOCK_TYPES = {"mamba": "linear_attention", "attention": "full_attention", "mlp": "mlp", "moe": "moe"}
# The words a block may set over the global config.
BLOCK_WORDS = {
    "mamba": ("mamba_num_heads",),
    "attention": ("num_key_value_heads",),
    "mlp": ("intermediate_size",),
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
    """transformers' cache, which asks an attention layer how many tokens it has seen: a child whose attention
    layers were all removed counts them itself."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if any(isinstance(layer, CacheLayerMixin) for layer in self.layers):  # an attention layer's cache
            return super().get_seq_length(layer_idx)
        return self.seen_tokens


def _attention_free(config: NemotronHPuzzleConfig) -> bool:
    return "full_attention" not in config.layers_block_type


def _recurrent_masks(config, length_like: torch.Tensor, attention_mask, cache) -> dict:
    """The masks of a model without attention layers: only Mamba's padding mask (transformers' causal mask is
    sized from an attention layer's cache)."""
    return {"linear_attention": create_recurrent_attention_mask(config, length_like, attention_mask, cache)}


class NemotronHPuzzleModel(NemotronHPuzzlePreTrainedModel, NemotronHModel):
    def __init__(self, config: NemotronHPuzzleConfig):
        NemotronHPreTrainedModel.__init__(self, config)  # not NemotronHModel's: its layers are all alike
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            NemotronHBlock(config.get_nemotron_h_config_for_layer(i), layer_idx=i) for i in range(config.num_hidden_layers)
        )
        self.norm_f = NemotronHRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.post_init()

    def forward(self, input_ids=None, inputs_embeds=None, position_ids=None, cache=None, use_cache=None,
                attention_mask=None, **kwargs):
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = NemotronHPuzzleCache(config=self.config)
        tokens = input_ids if input_ids is not None else inputs_embeds[..., 0]
        if _attention_free(self.config) and not isinstance(attention_mask, dict):
            if position_ids is None:  # no layer reads them, but the base forward asks the cache for them
                past = cache.get_seq_length() if cache is not None else 0
                position_ids = (torch.arange(tokens.shape[1], device=tokens.device) + past)[None]
            attention_mask = _recurrent_masks(self.config, tokens[..., None], attention_mask, cache)
        out = super().forward(input_ids=input_ids, inputs_embeds=inputs_embeds, position_ids=position_ids,
                              cache=cache, use_cache=use_cache, attention_mask=attention_mask, **kwargs)
        if isinstance(cache, NemotronHPuzzleCache):
            cache.seen_tokens += tokens.shape[1]
        return out


class NemotronHPuzzleForCausalLM(NemotronHPuzzlePreTrainedModel, NemotronHForCausalLM):
    def __init__(self, config: NemotronHPuzzleConfig):
        NemotronHPreTrainedModel.__init__(self, config)
        self.model = NemotronHPuzzleModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if model_kwargs.get("cache") is None and generation_config.use_cache is not False:
            model_kwargs["cache"] = NemotronHPuzzleCache(config=self.config)
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    @staticmethod
    def create_masks_for_generate(config, inputs_embeds, attention_mask, cache, position_ids=None, **kwargs):
        if _attention_free(config):
            return _recurrent_masks(config, inputs_embeds, attention_mask, cache)
        return NemotronHForCausalLM.create_masks_for_generate(config, inputs_embeds, attention_mask, cache,
                                                              position_ids, **kwargs)
