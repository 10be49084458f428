"""Cost model: exact counts, KV rules, roofline monotonicity, measured profile on the tiny library."""

from dataclasses import replace

import pytest
import torch

from puzzle.blocks.costs import Scenario, active_parameters, decode_work, kv_cache_bytes, parameters, prefill_work
from puzzle.errors import PuzzleError
from puzzle.blocks.init import init_attention, init_ffn
from puzzle.blocks.specs import AttentionKind, AttentionSpec, FfnKind, FfnSpec, ParentShape
from puzzle.api import distill_stage
from puzzle.families import FamilyAdapter
from puzzle.api import profile_stage
from puzzle.search.hardware import GPUS, gpu
from puzzle.search.profile import analytic_times
from tests.helpers import copy_run
from tests.tiny import VARIANTS, tiny_model

# hidden 48, 6 heads of 8, 2 KV heads, FFN 96 (tests/tiny.py)
SHAPE = ParentShape(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=8, intermediate_size=96)
SCENARIO = Scenario(batch_size=2, prefill_length=100, decode_length=28)


def test_parameter_counts_by_hand():
    assert parameters(SHAPE.attention, SHAPE) == 48 + 48 * 48 + 2 * 48 * 16 + 48 * 48  # norm, q, k, v, o
    assert parameters(AttentionSpec(AttentionKind.attention, 1), SHAPE) == 48 + 48 * 48 + 2 * 48 * 8 + 48 * 48
    assert parameters(AttentionSpec(AttentionKind.linear), SHAPE) == 48 * 48 + 48
    assert parameters(FfnSpec(FfnKind.dense, 32), SHAPE) == 48 + 3 * 48 * 32
    assert parameters(FfnSpec(FfnKind.noop), SHAPE) == 0


@pytest.mark.parametrize("model_type, overrides", VARIANTS)
def test_parameter_counts_match_the_modules(model_type, overrides):
    adapter = FamilyAdapter(tiny_model(model_type, **overrides))
    parent = adapter.parent_layer(0)
    for spec in (parent.shape.attention, AttentionSpec(AttentionKind.attention, 1), AttentionSpec(AttentionKind.linear)):
        module = init_attention(spec, parent)
        assert parameters(spec, parent.shape) == sum(p.numel() for p in module.parameters())
    kept = FfnSpec(FfnKind.moe, num_experts=2, experts_per_token=2) if parent.shape.is_moe else FfnSpec(FfnKind.linear)
    for spec in (parent.shape.ffn, kept):
        module = init_ffn(spec, parent, torch.arange(4.0) if parent.shape.is_moe else None)
        assert parameters(spec, parent.shape) == sum(p.numel() for p in module.parameters())
        assert active_parameters(spec, parent.shape) <= parameters(spec, parent.shape)


def test_kv_bytes_by_hand_and_rules():
    bf16 = kv_cache_bytes(SHAPE.attention, SHAPE, SCENARIO)
    assert bf16 == 2 * 2 * 8 * 2 * 2 * 128  # K and V, 2 heads, dim 8, 2 bytes, batch 2, 128 tokens
    fp8 = Scenario(2, 100, 28, kv_dtype="fp8")
    assert kv_cache_bytes(SHAPE.attention, SHAPE, fp8) == bf16 / 2
    window = AttentionSpec(AttentionKind.attention, 2, 32)
    assert kv_cache_bytes(window, SHAPE, SCENARIO) == bf16 * 32 / 128
    assert kv_cache_bytes(AttentionSpec(AttentionKind.linear), SHAPE, SCENARIO) == 0
    assert kv_cache_bytes(AttentionSpec(AttentionKind.noop), SHAPE, SCENARIO) == 0
    assert kv_cache_bytes(FfnSpec(FfnKind.dense, 96), SHAPE, SCENARIO) == 0


