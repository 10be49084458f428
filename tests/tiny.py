"""Tiny random parents of every supported family (2–4 layers, hidden 32–64, GQA; MoE: 4 experts, top-2)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM, GptOssConfig, LlamaConfig, MistralConfig, MixtralConfig, NemotronHConfig, Qwen2Config, Qwen3Config,
    Qwen3MoeConfig,
)

# Every supported family, and Llama once more with attention_bias (biases on q, k, v and o).
VARIANTS = [("llama", {}), ("llama", {"attention_bias": True}), ("mistral", {}), ("qwen2", {}), ("qwen3", {}),
            ("mixtral", {}), ("qwen3_moe", {}), ("gpt_oss", {})]

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
    if model_type == "gpt_oss":
        # Sliding and full layers alternate and RoPE is YaRN-scaled, as in the released models (factor 32 over
        # 4,096 positions there); heads × head_dim (72) is not the hidden size, as there (64 × 64 against 2,880).
        # A low SwiGLU limit (7.0 released) makes the clamp cut some of this parent's activations.
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
                "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}
        return GptOssConfig(
            **COMMON, head_dim=12, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"], rope_parameters=rope,
            swiglu_limit=0.5,
        )
    if model_type == "nemotron_h":
        # One layer of each mixer, Mamba twice (its chunked scan over 20 tokens in chunks of 8 crosses chunks).
        common = {k: v for k, v in COMMON.items() if k != "num_hidden_layers"}
        return NemotronHConfig(
            **common, layers_block_type=["mamba", "mlp", "attention", "moe", "mamba"], head_dim=8,
            mamba_num_heads=4, mamba_head_dim=8, n_groups=2, ssm_state_size=8, conv_kernel=4, chunk_size=8,
            use_mamba_kernels=False, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            moe_shared_expert_intermediate_size=32,
        )
    raise ValueError(model_type)


def tiny_model(model_type: str, attn_implementation: str = "sdpa", seed: int = 0, **overrides):
    """`overrides` set config fields, e.g. `attention_bias=True`."""
    torch.manual_seed(seed)
    config = tiny_config(model_type)
    for key, value in overrides.items():
        setattr(config, key, value)
    if model_type == "gpt_oss":
        # Transformers has no sdpa path for GPT-OSS (sdpa cannot take attention sinks): eager is its reference.
        attn_implementation = "eager"
    config._attn_implementation = attn_implementation
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    if model_type == "gpt_oss":
        _randomize_gpt_oss_extras(model)
    return model.eval()


def _randomize_gpt_oss_extras(model) -> None:
    """GPT-OSS initializes its biases to zero and its sinks near zero: made random and large enough
    here, a test that dropped a bias or a sink would fail."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("bias", ".sinks")):
                param.normal_(0.0, 0.5)
