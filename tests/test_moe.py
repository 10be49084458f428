"""MoE parents: kept experts, expert importance, the experts budget, and the pipeline on a tiny Mixtral."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralForCausalLM

from puzzle.blocks.costs import Scenario, active_parameters, decode_work, parameters
from puzzle.blocks.init import init_ffn
from puzzle.blocks.specs import FfnKind, FfnSpec, spec_from_id
from puzzle.distill.experts import ImportanceMethod, expert_importance
from puzzle.distill.library import Library
from puzzle.config import load_config
from puzzle.api import distill_stage
from puzzle.families import FamilyAdapter
from puzzle.api import profile_stage
from puzzle.api import realize_stage
from puzzle.api import score_stage
from puzzle.api import search_stage
from tests.helpers import assert_clean_failure, cli, pipeline_job, with_solution, write_job
from tests.tiny import tiny_model

ATOL = 1e-5  # float32: the same math as the parent, partly in another order
MOE_FAMILIES = ["mixtral", "qwen3_moe", "gpt_oss"]
# Fast BLD and deterministic (roofline) costs; every MoE layer may keep 2 of its 4 experts, never drop its FFN.
PIPELINE = ["bld.tokens_per_candidate=64", "scoring.validation_blocks=1", "profile.device=h100",
            "profile.prefill_length=16", "profile.decode_length=4", "library.experts=[2]", "library.noop_ffn=false",
            "library.linear_attention=false", "library.noop_attention=false", "library.windows=[]",
            "library.kv_heads=[2]"]


def _parent_dir(tmp_path_factory, model_type: str) -> Path:
    """A tiny parent of this family with a project-trained tokenizer, as a Hugging Face checkpoint."""
    from puzzle.tokenizer import build_tokenizer

    root = Path(__file__).resolve().parent.parent
    tokenizer = build_tokenizer([(root / "examples/data/shakespeare/sonnets.txt").read_text()], vocab_size=384)
    model = tiny_model(model_type, "eager" if model_type == "gpt_oss" else "sdpa", vocab_size=len(tokenizer),
                       max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    out = tmp_path_factory.mktemp(f"tiny_{model_type}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def moe_parent_dir(tmp_path_factory):
    """A tiny Mixtral (3 layers, 4 experts, top-2)."""
    return _parent_dir(tmp_path_factory, "mixtral")


@pytest.mark.parametrize("model_type", MOE_FAMILIES)
def test_keeping_all_experts_equals_the_parent_layer(model_type):
    adapter = FamilyAdapter(tiny_model(model_type))
    h = torch.randn(2, 20, adapter.config.hidden_size)
    moe_layers = [i for i in range(adapter.num_layers) if adapter.shape(i).is_moe]
    assert moe_layers == ([0, 2] if model_type == "qwen3_moe" else [0, 1, 2])  # Qwen3-MoE's layer 1 is dense
    for i in moe_layers:
        parent = adapter.parent_layer(i)
        with torch.no_grad():
            torch.testing.assert_close(init_ffn(parent.shape.ffn, parent)(h), adapter.ffn_delta(i, h), atol=ATOL, rtol=0)


@pytest.mark.parametrize("model_type", MOE_FAMILIES)
def test_fewer_experts_per_token_route_as_the_parents_router_with_a_lower_top_k(model_type):
    model = tiny_model(model_type)
    adapter = FamilyAdapter(model)
    h = torch.randn(2, 20, adapter.config.hidden_size)
    parent = adapter.parent_layer(0)
    fewer = init_ffn(FfnSpec(FfnKind.moe, num_experts=parent.shape.num_experts, experts_per_token=1), parent)
    with torch.no_grad():
        two = adapter.ffn_delta(0, h)
        for module in model.model.layers[0].mlp.modules():  # the parent's own router, told to pick one expert
            for name in ("top_k", "num_experts_per_tok"):
                if hasattr(module, name):
                    setattr(module, name, 1)
        one = adapter.ffn_delta(0, h)
        torch.testing.assert_close(fewer(h), one, atol=ATOL, rtol=0)
    assert not torch.allclose(one, two, atol=1e-3)  # the lower top-k changed what the parent computes


def test_library_offers_fewer_experts_per_token_with_every_kept_count():
    from puzzle.blocks.space import SpaceOptions, moe_candidates

    shape = FamilyAdapter(tiny_model("mixtral")).shape(0)  # 4 experts, top 2
    ids = [s.id for s in moe_candidates(shape, SpaceOptions(experts=[2], experts_per_token=[1], noop_ffn=False))]
    assert ids == ["ffn.moe4.top2", "ffn.moe4.top1", "ffn.moe2.top2", "ffn.moe2.top1"]
    one = FfnSpec(FfnKind.moe, num_experts=4, experts_per_token=1)
    assert active_parameters(one, shape) < active_parameters(shape.ffn, shape)
    assert parameters(one, shape) == parameters(shape.ffn, shape)  # every expert is still held in memory

def test_kept_experts_are_the_most_important_with_their_router_rows():
    adapter = FamilyAdapter(tiny_model("mixtral"))
    parent = adapter.parent_layer(0)
    module = init_ffn(FfnSpec(FfnKind.moe, num_experts=2, experts_per_token=2), parent, torch.tensor([0.1, 3.0, 0.2, 2.0]))
    torch.testing.assert_close(module.gate.weight, parent.ffn.gate.weight[[1, 3]])
    torch.testing.assert_close(module.experts.down_proj, parent.ffn.experts.down_proj[[1, 3]])
    # Two of two experts: every token goes to both, with weights that sum to one.
    weights, indices = module.route(torch.randn(5, adapter.config.hidden_size))
    assert indices.sort(-1).values.tolist() == [[0, 1]] * 5
    torch.testing.assert_close(weights.sum(-1), torch.ones(5))


def _never_routed(model, layer: int, expert: int):
    """Plant an expert that no token reaches. Mixtral's router has no bias: every FFN input of `layer` gets a large
    positive channel 0 (the embeddings carry it, attention adds little to it), and the expert's router row is
    strongly negative on it. GPT-OSS's router bias does it alone; the others' biases are zeroed, so that this tiny
    parent's random biases do not shut out a second expert as well."""
    mlp = model.model.layers[layer].mlp
    with torch.no_grad():
        if hasattr(mlp, "router"):
            mlp.router.bias.zero_()
            mlp.router.bias[expert] = -1e4
            return model
        model.model.embed_tokens.weight[:, 0] = 1.0
        row = torch.zeros(model.config.hidden_size)
        row[0] = -100.0
        mlp.gate.weight[expert] = row
    return model


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("method", list(ImportanceMethod))
def test_a_never_routed_expert_ranks_last(method, model_type):
    model = _never_routed(tiny_model(model_type), layer=0, expert=2)
    adapter = FamilyAdapter(model)
    calibration = torch.randint(0, model.config.vocab_size, (4, 16))
    scores = expert_importance(adapter, calibration, batch_size=2, method=method)
    assert scores[0][2] == 0
    assert (scores[0][[0, 1, 3]] > 0).all()
    assert all((s > 0).sum() >= 2 for s in scores[1:])  # the other layers route tokens to at least top-k experts