def test_roofline_is_monotone_in_sizes():
    big = ParentShape(4096, 32, 8, 128, 14336)
    for g in GPUS.values():
        sizes = [FfnSpec(FfnKind.dense, n) for n in (1024, 4096, 8192, 14336)]
        times = [analytic_times(s, big, Scenario(8, 2048, 256), g) for s in sizes]
        assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(times, times[1:]))
        kv = [analytic_times(AttentionSpec(AttentionKind.attention, k), big, Scenario(8, 2048, 256), g) for k in (1, 2, 4, 8)]
        assert all(a[1] <= b[1] for a, b in zip(kv, kv[1:]))
    for batch in (1, 8, 64):
        work = [decode_work(FfnSpec(FfnKind.dense, 14336), big, Scenario(b, 128, 128)) for b in (batch, batch * 2)]
        assert work[0].flops < work[1].flops
    assert prefill_work(AttentionSpec(AttentionKind.attention, 8, 256), big, Scenario(1, 4096, 1)).flops < prefill_work(
        AttentionSpec(AttentionKind.attention, 8), big, Scenario(1, 4096, 1)).flops


def test_unknown_device_and_fp8_on_a100():
    with pytest.raises(PuzzleError, match="unknown device 'tpu'; known: local, h100"):
        gpu("tpu")
    with pytest.raises(PuzzleError, match="no FP8"):
        gpu("a100").peak_flops("fp8")
    with pytest.raises(ValueError):
        Scenario(1, 0, 1)


@pytest.fixture(scope="module")
def tiny_library(tmp_path_factory, fast_library):
    # The session's library alone (not its scores or profile): the tests here measure their own profiles.
    _, config = copy_run(fast_library, tmp_path_factory.mktemp("profile"), ["bld.tokens_per_candidate=64"])
    distill_stage(config)  # checked and reused
    return config


def test_measured_profile_rows(tiny_library):
    config = load_config_with(tiny_library, ["profile.weight_dtype=float32", "profile.repeats=3", "profile.warmup=1",
                                              "profile.prefill_length=16", "profile.decode_length=4"])
    summary = profile_stage(config, check_models=1)
    rows = {(r.layer, r.candidate): r for r in summary.rows}
    assert rows[(-1, "embeddings+norm+lm_head")].subblock == "fixed"
    assert rows[(0, "attention.noop")].prefill_seconds < rows[(0, "attention.kv2")].prefill_seconds
    assert rows[(0, "attention.kv2")].kv_bytes == 2 * 2 * 8 * 2 * 1 * 20  # bf16 cache, 20 tokens
    assert all(r.method == "measured" for r in summary.rows)
    assert {c.model for c in summary.checks} == {"parent", "random child 1"} and len(summary.checks) == 4
    assert (config.run.dir / "profile/profile.csv").is_file()


def test_analytic_profile_for_an_absent_gpu(tiny_library):
    config = load_config_with(tiny_library, ["profile.device=h100", "profile.weight_dtype=fp8", "profile.kv_dtype=fp8"])
    summary = profile_stage(config)
    assert {r.method for r in summary.rows} == {"analytic"} and summary.device == "h100"
    rows = {(r.layer, r.candidate): r for r in summary.rows}
    assert rows[(1, "ffn.i48")].decode_seconds < rows[(1, "ffn.i96")].decode_seconds


def load_config_with(config, overrides):
    import yaml

    from puzzle.config import apply_overrides, validate

    return validate(apply_overrides(yaml.safe_load(yaml.safe_dump(config.model_dump(mode="json"))), overrides))


def _row(layer, subblock, candidate, prefill, decode, spread=0.1, method="measured"):
    from puzzle.search.profile import CostRow

    return CostRow(layer=layer, subblock=subblock, candidate=candidate, params=1, experts=0, active_params=1,
                   weight_bytes=1.0, kv_bytes=0.0, prefill_seconds=prefill, decode_seconds=decode,
                   prefill_median=prefill, decode_median=decode, prefill_spread=spread, decode_spread=spread,
                   method=method, device="cpu")


