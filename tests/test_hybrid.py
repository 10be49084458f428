"""Children of hybrid (Nemotron-H) parents: the Nemotron-H Puzzle layout, loaded by transformers."""

import json
import shutil

import pytest
import torch

from puzzle.blocks.hybrid import hybrid_child_config, hybrid_child_state, mamba_heads_kept
from puzzle.blocks.modeling_hybrid import CACHE, NemotronHPuzzleForCausalLM
from puzzle.blocks.specs import BlockChoice
from puzzle.errors import PuzzleError
from puzzle.families import parent_shapes
from tests.tiny import tiny_model

# tiny_model("nemotron_h"): mamba (4 heads, 2 groups), mlp (96), attention (2 KV heads), moe (4 experts, top 2), mamba.
OWN = ["attention.mamba4+ffn.noop", "attention.noop+ffn.i96", "attention.kv2+ffn.noop", "attention.noop+ffn.moe4.top2",
       "attention.mamba4+ffn.noop"]
# Every kind of change: fewer Mamba heads, a pruned MLP, fewer KV heads, fewer experts, a Mamba layer removed.
CHANGED = ["attention.mamba2+ffn.noop", "attention.noop+ffn.i48", "attention.kv1+ffn.noop", "attention.noop+ffn.moe2.top1",
           "attention.noop+ffn.noop"]


def child(parent, blocks):
    choices = [BlockChoice.from_id(b) for b in blocks]
    shapes = parent_shapes(parent.config)
    config = hybrid_child_config(parent.config, choices, shapes)
    with torch.device("meta"):
        model = NemotronHPuzzleForCausalLM(config)
    model.load_state_dict(hybrid_child_state(parent, choices, shapes), strict=True, assign=True)
    return model.eval()


def test_a_child_of_the_parents_own_blocks_is_the_parent():
    parent = tiny_model("nemotron_h")
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(child(parent, OWN)(ids).logits, parent(ids).logits, rtol=0, atol=1e-6)
    config = child(parent, OWN).config
    assert config.block_configs == [{"block_type": t} for t in ("mamba", "mlp", "attention", "moe", "mamba")]