def test_importance_is_none_for_dense_layers():
    adapter = FamilyAdapter(tiny_model("qwen3_moe"))
    scores = expert_importance(adapter, torch.randint(0, 128, (2, 8)), batch_size=2, method="routed")
    assert [s is None for s in scores] == [False, True, False]


def test_costs_count_kept_experts_in_memory_and_active_experts_in_time():
    adapter = FamilyAdapter(tiny_model("mixtral"))
    shape = adapter.shape(0)
    parent, kept = shape.ffn, FfnSpec(FfnKind.moe, num_experts=2, experts_per_token=2)
    module = init_ffn(parent, adapter.parent_layer(0))
    assert parameters(parent, shape) == sum(p.numel() for p in module.parameters())
    assert parameters(kept, shape) < parameters(parent, shape)
    # Top-2 of 2 or of 4: the same experts per token, so the same active parameters and the same one-token time.
    assert active_parameters(kept, shape) + 2 * shape.hidden_size == active_parameters(parent, shape)
    one = Scenario(batch_size=1, prefill_length=16, decode_length=4)
    assert decode_work(kept, shape, one).flops == pytest.approx(decode_work(parent, shape, one).flops, rel=0.01)
    many = Scenario(batch_size=64, prefill_length=16, decode_length=4)
    assert decode_work(kept, shape, many).bytes < decode_work(parent, shape, many).bytes  # a big batch reads all experts