def test_unreliable_rows_are_wide_spreads_zero_times_and_pruned_blocks_slower_than_the_parent():
    from puzzle.profiling import unreliable_rows

    shape = ParentShape(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64)
    scenario = Scenario(batch_size=1, prefill_length=16, decode_length=4)
    rows = [
        _row(0, "attention", "attention.kv2", 1.0, 0.1), _row(0, "attention", "attention.kv1", 2.0, 0.2),
        _row(0, "attention", "attention.noop", 0.0, 0.0), _row(0, "ffn", "ffn.i64", 1.0, 0.1),
        _row(0, "ffn", "ffn.i32", 0.5, 0.0), _row(0, "ffn", "ffn.i16", 0.4, 0.04, spread=3.0),
        _row(-1, "fixed", "embeddings+norm+lm_head", 1.0, 0.1),
    ]
    found = unreliable_rows(rows, [shape], scenario)
    assert set(found) == {(0, "attention.kv1"), (0, "ffn.i32"), (0, "ffn.i16")}
    assert "2.00x the parent's attention.kv2" in found[(0, "attention.kv1")]
    assert "zero" in found[(0, "ffn.i32")] and "spread 300%" in found[(0, "ffn.i16")]
    assert unreliable_rows([replace(r, method="analytic") for r in rows], [shape], scenario) == {}
    # The parent's own subblock timed zero (a difference of timings under load): no ratio to take.
    zero_own = [replace(r, prefill_seconds=0.0, decode_seconds=0.0) if r.candidate == "attention.kv2" else r for r in rows]
    found = unreliable_rows(zero_own, [shape], scenario)
    assert "the parent's attention.kv2, which it prunes, timed zero" in found[(0, "attention.kv1")]
    assert "zero" in found[(0, "attention.kv2")]


@pytest.mark.parametrize("stays_bad", [False, True])
def test_a_suspect_row_is_measured_again_and_marked_only_if_it_stays_wrong(tiny_library, tmp_path, monkeypatch,
                                                                          stays_bad):
    import puzzle.profiling as profiling
    from puzzle.search.timing import Timing

    _, config = copy_run(tiny_library, tmp_path, ["bld.tokens_per_candidate=64", "profile.weight_dtype=float32",
                                                  "profile.repeats=2", "profile.warmup=0", "profile.prefill_length=8",
                                                  "profile.decode_length=2"])
    from puzzle.distill.library import Library

    space = Library(config.run.dir / "library", None).layers[0]
    target = next(s for s in space.ffn if not s.removed and s.id != space.ffn[0].id)  # a pruned FFN of layer 0
    real, calls = profiling._times, []

    def times(config, parent, shape, layer, spec, scenario, dtype, repeats):
        if spec == target and layer == 0:
            calls.append(repeats)
            # Zero (suspect), then zero again or a clean tiny time: the real one of a module this small is noise.
            t = 0.0 if stays_bad or len(calls) == 1 else 1e-9
            return Timing(t, t, 0.0), Timing(t, t, 0.0)
        return real(config, parent, shape, layer, spec, scenario, dtype, repeats)

    monkeypatch.setattr(profiling, "_times", times)
    rows = {(r.layer, r.candidate): r for r in profile_stage(config).rows}
    assert calls == [2, 4]  # measured again with twice the repeats
    assert (rows[(0, target.id)].unreliable != "") == stays_bad


def test_the_search_refuses_an_unreliable_profile_unless_allowed(fast_scored, tmp_path):
    import pandas as pd

    from puzzle.api import search_stage

    _, config = copy_run(fast_scored, tmp_path, ["search.allow_unreliable_profile=false",
                                                "search.budgets.params=0.8x"])
    table = config.run.dir / "profile/profile.csv"
    frame = pd.read_csv(table, keep_default_na=False)
    frame["unreliable"] = ""  # whatever this machine's noise marked: the test marks one row itself
    frame.loc[1, "unreliable"] = "repeats spread 900%"
    frame.to_csv(table, index=False)
    with pytest.raises(PuzzleError, match=r"profile: 1 measured cost\(s\) stayed unreliable .*repeats spread 900%.*"
                                          "allow_unreliable_profile"):
        search_stage(config)
    allowed = load_config_with(config, ["search.allow_unreliable_profile=true"])
    assert search_stage(allowed).solutions