def test_a_changed_child_loads_with_transformers_and_generates_alike_with_and_without_cache(tmp_path):
    from transformers import AutoModelForCausalLM

    import puzzle.blocks.modeling_hybrid as modeling

    parent = tiny_model("nemotron_h")
    model = child(parent, CHANGED)
    assert model.config.block_configs == [
        {"block_type": "mamba", "mamba_num_heads": 2}, {"block_type": "mlp", "intermediate_size": 48},
        {"block_type": "attention", "num_key_value_heads": 1},
        {"block_type": "moe", "n_routed_experts": 2, "num_experts_per_tok": 1}]
    model.save_pretrained(tmp_path)
    shutil.copy(modeling.__file__, tmp_path / "modeling_hybrid.py")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "nemotron_h_puzzle" and saved["architectures"] == ["NemotronHPuzzleForCausalLM"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(loaded).__module__.startswith("transformers_modules")  # the saved file, not puzzle's
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)
    cached = loaded.generate(ids, max_new_tokens=10, do_sample=False, use_cache=True)
    uncached = loaded.generate(ids, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    mamba = loaded.model.layers[0].mixer
    assert mamba.num_heads == 2 and mamba.in_proj.weight.shape == (2 * 16 + 2 * 2 * 8 + 2, 48)  # z, x; B, C; dt


def test_engine_verdicts_name_the_parent_layer_of_each_kept_entry():
    from puzzle.blocks.hybrid import kept_layers
    from puzzle.engines import Engine, hybrid_reasons

    # Layer 0 removed: the child's entries 0..3 are the parent's layers 1..4.
    blocks = ["attention.noop+ffn.noop", "attention.noop+ffn.linear", "attention.kv1+ffn.noop", *OWN[3:]]
    choices = [BlockChoice.from_id(b) for b in blocks]
    parent = tiny_model("nemotron_h")
    config = hybrid_child_config(parent.config, choices, parent_shapes(parent.config))
    assert kept_layers(choices) == [1, 2, 3, 4]
    assert hybrid_reasons(Engine.llama_cpp, config, kept_layers(choices)) == [
        "block_configs[0] (parent layer 1): a linear MLP layer (llama.cpp builds every MLP layer as an MLP)",
        "block_configs[1] (parent layer 2): fewer KV heads in one layer (llama.cpp's Nemotron-H Puzzle converter "
        "reads none)",
        "block_configs[2] (parent layer 3): an MoE layer (its experts are saved fused, as transformers 5 holds them; "
        "llama.cpp's Nemotron-H converter: 'Unprocessed experts')"]


# Window attention (a window of 4 on 12 + 10 tokens) and a linear MLP.
WINDOW_LINEAR = [OWN[0], "attention.noop+ffn.linear", "attention.kv1.window4+ffn.noop", *OWN[3:]]


def test_a_child_with_window_attention_and_a_linear_mlp_loads_and_generates_alike_with_and_without_cache(tmp_path):
    from transformers import AutoModelForCausalLM

    import puzzle.blocks.modeling_hybrid as modeling

    parent = tiny_model("nemotron_h")
    model = child(parent, WINDOW_LINEAR)
    assert model.config.block_configs[1:3] == [{"block_type": "mlp", "replace_with_linear": True},
                                               {"block_type": "attention", "num_key_value_heads": 1, "sliding_window": 4}]
    model.save_pretrained(tmp_path)
    shutil.copy(modeling.__file__, tmp_path / "modeling_hybrid.py")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)
    cached = loaded.generate(ids, max_new_tokens=10, do_sample=False, use_cache=True)
    assert torch.equal(cached, loaded.generate(ids, max_new_tokens=10, do_sample=False, use_cache=False))
    out = loaded(ids, use_cache=True, output_hidden_states=True)
    assert getattr(out, CACHE).layers[2].keys.shape[-2] == 3  # the window's cache keeps the last window − 1 tokens' KV
    assert len(out.hidden_states) == 1 + 5  # what KD aligns the layers on


def test_window_attention_sees_only_its_window_in_the_child_and_in_its_library_candidate():
    from puzzle.blocks.init import init_attention
    from puzzle.blocks.specs import AttentionKind, AttentionSpec
    from puzzle.families import family_adapter

    parent = tiny_model("nemotron_h")
    removed = "attention.noop+ffn.noop"
    model = child(parent, [removed, removed, "attention.kv2.window4+ffn.noop", removed, removed])  # no full mask
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    changed = ids.clone()
    changed[0, :8] = (ids[0, :8] + 1) % 128  # outside the window of the last token (which sees 8..11)
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.equal(model(changed).logits[0, 11], logits[0, 11])
        assert not torch.equal(model(changed).logits[0, 8], logits[0, 8])
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
        mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
        torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, 3:], logits, rtol=0, atol=1e-5)
        candidate = init_attention(AttentionSpec(AttentionKind.attention, 2, 4), family_adapter(parent).parent_layer(2))
        hidden = model.model.embeddings(ids)
        alone = model.lm_head(model.model.norm_f(hidden + candidate(hidden, None)))
        torch.testing.assert_close(alone, logits, rtol=0, atol=1e-5)


def test_mamba_heads_are_kept_alike_in_every_group():
    mixer = tiny_model("nemotron_h").model.layers[0].mixer  # 4 heads in 2 groups
    scores = torch.tensor([0.1, 0.9, 0.8, 0.2])
    assert mamba_heads_kept(mixer, 2, scores).tolist() == [1, 2]
    with pytest.raises(PuzzleError, match="multiple of 2 heads"):
        mamba_heads_kept(mixer, 3, scores)


def test_a_block_that_does_not_fit_its_hybrid_layer_is_refused():
    parent = tiny_model("nemotron_h")
    wrong = ["attention.kv1+ffn.noop", *OWN[1:]]  # attention in place of the first Mamba layer
    with pytest.raises(PuzzleError, match="layer 0: attention.kv1\\+ffn.noop does not fit a hybrid layer"):
        child(parent, wrong)


