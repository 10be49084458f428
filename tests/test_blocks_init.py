"""Initialization from the parent (DESIGN §3), checked against the parent's own subblocks."""

import pytest
import torch

from puzzle.errors import PuzzleError
from puzzle.blocks.init import channel_contribution, expand_kv_heads, init_attention, init_ffn, mean_pool_kv_heads
from puzzle.blocks.specs import AttentionKind, AttentionSpec, FfnKind, FfnSpec
from puzzle.families import FamilyAdapter
from tests.tiny import tiny_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
ATOL = 1e-5  # float32, same math in another order


def setup(model_type, attn="sdpa", seq=20):
    model = tiny_model(model_type, attn)
    adapter = FamilyAdapter(model)
    h = torch.randn(2, seq, model.config.hidden_size)
    return adapter, h, adapter.context(h)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_parent_attention_spec_equals_the_parent_attention(model_type, attn):
    """KV pooling to the parent's own count is the identity, in every layer (full and sliding)."""
    adapter, h, ctx = setup(model_type, attn)
    with torch.no_grad():
        for i in range(adapter.num_layers):
            parent = adapter.parent_layer(i)
            module = init_attention(parent.shape.attention, parent, attn)
            got = module(h, ctx.position_embeddings)
            torch.testing.assert_close(got, adapter.attention_delta(i, h, ctx), atol=ATOL, rtol=0)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_ffn_keeping_every_channel_equals_the_parent_ffn(model_type):
    adapter, h, _ = setup(model_type)
    parent = adapter.parent_layer(0)
    scores = torch.rand(parent.shape.intermediate_size)
    module = init_ffn(FfnSpec(FfnKind.dense, parent.shape.intermediate_size), parent, scores)
    with torch.no_grad():
        torch.testing.assert_close(module(h), adapter.ffn_delta(0, h), atol=ATOL, rtol=0)


def test_window_as_long_as_the_sequence_equals_full_attention():
    adapter, h, ctx = setup("llama", seq=16)
    parent = adapter.parent_layer(1)
    full = init_attention(parent.shape.attention, parent)
    window = init_attention(AttentionSpec(AttentionKind.attention, 2, 16), parent)
    short = init_attention(AttentionSpec(AttentionKind.attention, 2, 4), parent)
    with torch.no_grad():
        torch.testing.assert_close(window(h, ctx.position_embeddings), full(h, ctx.position_embeddings), atol=ATOL, rtol=0)
        assert not torch.allclose(short(h, ctx.position_embeddings), full(h, ctx.position_embeddings), atol=1e-3)


