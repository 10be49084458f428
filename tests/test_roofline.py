"""The analytic (roofline) profile needs only the parent's config, and says whether the parent fits the GPUs."""

import pytest
from transformers import LlamaConfig

import puzzle.stages.profile as profile_stage_module
from puzzle.api import profile_stage
from puzzle.config import validate
from puzzle.distill.library import LayerSpace
from puzzle.families import FamilyAdapter, parent_shapes
from puzzle.profiling import cost_rows, fixed_parameters, parent_fit
from tests.helpers import copy_run
from tests.tiny import VARIANTS, tiny_model

# Llama-3.1-70B's shape (its config.json's sizes): 70.6 B parameters.
LLAMA_70B = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072)


def test_an_analytic_profile_loads_no_weights(fast_library, tmp_path, monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("the roofline loaded the parent's weights")

    monkeypatch.setattr(profile_stage_module, "load_parent", refuse)
    _, config = copy_run(fast_library, tmp_path, ["profile.device=h100", "profile.prefill_length=16",
                                                   "profile.decode_length=4"])
    summary = profile_stage(config)
    assert summary.rows[0].method == "analytic" and summary.fit is not None and summary.fit.fits


@pytest.mark.parametrize("model_type, overrides", VARIANTS)
def test_fixed_parameters_from_the_config_equal_the_modules(model_type, overrides):
    model = tiny_model(model_type, **overrides)
    outside = [model.model.embed_tokens, model.model.norm] + ([] if model.config.tie_word_embeddings else [model.lm_head])
    assert fixed_parameters(model.config) == sum(p.numel() for m in outside for p in m.parameters())
    assert FamilyAdapter(model).shapes == parent_shapes(model.config)


@pytest.mark.parametrize("gpus, fits", [(1, False), (2, True)])
def test_a_70b_parent_does_not_fit_one_h100_and_fits_two(gpus, fits):
    config = validate({"parent": {"path": "llama-70b"}, "data": {"files": ["x.txt"]},
                       "profile": {"device": "h100", "gpus": gpus}})
    shapes = parent_shapes(LLAMA_70B)
    space = [LayerSpace([s.attention], [s.ffn], []) for s in shapes]
    rows = cost_rows(config, shapes, space, config.profile.scenario, LLAMA_70B)
    fit = parent_fit(rows, shapes, "h100", gpus)
    params = sum(r.params for r in rows if r.layer >= 0) + fixed_parameters(LLAMA_70B)
    assert params == pytest.approx(70.55e9, rel=1e-3)
    assert fit.weight_bytes == pytest.approx(2 * params)  # bf16
    assert fit.fits is fits and ("does NOT fit" in fit.describe()) is not fits