def test_moe_ids_round_trip():
    spec = FfnSpec(FfnKind.moe, num_experts=4, experts_per_token=2)
    assert spec.id == "ffn.moe4.top2" and spec_from_id(spec.id) == spec
    with pytest.raises(ValueError):
        FfnSpec(FfnKind.moe, num_experts=2, experts_per_token=3)


@pytest.mark.parametrize("library, message", [
    ({"experts": [1]}, "library.experts: 1 is outside 2..4"),
    ({"experts": [8]}, "library.experts: 8 is outside 2..4"),
    ({"experts_per_token": [3]}, "library.experts_per_token: 3 is more than the parent's 2 experts per token"),
])
def test_bad_library_experts_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path, moe_parent_dir, library, message):
    path = pipeline_job(tmp_path, moe_parent_dir, library=library)
    code, (_, err) = cli(monkeypatch, capsys, "run", path)
    assert_clean_failure(code, err, tmp_path, message)
    assert sum(message in line for line in err.splitlines()) == 1


def test_library_experts_on_a_dense_parent_is_an_error(monkeypatch, capsys, tmp_path, tiny_parent_dir):
    code, (_, err) = cli(monkeypatch, capsys, "run", pipeline_job(tmp_path, tiny_parent_dir, library={"experts": [2]}))
    assert_clean_failure(code, err, tmp_path, "library.experts: the parent has no MoE layers")


@pytest.fixture(scope="module")
def moe_job(tmp_path_factory, moe_parent_dir):
    config = load_config(write_job(tmp_path_factory.mktemp("moe"), moe_parent_dir), PIPELINE)
    distill_stage(config)
    score_stage(config)
    profile_stage(config)
    return config


def test_pipeline_library_scores_and_profile_have_the_kept_experts(moe_job):
    import pandas as pd

    run = moe_job.run.dir
    table = pd.read_csv(run / "library/table.csv")
    assert sorted(table.subblocks[table.subblocks.str.startswith("ffn")].unique()) == ["ffn.moe2.top2"]
    assert (table[table.subblocks == "ffn.moe2.top2"].init == "most important experts").all()
    scores = pd.read_csv(run / "scores/scores.csv")
    assert set(scores.ffn) == {"ffn.moe4.top2", "ffn.moe2.top2"}
    profile = pd.read_csv(run / "profile/profile.csv")
    rows = profile[profile.subblock == "ffn"]
    assert set(zip(rows.candidate, rows.experts)) == {("ffn.moe4.top2", 4), ("ffn.moe2.top2", 2)}
    assert (profile[profile.subblock == "attention"].experts == 0).all()


def test_search_meets_an_experts_budget_with_fewer_experts_in_some_layers(moe_job):
    outcome = search_stage(moe_job, ["experts=9"])
    [usage] = [u for k, u in outcome.solutions[0].usage.items() if k == "experts"]
    assert usage.used <= 9 < 12  # the parent keeps 3 × 4 experts
    ffns = [layer.choice.ffn.id for layer in outcome.solutions[0].layers]
    assert "ffn.moe2.top2" in ffns and "ffn.moe4.top2" in ffns


def test_active_params_budget_is_met_by_removing_router_rows_only(moe_job):
    outcome = search_stage(moe_job, ["active_params=0.9999x"])
    usage = outcome.solutions[0].usage["active_params"]
    assert usage.used <= usage.limit < usage.parent


