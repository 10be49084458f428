"""Tiny random parents of every supported family (2–4 layers, hidden 32–64, GQA; MoE: 4 experts, top-2)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM, LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig,
)

COMMON = dict(
    vocab_size=128,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_config(model_type: str):
    if model_type == "llama":
        return LlamaConfig(**COMMON)
    if model_type == "mistral":
        return MistralConfig(**COMMON, sliding_window=8)
    if model_type == "qwen2":
        # Qwen2 uses bias on q/k/v; the top layer uses a sliding window here to exercise both masks.
        return Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=8, max_window_layers=2)
    if model_type == "qwen3":
        return Qwen3Config(**COMMON, head_dim=8, use_sliding_window=True, sliding_window=8, max_window_layers=2)
    if model_type == "mixtral":
        # COMMON's intermediate size is each expert's here.
        return MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)
    if model_type == "qwen3_moe":
        # Layer 1 keeps a dense MLP, so a parent mixes MoE and dense layers; top-k weights are not renormalized.
        return Qwen3MoeConfig(
            **COMMON, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[1],
            norm_topk_prob=False,
        )
    raise ValueError(model_type)


def tiny_model(model_type: str, attn_implementation: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    config = tiny_config(model_type)
    config._attn_implementation = attn_implementation
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.eval()
