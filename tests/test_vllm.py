"""Every vLLM verdict against vLLM itself (its CPU build, installed by the test extra on x86-64 Linux).

One child per verdict rule and per family is realized with random weights (scripts/engine_check.py's cases,
plus an MoE child, FP8 KV scales and a child the pipeline chose for `target.engine: vllm`); all of them run in
one vLLM worker (`puzzle.vllm_engine`), and each "servable" child must match transformers on the shipped
text: log-probabilities within 1e-4 in fp32, argmax agreement 1.0. Each "not servable" child must be one vLLM
refuses or computes wrongly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from puzzle.vllm_engine import VllmModel, agreement, run_in_vllm, vllm_unavailable
from tests.helpers import engine_check_module

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(vllm_unavailable() is not None, reason=vllm_unavailable() or "")]

ROOT = Path(__file__).resolve().parent.parent
KEPT, WIDE = "attention.kv2", "ffn.i512"
# Beyond engine_check's cases: rules of place that engine_check's 4-layer children do not reach.
EXTRA_CASES = {
    "first layer removed whole, then attention removed": ["attention.noop+ffn.noop", f"attention.noop+{WIDE}",
                                                          f"{KEPT}+{WIDE}", f"{KEPT}+{WIDE}"],
    "first layer removed whole, then a kept layer": ["attention.noop+ffn.noop", f"{KEPT}+{WIDE}", f"{KEPT}+{WIDE}",
                                                     f"{KEPT}+{WIDE}"],
}
# Families whose head size vLLM's CPU attention does not take: the CPU build's own rule.
CPU_FAMILIES = {"llama, head_dim 16": ("llama", {"head_dim": 16}, "byte-fallback")}


class Case:
    def __init__(self, name: str, directory: Path, config, model, kind: str, kv_cache_dtype: str = "auto"):
        self.name, self.directory, self.config, self.model, self.kind = name, directory, config, model, kind
        self.kv_cache_dtype = kv_cache_dtype


def _moe_case(work: Path, engine_check) -> Case:
    """A Mixtral parent's child with its own (sparse) FFNs: the DeciLM layout's `moe` entry is the project's own."""
    tok = engine_check.tokenizer("byte-fallback")
    hf_config = engine_check.parent_config("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}, len(tok))
    blocks = [f"{KEPT}+ffn.moe4.top2"] * 4
    config, model = engine_check.realize(work / "moe", hf_config, blocks, tok)
    return Case("MoE FFN (Mixtral)", work / "moe", config, model, "byte-fallback")


def _fp8_case(work: Path, engine_check, tokens: list[int]) -> Case:
    """The parent's own blocks with calibrated FP8 K/V scales stored where vLLM reads them."""
    from puzzle.kv_fp8 import calibrate_kv_scales, store_kv_scales

    tok = engine_check.tokenizer("byte-fallback")
    config, model = engine_check.realize(work / "fp8", engine_check.parent_config("llama", {}, len(tok)),
                                         engine_check.CASES["parent's own blocks"], tok)
    scales = calibrate_kv_scales(model, blocks=torch.tensor([tokens]), batch_size=1)
    store_kv_scales(work / "fp8", scales)
    model.set_kv_fp8_scales(scales.pairs())  # the reference: the simulated E4M3 cache
    return Case("FP8 KV scales", work / "fp8", config, model, "byte-fallback", kv_cache_dtype="fp8")


ENGINE_CHECK = engine_check_module()
NAMES = [*ENGINE_CHECK.CASES, *EXTRA_CASES, *ENGINE_CHECK.FAMILIES, *CPU_FAMILIES, "MoE FFN (Mixtral)"]
# vLLM's CPU build runs an FP8 KV cache only with AVX-512 or AMX (`_get_attn_isa`).
FP8_CPU = torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()


@pytest.fixture(scope="module")
def engine_check():
    return ENGINE_CHECK


@pytest.fixture(scope="module")
def ran(tmp_path_factory, engine_check):
    """Every case realized and run in vLLM: {name: (case, tokens, reference logits, vLLM's result)}."""
    work = tmp_path_factory.mktemp("vllm")
    runs = engine_check.children({**engine_check.CASES, **EXTRA_CASES}, {**engine_check.FAMILIES, **CPU_FAMILIES})
    tokens = {k: engine_check.tokenizer(k)(engine_check.TEXT[:2000])["input_ids"][:96]
              for k in ("byte-fallback", "byte-level")}
    cases = []
    for i, (name, family, extra, kind, blocks) in enumerate(runs):
        tok = engine_check.tokenizer(kind)
        config, model = engine_check.realize(work / f"child{i}", engine_check.parent_config(family, extra, len(tok)),
                                             blocks, tok)
        cases.append(Case(name, work / f"child{i}", config, model, kind))
    cases += [_moe_case(work, engine_check), _fp8_case(work, engine_check, tokens["byte-fallback"])]
    out = {}
    for kind in tokens:
        mine = [c for c in cases if c.kind == kind]
        results = run_in_vllm([VllmModel(c.name, c.directory, True, c.kv_cache_dtype) for c in mine], tokens[kind],
                              work=work / f"worker-{kind}")
        for case, result in zip(mine, results):
            with torch.no_grad():
                reference = case.model(torch.tensor([tokens[kind]])).logits[0].float()
            out[case.name] = (case, tokens[kind], reference, result)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_the_vllm_cpu_verdict_is_what_vllm_does(ran, name):
    from puzzle.engines import VLLM_CPU, servability

    case, tokens, reference, result = ran[name]
    [verdict] = [v for v in servability(case.config) if v.engine == VLLM_CPU]
    if verdict.servable:
        assert result.error is None, f"called servable, but vLLM refused it: {result.error}"
        check = agreement(result, reference, tokens)
        assert check.matches, check
    else:
        refused = result.error is not None
        assert refused or not agreement(result, reference, tokens).matches, \
            f"called not servable ({verdict.reasons}), but vLLM matches transformers"


def test_stored_fp8_kv_scales_run_in_vllm_as_the_simulated_fp8_cache(ran):
    *_, result = ran["FP8 KV scales"]
    if not FP8_CPU:
        assert result.error and "AVX-512 or AMX" in result.error
        pytest.skip("vLLM's CPU build runs an FP8 KV cache only with AVX-512 or AMX; this CPU has neither")
    case, tokens, reference, result = ran["FP8 KV scales"]
    check = agreement(result, reference, tokens)  # vLLM's E4M3 rounding against the simulated one, same scales
    assert check.argmax_agreement >= 0.97 and check.mean_logprob_error < 1e-2, check


def test_a_refusal_is_vllms_own_message_and_the_rest_still_run(ran):
    *_, refused = ran["linear FFN"]
    assert refused.error and "Error" in refused.error
    *_, after = ran["qwen3 (q/k norms)"]  # the worker started again after each refusal
    assert after.error and "k_norm" in after.error
    *_, off_grid = ran["FFN off the grid"]  # written without ffn_mult: vLLM reads the width itself
    assert off_grid.error is None


def test_the_shipped_parent_matches_transformers_in_vllm(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parent = ROOT / "examples/parent"
    tokens = AutoTokenizer.from_pretrained(parent)((ROOT / "examples/data/shakespeare/sonnets.txt").read_text()[:3000])
    tokens = tokens["input_ids"][:128]
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32).eval()  # stored in bf16
        reference = model(torch.tensor([tokens])).logits[0]
    [result] = run_in_vllm([VllmModel("parent", parent, trust_remote_code=False)], tokens, work=tmp_path)
    assert agreement(result, reference, tokens).matches


@pytest.fixture(scope="module")
def vllm_parent(tmp_path_factory):
    """Head size 32: one vLLM's CPU build takes."""
    from tests.helpers import grid_llama

    return grid_llama(tmp_path_factory.mktemp("vllm_parent"), hidden_size=128, max_position_embeddings=256)


def test_eval_in_vllm_checks_and_times_a_child_searched_for_vllm(tmp_path, vllm_parent, monkeypatch, capsys):
    from puzzle.api import realize_stage, search_stage
    from puzzle.rundir import RunDir, Stage
    from tests.helpers import FAST, cli, scored_job

    overrides = FAST + ["target.engine=vllm", "library.ffn_fractions=[0.5]", "library.linear_attention=true",
                        "search.budgets={params: 0.8x}"]
    path, config = scored_job(tmp_path, vllm_parent, overrides)
    search_stage(config)
    child = realize_stage(config)
    assert [v.servable for v in child.engines if v.engine == "vLLM"] == [True]
    code, (shown, _) = cli(monkeypatch, capsys, "eval", path, *sum((["--set", o] for o in overrides), []),
                           "--engine", "vllm")
    assert code == 0
    saved = json.loads((RunDir.of(config).stage_dir(Stage.eval) / "vllm.json").read_text())
    runs = {r["name"]: r for r in saved["runs"]}
    for name in ("parent", "child"):
        assert runs[name]["error"] is None and runs[name]["max_logprob_error"] <= 1e-4, runs[name]
        assert runs[name]["argmax_agreement"] == 1.0 and runs[name]["decode_tokens_per_second"] > 0
    assert "vLLM: " in shown and "decode speedup" in shown


# The shipped hybrid parent: Mamba, MLP, Mamba, attention, Mamba, MoE, Mamba, MLP.
HYBRID_OWN = ["attention.mamba8+ffn.noop", "attention.noop+ffn.i256", "attention.mamba8+ffn.noop",
              "attention.kv2+ffn.noop", "attention.mamba8+ffn.noop", "attention.noop+ffn.moe4.top2",
              "attention.mamba8+ffn.noop", "attention.noop+ffn.i256"]
HYBRID_CASES = {
    "hybrid, the parent's own blocks (an MoE layer)": HYBRID_OWN,
    "hybrid without its MoE layer": [*HYBRID_OWN[:5], "attention.noop+ffn.noop", *HYBRID_OWN[6:]],
    "hybrid without attention or MoE": [*HYBRID_OWN[:3], "attention.noop+ffn.noop", HYBRID_OWN[4], "attention.noop+ffn.noop",
                                        *HYBRID_OWN[6:]],
    "hybrid, a Mamba layer with fewer heads": ["attention.mamba4+ffn.noop", *HYBRID_OWN[1:5], "attention.noop+ffn.noop",
                                               *HYBRID_OWN[6:]],
}


def test_hybrid_children_in_vllms_cpu_build_are_what_its_verdict_says(tmp_path):
    """vLLM's CPU build refuses Nemotron-H's MoE and a Mamba layer with fewer heads, and computes a hybrid
    without MoE apart from transformers: its verdict calls no hybrid child servable, and each is checked."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from puzzle.blocks.hybrid import hybrid_child_state
    from puzzle.blocks.specs import BlockChoice
    from puzzle.checkpoint import child_config, write_child
    from puzzle.engines import VLLM_CPU, servability
    from puzzle.families import parent_shapes

    source = ROOT / "examples/hybrid_parent"
    parent = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()  # stored in bf16
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokens = tokenizer((ROOT / "examples/data/shakespeare/sonnets.txt").read_text()[:3000])["input_ids"][:96]
    models, references, verdicts = [], {}, {}
    for i, (name, blocks) in enumerate(HYBRID_CASES.items()):
        choices = [BlockChoice.from_id(b) for b in blocks]
        config = child_config(parent.config, choices)
        state = hybrid_child_state(parent, choices, parent_shapes(parent.config))
        write_child(tmp_path / f"hybrid{i}", config, state.items(), dtype=torch.float32, tokenizer=tokenizer,
                    generation_config=None, info={"layers": []})
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / f"hybrid{i}", trust_remote_code=True).eval()
        with torch.no_grad():
            references[name] = loaded(torch.tensor([tokens])).logits[0].float()
        [verdicts[name]] = [v for v in servability(config) if v.engine == VLLM_CPU]
        models.append(VllmModel(name, tmp_path / f"hybrid{i}", trust_remote_code=True))
    results = {r.name: r for r in run_in_vllm(models, tokens, work=tmp_path / "worker")}
    assert "is_act_and_mul=False" in results["hybrid, the parent's own blocks (an MoE layer)"].error
    assert "exceeds dimension size" in results["hybrid, a Mamba layer with fewer heads"].error
    assert "IndexError" in results["hybrid without attention or MoE"].error
    apart = agreement(results["hybrid without its MoE layer"], references["hybrid without its MoE layer"], tokens)
    assert not apart.matches and apart.argmax_agreement > 0.95, apart  # it runs, close but not within 1e-4
    for name, verdict in verdicts.items():
        assert not verdict.servable and any("Nemotron-H" in r for r in verdict.reasons), (name, verdict.reasons)