def test_mean_pooled_kv_heads():
    w = torch.arange(4 * 2 * 3, dtype=torch.float32).reshape(4 * 2, 3)  # 4 heads of dim 2
    pooled = mean_pool_kv_heads(w, heads=4, new_heads=2, head_dim=2)
    expected = torch.cat([(w[0:2] + w[2:4]) / 2, (w[4:6] + w[6:8]) / 2])
    torch.testing.assert_close(pooled, expected)
    with pytest.raises(PuzzleError, match="do not divide"):
        mean_pool_kv_heads(w, heads=4, new_heads=3, head_dim=2)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_linear_attention_is_wo_times_wv(model_type):
    """Closed form: with every token attending only to itself, attention is o_proj(v_proj(x))."""
    adapter, h, _ = setup(model_type)
    parent = adapter.parent_layer(0)
    module = init_attention(AttentionSpec(AttentionKind.linear), parent)
    src, shape = parent.attention, parent.shape
    x = parent.input_norm(h)
    v = src.v_proj(x).view(2, 20, shape.num_key_value_heads, shape.head_dim)
    v = v.repeat_interleave(shape.num_attention_heads // shape.num_key_value_heads, dim=2).reshape(2, 20, -1)
    with torch.no_grad():
        torch.testing.assert_close(module(h), src.o_proj(v), atol=ATOL, rtol=0)


def test_linear_ffn_is_wdown_times_wup():
    adapter, h, _ = setup("llama")
    parent = adapter.parent_layer(0)
    module = init_ffn(FfnSpec(FfnKind.linear), parent)
    x = parent.post_attention_norm(h)
    with torch.no_grad():
        torch.testing.assert_close(module(h), parent.ffn.down_proj(parent.ffn.up_proj(x)), atol=ATOL, rtol=0)


def test_pruning_keeps_the_top_contributing_channels():
    adapter, h, _ = setup("llama")
    parent = adapter.parent_layer(0)
    w_down = parent.ffn.down_proj.weight.data
    abs_mean = torch.rand(w_down.shape[1])
    scores = channel_contribution(abs_mean, w_down)
    torch.testing.assert_close(scores, abs_mean * w_down.norm(dim=0))
    module = init_ffn(FfnSpec(FfnKind.dense, 10), parent, scores)
    keep = scores.topk(10).indices.sort().values
    torch.testing.assert_close(module.down_proj.weight.data, w_down[:, keep])
    with pytest.raises(PuzzleError, match="calibration"):
        init_ffn(FfnSpec(FfnKind.dense, 10), parent, None)


def test_expand_kv_heads_repeats_each_head_for_its_queries():
    w = torch.tensor([[1.0], [2.0], [3.0], [4.0]])  # 2 KV heads of dim 2
    out = expand_kv_heads(w, kv_heads=2, query_heads=4, head_dim=2)
    assert out.flatten().tolist() == [1, 2, 1, 2, 3, 4, 3, 4]


def test_noop_adds_nothing():
    adapter, h, ctx = setup("llama")
    parent = adapter.parent_layer(0)
    assert torch.count_nonzero(init_attention(AttentionSpec(AttentionKind.noop), parent)(h, ctx.position_embeddings)) == 0
    assert torch.count_nonzero(init_ffn(FfnSpec(FfnKind.noop), parent)(h)) == 0


@pytest.mark.parametrize("window", [None, 5])
def test_candidate_attention_decodes_with_its_kv_cache(window):
    """Token-by-token decoding through the child's cache (a windowed slot keeps only its window) equals one full pass."""
    from puzzle.blocks.modeling_puzzle import new_kv_cache

    adapter, h, ctx = setup("llama", seq=12)
    parent = adapter.parent_layer(0)
    module = init_attention(AttentionSpec(AttentionKind.attention, 1, window), parent)
    module.layer_idx = 0
    cos, sin = ctx.position_embeddings
    with torch.no_grad():
        full = module(h, (cos, sin))
        cache = new_kv_cache([window])
        steps = [module(h[:, :7], (cos[:, :7], sin[:, :7]), cache=cache)]
        for t in range(7, 12):
            steps.append(module(h[:, t : t + 1], (cos[:, t : t + 1], sin[:, t : t + 1]), cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)
    if window is not None:
        assert cache.layers[0].keys.shape[2] == window - 1


def _llama_rotary(position_embeddings):
    """GPT-OSS rotates with cos/sin of half a head; the child's rotate-half form takes them repeated."""
    return tuple(torch.cat([t, t], dim=-1) for t in position_embeddings)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])  # sdpa cannot take sinks: the module must fall back to eager
def test_gpt_oss_attention_with_sinks_equals_the_parent_attention(attn):
    adapter, h, ctx = setup("gpt_oss")
    rotary = _llama_rotary(ctx.position_embeddings)
    for i in range(adapter.num_layers):  # sliding and full layers
        module = init_attention(adapter.shape(i).attention, adapter.parent_layer(i), attn)
        with torch.no_grad():
            expected = adapter.attention_delta(i, h, ctx)
            torch.testing.assert_close(module(h, rotary), expected, atol=ATOL, rtol=0)
            module.sinks = None  # the sinks matter: without them the output is another one
            assert not torch.allclose(module(h, rotary), expected, atol=1e-3)


def test_gpt_oss_sinks_survive_kv_pooling_and_decode_with_a_cache():
    from puzzle.blocks.modeling_puzzle import new_kv_cache

    adapter, h, ctx = setup("gpt_oss")
    module = init_attention(AttentionSpec(AttentionKind.attention, 1, 8), adapter.parent_layer(1))
    torch.testing.assert_close(module.sinks, adapter.parent_layer(1).attention.sinks)
    cos, sin = _llama_rotary(ctx.position_embeddings)
    with torch.no_grad():
        full = module(h, (cos, sin))
        cache = new_kv_cache([8])
        module.layer_idx = 0
        steps = [module(h[:, :12], (cos[:, :12], sin[:, :12]), cache)]
        steps += [module(h[:, t : t + 1], (cos[:, t : t + 1], sin[:, t : t + 1]), cache) for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)