def test_a_mamba_layers_memory_is_its_state_computed_by_hand_and_its_parameters_are_counted():
    from puzzle.blocks.costs import Scenario, kv_cache_bytes, parameters
    from puzzle.blocks.specs import AttentionKind, AttentionSpec

    parent = tiny_model("nemotron_h")
    shape = parent_shapes(parent.config)[0]  # 4 heads of 8 channels, 2 groups, state 8, kernel 4
    scenario = Scenario(batch_size=3, prefill_length=100, decode_length=50, kv_dtype="bfloat16")
    for heads in (4, 2):
        spec = AttentionSpec(AttentionKind.mamba, mamba_num_heads=heads)
        ssm = heads * 8 * 8 * 4  # heads · head_dim · state_size, float32
        conv = (heads * 8 + 2 * 2 * 8) * (4 - 1) * 2  # (x + B + C channels) · (kernel − 1), bf16
        assert kv_cache_bytes(spec, shape, scenario) == 3 * (ssm + conv)
        assert kv_cache_bytes(spec, shape, scenario, tokens=10_000) == 3 * (ssm + conv)  # not the context's
    own = sum(p.numel() for p in parent.model.layers[0].parameters())
    assert parameters(shape.attention, shape) == own
    half = child(parent, CHANGED).model.layers[0]
    assert parameters(AttentionSpec(AttentionKind.mamba, mamba_num_heads=2), shape) == sum(p.numel() for p in half.parameters())


@pytest.mark.parametrize("biases", [dict(use_conv_bias=False, use_bias=True)])
def test_mamba_parameters_follow_the_parents_biases(biases):
    from puzzle.blocks.costs import parameters

    parent = tiny_model("nemotron_h", **biases)
    shape = parent_shapes(parent.config)[0]
    assert parameters(shape.attention, shape) == sum(p.numel() for p in parent.model.layers[0].parameters())


def test_each_hybrid_layer_offers_only_its_own_kind_of_block():
    from puzzle.blocks.space import SpaceOptions, attention_candidates, ffn_candidates

    options = SpaceOptions(ffn_fractions=[0.5], experts=[2], mamba_fractions=[0.5, 0.4], windows=[8])
    ids = [([a.id for a in attention_candidates(s, options)], [f.id for f in ffn_candidates(s, options)])
           for s in parent_shapes(tiny_model("nemotron_h").config)]
    assert ids[0] == (["attention.mamba4", "attention.mamba2", "attention.noop"], ["ffn.noop"])  # 0.4 → 2 (groups of 2)
    assert ids[1] == (["attention.noop"], ["ffn.i96", "ffn.i48", "ffn.linear", "ffn.noop"])
    assert ids[2] == (["attention.kv2", "attention.kv1", "attention.kv2.window8", "attention.noop"], ["ffn.noop"])
    assert ids[3] == (["attention.noop"], ["ffn.moe4.top2", "ffn.moe2.top2", "ffn.noop"])


def test_candidates_of_the_parents_own_blocks_add_what_the_parents_layers_add():
    from puzzle.blocks.init import init_attention, init_ffn
    from puzzle.families import family_adapter

    adapter = family_adapter(tiny_model("nemotron_h"))
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hidden = adapter.embed(ids)
        ctx = adapter.context(hidden)
        for i in range(adapter.num_layers):
            parent = adapter.parent_layer(i)
            if parent.attention is not None:
                got = init_attention(parent.shape.attention, parent)(hidden, None)
                expected = adapter.attention_delta(i, hidden, ctx)
            else:
                got, expected = init_ffn(parent.shape.ffn, parent)(hidden), adapter.ffn_delta(i, hidden)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6, msg=f"layer {i}")
            hidden = adapter.run_layer(i, hidden, ctx)


# --- the whole job on a hybrid parent -------------------------------------------------------------------------

HYBRID_RUN = ["bld.tokens_per_candidate=128", "search.budgets.latency=0.6x", "library.experts=[2]",
              "library.mamba_fractions=[0.5]", "library.ffn_fractions=[0.5]", "kd.tokens=1024", "kd.batch_size=2",
              "kd.eval_blocks=2", "eval.validation_blocks=2", "eval.speed_repeats=1", "eval.speed_warmup=0",
              "profile.device=h100", "scoring.validation_blocks=1"]


