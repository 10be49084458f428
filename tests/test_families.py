import dataclasses

import pytest
import torch

from puzzle.errors import PuzzleError
from puzzle.families import AttentionType, FamilyAdapter, family_for
from tests.tiny import tiny_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "gpt_oss"]
# float32 layer-by-layer vs. the model's own forward: same kernels, so differences are rounding only.
ATOL = 1e-5


# Transformers has no sdpa attention for GPT-OSS: its eager run is the only reference.
@pytest.mark.parametrize("model_type, attn", [(m, a) for m in FAMILIES for a in ("sdpa", "eager") if family_for(m).sdpa or a == "eager"])
def test_layer_by_layer_matches_forward(model_type, attn):
    model = tiny_model(model_type, attn)
    adapter = FamilyAdapter(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 20))  # longer than the sliding window (8)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = adapter.logits(ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_sliding_window_layers_are_exposed():
    adapter = FamilyAdapter(tiny_model("qwen2"))
    kinds = [adapter.layer(i).attention_type for i in range(adapter.num_layers)]
    assert kinds == [AttentionType.full, AttentionType.full, AttentionType.sliding]
    assert adapter.layer(2).sliding_window == 8
    assert adapter.layer(0).sliding_window is None


def test_sliding_mask_matters():
    """The window really limits attention: a sliding layer run with the full mask gives other outputs."""
    model = tiny_model("mistral")
    adapter = FamilyAdapter(model)
    ids = torch.randint(0, 128, (1, 20))
    with torch.no_grad():
        h = adapter.embed(ids)
        ctx = adapter.context(h)
        windowed = adapter.attention_delta(0, h, ctx)
        full_ctx = dataclasses.replace(ctx, masks={AttentionType.sliding: None})
        full = adapter.attention_delta(0, h, full_ctx)
    assert torch.allclose(windowed[:, :8], full[:, :8], atol=1e-5)
    assert not torch.allclose(windowed[:, 8:], full[:, 8:], atol=1e-3)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_incremental_decoding_with_cache_matches_full_pass(model_type):
    from transformers import DynamicCache

    model = tiny_model(model_type)
    adapter = FamilyAdapter(model)
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        full = adapter.logits(ids)
        cache = DynamicCache(config=model.config)
        h = adapter.embed(ids[:, :10])
        ctx = adapter.context(h, cache=cache)
        for i in range(adapter.num_layers):
            h = adapter.run_layer(i, h, ctx)
        steps = [adapter.head(h)]
        for t in (10, 11):
            h = adapter.embed(ids[:, t : t + 1])
            ctx = adapter.context(h, cache=cache)
            for i in range(adapter.num_layers):
                h = adapter.run_layer(i, h, ctx)
            steps.append(adapter.head(h))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)


def test_unsupported_family_names_the_supported_ones():
    with pytest.raises(PuzzleError, match="'gpt2' is not supported; supported: gpt_oss, llama, mistral, mixtral, qwen2, qwen3, qwen3_moe"):
        family_for("gpt2")


def test_gpt_oss_alternates_windows_and_routes_every_layer():
    adapter = FamilyAdapter(tiny_model("gpt_oss"))
    assert [adapter.shape(i).window for i in range(adapter.num_layers)] == [8, None, 8]
    shape = adapter.shape(0)
    assert (shape.num_experts, shape.experts_per_token, shape.intermediate_size) == (4, 2, 96)
    assert all(adapter.shape(i).is_moe for i in range(adapter.num_layers))