def test_child_keeping_all_experts_equals_the_parent(moe_job, moe_parent_dir):
    summary = with_solution(moe_job, ["attention.kv2+ffn.moe4.top2"] * 3)
    child = AutoModelForCausalLM.from_pretrained(summary.directory, trust_remote_code=True).eval()
    parent = MixtralForCausalLM.from_pretrained(moe_parent_dir).eval()
    ids = torch.randint(0, parent.config.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(child(input_ids=ids).logits, parent(input_ids=ids).logits, atol=ATOL, rtol=0)
    assert summary.parameters == summary.parent_parameters


def test_searched_child_with_mixed_expert_counts_loads_and_generates(moe_job):
    search_stage(moe_job, ["experts=9"])
    summary = realize_stage(moe_job, 0)
    config = json.loads((summary.directory / "config.json").read_text())
    counts = [b["ffn"]["moe"]["num_local_experts"] for b in config["block_configs"]]
    assert sum(counts) <= 9 and 2 in counts and 4 in counts
    child = AutoModelForCausalLM.from_pretrained(summary.directory, trust_remote_code=True).eval()
    assert [layer.mlp.num_experts for layer in child.model.layers] == counts
    ids = torch.randint(0, child.config.vocab_size, (1, 6))
    with torch.no_grad():
        out = child.generate(ids, max_new_tokens=5, do_sample=False)
        no_cache = child.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False)
    assert out.shape == (1, 11) and torch.equal(out, no_cache)
    verdicts = {e.engine: e for e in summary.engines}
    assert not verdicts["vLLM"].servable and not verdicts["llama.cpp"].servable
    assert any("MoE FFN with 2 experts" in r for r in verdicts["vLLM"].reasons)


def test_gpt_oss_experts_keep_their_biases_and_clamp():
    adapter = FamilyAdapter(tiny_model("gpt_oss"))
    parent = adapter.parent_layer(0)
    module = init_ffn(FfnSpec(FfnKind.moe, num_experts=2, experts_per_token=2), parent, torch.tensor([0.1, 3.0, 0.2, 2.0]))
    torch.testing.assert_close(module.gate.bias, parent.ffn.router.bias[[1, 3]])
    torch.testing.assert_close(module.experts.down_proj_bias, parent.ffn.experts.down_proj_bias[[1, 3]])
    # The parent's gate/up columns alternate; the child's first half holds the gates.
    torch.testing.assert_close(module.experts.gate_up_proj_bias[0, :96], parent.ffn.experts.gate_up_proj_bias[1, ::2])
    h = torch.randn(2, 20, adapter.config.hidden_size)
    whole = init_ffn(parent.shape.ffn, parent)
    with torch.no_grad():
        expected = adapter.ffn_delta(0, h)
        torch.testing.assert_close(whole(h), expected, atol=ATOL, rtol=0)
        whole.experts.swiglu_limit = 1e9  # the same activation unclamped: the tiny parent's low limit does clamp
        assert not torch.allclose(whole(h), expected, atol=1e-3)


@pytest.fixture(scope="module")
def gpt_oss_parent_dir(tmp_path_factory):
    """A tiny GPT-OSS (sliding / full / sliding layers, 4 experts, top-2, sinks, biases, YaRN)."""
    return _parent_dir(tmp_path_factory, "gpt_oss")


def test_gpt_oss_parent_with_mxfp4_experts_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path, gpt_oss_parent_dir):
    """Where transformers keeps a released checkpoint's MXFP4 experts packed, the experts have no plain weights."""
    from transformers.models.gpt_oss import modeling_gpt_oss

    def packed_init(self, config):
        torch.nn.Module.__init__(self)
        self.gate_up_proj_blocks = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    monkeypatch.setattr(modeling_gpt_oss.GptOssExperts, "__init__", packed_init)
    monkeypatch.setattr(modeling_gpt_oss.GptOssPreTrainedModel, "_init_weights", lambda self, module: None)
    code, (_, err) = cli(monkeypatch, capsys, "run", pipeline_job(tmp_path, gpt_oss_parent_dir))
    assert code == 2 and "Traceback" not in err
    assert "holds its experts in MXFP4; load it with Mxfp4Config(dequantize=True)" in err