@pytest.fixture(scope="module")
def hybrid_run(tmp_path_factory, tiny_parent_dir):
    """`puzzle run` once on a tiny random hybrid parent: (exit code, stderr, job file, run directory)."""
    import os
    import subprocess
    import sys

    from tests.helpers import hybrid_parent, write_job

    root = tmp_path_factory.mktemp("hybrid_run")
    job = write_job(root, hybrid_parent(root / "parent", tiny_parent_dir))
    result = subprocess.run([sys.executable, "-m", "puzzle", "run", str(job), *[a for s in HYBRID_RUN for a in ("--set", s)]],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    return result.returncode, result.stderr, job, root / "job"


@pytest.mark.slow
def test_puzzle_run_compresses_a_hybrid_parent_within_its_budget(hybrid_run):
    from transformers import AutoModelForCausalLM

    code, err, _, run = hybrid_run
    assert code == 0, err[-3000:]
    solution = json.loads((run / "search/solutions.json").read_text())["solutions"][0]
    assert solution["usage"]["latency"]["used"] <= solution["usage"]["latency"]["limit"]
    config = json.loads((run / "kd/checkpoint/config.json").read_text())
    assert config["model_type"] == "nemotron_h_puzzle" and (run / "kd/checkpoint/modeling_hybrid.py").is_file()
    kept = [layer for layer in solution["layers"] if (layer["attention"], layer["ffn"]) != ("attention.noop", "ffn.noop")]
    assert 0 < len(config["block_configs"]) == len(kept)
    loaded = AutoModelForCausalLM.from_pretrained(run / "kd/checkpoint", trust_remote_code=True)
    ids = torch.randint(0, 100, (1, 8))
    assert torch.equal(loaded.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True),
                       loaded.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False))
    results = {m["name"]: m for m in json.loads((run / "eval/results.json").read_text())["models"]}
    assert results.keys() == {"parent", "child", "child + KD"}
    assert results["child"]["parameters"] < results["parent"]["parameters"]
    assert (run / "report/architecture.png").is_file()


def test_what_hybrids_do_not_have_yet_is_refused_before_any_work(tmp_path, tiny_parent_dir, monkeypatch, capsys):
    from tests.helpers import cli, hybrid_parent, write_job

    job = write_job(tmp_path, hybrid_parent(tmp_path / "parent", tiny_parent_dir))
    code, out = cli(monkeypatch, capsys, "validate", job, "--set", "eval.kv_dtype=fp8", "--set", "kd.shard=true")
    assert code == 2 and "Traceback" not in out.err and "2 problem(s)" in out.err
    assert "eval.kv_dtype: 'fp8' is simulated in DeciLM children only" in out.err
    assert "kd.shard: hybrid (Nemotron-H Puzzle) children are not sharded" in out.err
    assert not (tmp_path / "job").exists()


@pytest.mark.slow
def test_fuse_refuses_a_hybrid_child_in_one_line(hybrid_run, monkeypatch, capsys):
    from tests.helpers import cli

    _, _, job, run = hybrid_run
    code, out = cli(monkeypatch, capsys, "fuse", job, "--child", run / "child/checkpoint")
    assert code == 2 and "is a hybrid (Nemotron-H Puzzle) child" in out.err


def test_a_child_without_attention_layers_generates_alike_with_and_without_cache():
    """transformers' Nemotron-H asks an attention layer's cache for the length seen; the child's cache counts."""
    parent = tiny_model("nemotron_h")
    model = child(parent, ["attention.mamba4+ffn.noop", "attention.noop+ffn.i96", "attention.noop+ffn.noop",
                           "attention.noop+ffn.moe4.top2", "attention.mamba2+ffn.noop"])
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(cached, model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False))
    with torch.no_grad():  # and a cached step continues the uncached forward
        full = model(cached).logits[:, -1]
        out = model(cached[:, :-1], use_cache=True)
        step = model(cached[:, -1:], use_cache=True, **{CACHE: getattr(out, CACHE)}).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)
