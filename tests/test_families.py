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
    with pytest.raises(PuzzleError, match="'gpt2' is not supported; supported: gpt_oss, llama, mistral, mixtral, nemotron_h, qwen2, qwen3, qwen3_moe"):
        family_for("gpt2")


def test_gpt_oss_alternates_windows_and_routes_every_layer():
    adapter = FamilyAdapter(tiny_model("gpt_oss"))
    assert [adapter.shape(i).window for i in range(adapter.num_layers)] == [8, None, 8]
    shape = adapter.shape(0)
    assert (shape.num_experts, shape.experts_per_token, shape.intermediate_size) == (4, 2, 96)
    assert all(adapter.shape(i).is_moe for i in range(adapter.num_layers))


# --- hybrid parents (Nemotron-H) ------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hybrid_layer_by_layer_matches_forward(attn):
    from puzzle.families import family_adapter

    model = tiny_model("nemotron_h", attn)
    adapter = family_adapter(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(adapter.logits(ids), model(input_ids=ids).logits, atol=ATOL, rtol=0)
    # Each layer is one mixer in one of the two slots.
    assert [adapter.layer(i).attention is not None for i in range(5)] == [True, False, True, False, True]
    assert [adapter.layer(i).ffn is not None for i in range(5)] == [False, True, False, True, False]


def test_hybrid_layers_are_blocks_with_one_empty_slot():
    from puzzle.families import parent_shapes

    shapes = parent_shapes(tiny_model("nemotron_h").config)
    assert [f"{s.attention.id}+{s.ffn.id}" for s in shapes] == [
        "attention.mamba4+ffn.noop", "attention.noop+ffn.i96", "attention.kv2+ffn.noop",
        "attention.noop+ffn.moe4.top2", "attention.mamba4+ffn.noop"]
    assert not any(s.rotary for s in shapes) and shapes[0].mamba.state_size == 8


def _hybrid_job(tmp_path, tiny_parent_dir, **config_changes):
    from tests.helpers import hybrid_parent, write_job

    return write_job(tmp_path, hybrid_parent(tmp_path / "hybrid", tiny_parent_dir, **config_changes))


def test_a_hybrid_layer_type_puzzle_does_not_know_exits_2(tmp_path, tiny_parent_dir, monkeypatch, capsys):
    from tests.helpers import cli

    job = _hybrid_job(tmp_path, tiny_parent_dir, layers_block_type=["mamba", "convolution", "mlp", "moe", "mamba"])
    code, out = cli(monkeypatch, capsys, "distill", job)
    assert code == 2 and "Traceback" not in out.err and "1 problem(s)" in out.err
    problem = next(line for line in out.err.splitlines() if "parent.path" in line)
    assert "layers_block_type` contains invalid types: {'convolution'}" in problem
    assert not (tmp_path / "job").exists()