def test_gpt_oss_child_with_a_window_converted_layer_keeps_its_sinks_and_generates(tmp_path_factory, gpt_oss_parent_dir):
    """GPT-OSS: sliding (8) / full / sliding layers. Only a window on the full layer brings the KV cache to 0.6x
    (20 cached tokens there of 36 in all), so the search must convert it; the child must keep every sink."""
    parent_dir = gpt_oss_parent_dir
    options = [o for o in PIPELINE if not o.startswith("library.windows")] + ["library.windows=[4]"]
    config = load_config(write_job(tmp_path_factory.mktemp("gpt_oss"), parent_dir), options)
    distill_stage(config)
    score_stage(config)
    profile_stage(config)
    search_stage(config, ["kv=0.6x"])
    summary = realize_stage(config, 0)
    blocks = json.loads((summary.directory / "config.json").read_text())["block_configs"]
    assert blocks[1]["attention"]["window_length"] == 4
    child = AutoModelForCausalLM.from_pretrained(summary.directory, trust_remote_code=True).eval()
    parent = AutoModelForCausalLM.from_pretrained(parent_dir).eval()
    assert child.config.attention_sinks and child.model.layers[1].self_attn.window == 4
    library = Library(config.run.dir / "library", FamilyAdapter(parent))
    for i, choice in enumerate(summary.choices):
        sinks = child.model.layers[i].self_attn.sinks
        if choice.attention == FamilyAdapter(parent).shape(i).attention:
            torch.testing.assert_close(sinks, parent.model.layers[i].self_attn.sinks, atol=0, rtol=0)
        else:  # started from the parent's sinks, then trained by BLD with the rest of the window attention
            torch.testing.assert_close(sinks, library.module(i, choice.attention).sinks, atol=0, rtol=0)
    ids = torch.randint(0, child.config.vocab_size, (1, 10))  # longer than every window: the cache must drop keys
    with torch.no_grad():
        out = child.generate(ids, max_new_tokens=8, do_sample=False)
        no_cache = child.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert out.shape == (1, 18) and torch.equal(out, no_cache)
    verdicts = {e.engine: e for e in summary.engines}
    assert any("attention sinks" in r for r in verdicts["vLLM"].reasons)


def test_report_labels_kept_experts_and_shades_by_the_fraction_kept():
    from puzzle.stages.report import _label

    def label(spec: str, parent: str):
        return _label(spec_from_id(spec), spec_from_id(parent))

    text, shade = label("ffn.moe2.top2", "ffn.moe8.top2")
    assert text == "2 of 8\nexperts"
    assert label("ffn.moe6.top2", "ffn.moe8.top2")[1] > shade > label("ffn.noop", "ffn.moe8.top2")[1]
    fewer = label("ffn.moe2.top1", "ffn.moe8.top2")
    assert fewer[0] == "2 of 8\nexperts, top 1" and shade > fewer[1] > label("ffn.noop", "ffn.moe8.top2")[1]


@pytest.mark.slow
def test_puzzle_run_takes_a_gpt_oss_parent_to_a_distilled_child_and_a_report(monkeypatch, capsys, tmp_path,
                                                                              gpt_oss_parent_dir):
    path = pipeline_job(tmp_path, gpt_oss_parent_dir, library={"windows": [4], "experts": [2]},
                        profile={"device": "h100"}, search={"budgets": {"kv": "0.6x", "experts": "0.75x"}},
                        eval={"kv_dtype": "fp8", "speed_repeats": 1, "speed_warmup": 0})
    code, (out, err) = cli(monkeypatch, capsys, "run", path)
    assert code == 0, err
    results = json.loads((tmp_path / "run/eval/results.json").read_text())
    models = {m["name"]: m for m in results["models"]}
    assert set(models) == {"parent", "child", "child + KD"}
    assert all(m["kl"] >= 0 and m["kv_fp8_added_kl"] is not None for m in models.values())
    assert models["child"]["parameters"] < models["parent"]["parameters"]
    assert (tmp_path / "run/report/report.html").is_file()
