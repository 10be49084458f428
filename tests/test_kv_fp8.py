"""FP8 KV cache: calibrated scales bound the round-trip error, the simulation is free when off, and eval reports it."""

import json

import pytest
import torch
import torch.nn.functional as F

from puzzle.blocks.modeling_puzzle import FP8_E4M3_MAX, DeciLMConfig, DeciLMForCausalLM, fp8_round_trip
from puzzle.api import distill_stage
from puzzle.kv_fp8 import calibrate_kv_scales
from tests.helpers import FAST, cli, copy_run, with_random_norms, with_solution, write_job

# E4M3 keeps 3 mantissa bits: rounding moves a normal value by at most half a step, 2^-4 of it; below
# the smallest normal (2^-6) the step is fixed at 2^-9, so the error is at most 2^-10 (in scaled units).
HALF_STEP, SUBNORMAL_FLOOR = 2.0**-4, 2.0**-10


def child() -> DeciLMForCausalLM:
    blocks = [{"attention": {"n_heads_in_group": 2}, "ffn": {"intermediate_size": 32}},
              {"attention": {"no_op": True}, "ffn": {"intermediate_size": 32}},
              {"attention": {"n_heads_in_group": 4, "window_length": 4}, "ffn": {"intermediate_size": 32}}]
    config = DeciLMConfig(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=4,
                          block_configs=blocks, max_position_embeddings=64,
                          rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    return with_random_norms(DeciLMForCausalLM(config))


class KeepKv:
    """A stand-in cache that keeps every K and V it is given."""

    def __init__(self):
        self.k, self.v = {}, {}

    def get_seq_length(self):
        return 0

    def update(self, k, v, layer_idx):
        self.k.setdefault(layer_idx, []).append(k)
        self.v.setdefault(layer_idx, []).append(v)
        return k, v


def test_calibrated_scales_bound_the_round_trip_error_on_calibration_data():
    model, blocks = child(), torch.randint(0, 64, (4, 16))
    scales = calibrate_kv_scales(model, blocks=blocks, batch_size=3)
    assert scales.layers == (0, 2)
    seen = KeepKv()
    with torch.no_grad():
        for start in (0, 3):
            model(blocks[start : start + 3], cache=seen, use_cache=True)
    for slot, (k_scale, v_scale) in enumerate(scales.pairs()):
        for values, scale in ((torch.cat([x.flatten() for x in seen.k[slot]]), k_scale),
                              (torch.cat([x.flatten() for x in seen.v[slot]]), v_scale)):
            assert values.abs().max().item() == pytest.approx(scale * FP8_E4M3_MAX, rel=1e-6)
            error = (values - fp8_round_trip(values, scale)).abs()
            bound = HALF_STEP * values.abs() + SUBNORMAL_FLOOR * scale + 1e-6 * values.abs()
            assert (error <= bound).all() and error.max() > 0


def test_the_error_bound_holds_from_subnormals_to_the_calibrated_max():
    scale = 0.37
    x = torch.logspace(-18, 0, 6001, base=2.0) * FP8_E4M3_MAX * scale
    x = torch.cat([x, -x])
    error = (x - fp8_round_trip(x, scale)).abs()
    assert (error <= HALF_STEP * x.abs() + SUBNORMAL_FLOOR * scale + 1e-6 * x.abs()).all()
    # Neither term alone bounds it: relative rounding above 2^-6 (scaled), the absolute floor below.
    assert (error > 1.001 * HALF_STEP * x.abs()).any() and (error > 1.001 * SUBNORMAL_FLOOR * scale).any()


def test_values_at_and_beyond_the_calibrated_max_do_not_overflow():
    scale = 0.37
    x = torch.tensor([FP8_E4M3_MAX * scale, -FP8_E4M3_MAX * scale, 1.5 * FP8_E4M3_MAX * scale])
    torch.testing.assert_close(fp8_round_trip(x, scale), torch.tensor([448.0, -448.0, 448.0]) * scale)


def test_k_scale_is_the_max_of_the_k_the_real_cache_stores():
    model, ids = child(), torch.randint(0, 64, (1, 12))
    scales = calibrate_kv_scales(model, blocks=ids, batch_size=1)
    cache = model.model.new_cache()
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    stored = cache.layers[0].keys  # the full-attention slot keeps every token, rotary applied
    assert stored.abs().max().item() == pytest.approx(scales.k[0] * FP8_E4M3_MAX, rel=1e-6)


def test_simulation_off_gives_bitwise_the_same_logits_and_on_a_small_nonzero_kl():
    model, ids = child(), torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        plain = model(ids).logits
        model.set_kv_fp8_scales(calibrate_kv_scales(model, blocks=ids, batch_size=2).pairs())
        fp8 = model(ids).logits
        model.set_kv_fp8_scales(None)
        off = model(ids).logits
    assert torch.equal(off, plain)
    kl = F.kl_div(F.log_softmax(fp8, -1), F.log_softmax(plain, -1), log_target=True, reduction="none").sum(-1).mean()
    assert 0 < kl.item() < 0.05


def test_fp8_cache_generates_the_same_tokens_with_and_without_cache():
    model, ids = child(), torch.randint(0, 64, (2, 6))
    model.set_kv_fp8_scales(calibrate_kv_scales(model, blocks=ids, batch_size=2).pairs())
    cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("scales", [[(1.0, 1.0)], [(1.0, 1.0), (0.0, 1.0)]], ids=["one-short", "zero"])
def test_bad_scales_are_refused(scales):
    with pytest.raises(ValueError, match="expected 2 positive"):
        child().set_kv_fp8_scales(scales)


EVAL = FAST + ["eval.speed_repeats=1", "eval.speed_warmup=0", "eval.validation_blocks=2"]


def eval_cli(monkeypatch, capsys, path, *args):
    return cli(monkeypatch, capsys, "eval", path, *[a for f in EVAL for a in ("--set", f)], *args)


def test_eval_with_fp8_kv_reports_the_kl_it_adds(tmp_path, fast_library, monkeypatch, capsys):
    path, config = copy_run(fast_library, tmp_path, EVAL)
    distill_stage(config)  # the session's library, checked and reused
    with_solution(config, ["attention.kv1+ffn.i48", "attention.kv2.window8+ffn.i96"])
    code, out = eval_cli(monkeypatch, capsys, path)
    assert code == 0, out.err
    assert "FP8" not in out.out
    code, out = eval_cli(monkeypatch, capsys, path, "--kv-dtype", "fp8")
    assert code == 0, out.err
    assert "KL added by FP8 KV" in out.out
    models = {m["name"]: m for m in json.loads((config.run.dir / "eval/results.json").read_text())["models"]}
    assert models.keys() == {"parent", "child"}
    for m in models.values():
        assert 0 < m["kv_fp8_added_kl"] < 0.05
        assert m["kv_fp8_scales"]["layers"] == [0, 1] and min(m["kv_fp8_scales"]["k"] + m["kv_fp8_scales"]["v"]) > 0


def test_eval_bad_kv_dtype_exits_2(tmp_path, tiny_parent_dir, monkeypatch, capsys):
    code, out = eval_cli(monkeypatch, capsys, write_job(tmp_path, tiny_parent_dir), "--kv-dtype", "fp4")
    assert code == 2 and "eval.kv_dtype: got 'fp4'" in out.err and "Traceback" not in out.err


# --- scales stored in the checkpoint, where vLLM reads them ------------------------------------------------


def test_scales_calibrated_a_layer_at_a_time_equal_the_whole_models(tmp_path, tiny_parent_dir):
    from transformers import AutoTokenizer

    from puzzle.checkpoint import write_child
    from puzzle.kv_fp8 import KvCalibration, streamed_kv_scales

    torch.manual_seed(0)
    model, blocks = child(), torch.randint(0, 64, (5, 16))
    write_child(tmp_path / "c", model.config, model.state_dict().items(), dtype=torch.float32,
                tokenizer=AutoTokenizer.from_pretrained(tiny_parent_dir), generation_config=None, info={})
    streamed = streamed_kv_scales(tmp_path / "c", KvCalibration(blocks, 2, torch.device("cpu")), torch.float32)
    whole = calibrate_kv_scales(model, blocks=blocks, batch_size=2)
    assert streamed.layers == whole.layers == (0, 2)
    assert streamed.k == pytest.approx(whole.k, rel=1e-5) and streamed.v == pytest.approx(whole.v, rel=1e-5)


@pytest.mark.parametrize("file_bytes", [None, 20_000], ids=["one-file", "several-files"])
def test_fp8_scales_round_trip_from_the_checkpoint(tmp_path, fast_library, monkeypatch, capsys, file_bytes):
    """profile.kv_dtype fp8: the realized child carries its calibrated scales where vLLM reads them, still loads
    with plain transformers (one weights file or several), and eval measures the FP8 cache with those scales."""
    import puzzle.checkpoint as checkpoint
    from transformers import AutoModelForCausalLM

    from puzzle.checkpoint import checkpoint_parameters, load_child
    from puzzle.data import job_blocks
    from puzzle.kv_fp8 import KV_CACHE_SCHEME, SCALES_FILE, read_kv_scales
    from puzzle.parents import load_parent

    if file_bytes is not None:
        monkeypatch.setattr(checkpoint, "FILE_BYTES", file_bytes)
    path, config = copy_run(fast_library, tmp_path, EVAL + ["profile.kv_dtype=fp8"])
    distill_stage(config)
    directory = with_solution(config, ["attention.kv1+ffn.i48", "attention.kv2.window8+ffn.i96"]).directory
    stored = read_kv_scales(directory)
    model = load_child(directory)
    parent = load_parent(config.parent)
    calibration = job_blocks(config, parent.tokenizer).calibration(config.data.calibration_blocks)
    expected = calibrate_kv_scales(model, blocks=calibration, batch_size=config.eval.batch_size)
    assert stored.layers == expected.layers == (0, 1)
    assert stored.k == pytest.approx(expected.k, rel=1e-5) and stored.v == pytest.approx(expected.v, rel=1e-5)

    saved = json.loads((directory / "config.json").read_text())
    assert saved["compression_config"] == KV_CACHE_SCHEME and "quantization_config" not in saved
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["model.layers.1.self_attn.v_scale"] == SCALES_FILE
    assert (len(set(index.values()) - {SCALES_FILE}) == 1) == (file_bytes is None)
    assert checkpoint_parameters(directory) == sum(p.numel() for p in model.parameters())
    plain = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)
    ids = calibration[:1]
    torch.testing.assert_close(plain(ids).logits, model(ids).logits)

    code, out = eval_cli(monkeypatch, capsys, path, "--kv-dtype", "fp8")
    assert code == 0, out.err
    result = {m["name"]: m for m in json.loads((config.run.dir / "eval/results.json").read_text())["models"]}["child"]
    assert result["kv_fp8_scales"] == {"layers": [0, 1], "k": list(stored.k), "v": list(stored.v)}


def test_no_scales_without_an_fp8_cache_or_for_llama_cpp(tmp_path, fast_library):
    from puzzle.kv_fp8 import read_kv_scales

    for name, overrides in (("bf16", []), ("llama", ["profile.kv_dtype=fp8", "target.engine=llama.cpp"])):
        _, config = copy_run(fast_library, tmp_path, EVAL + overrides, name=name)
        distill_stage(config)
        directory = with_solution(config, ["attention.kv1+ffn.i48", "attention.kv2.window8+ffn.i96"]).directory
        assert read_kv_scales(directory) is None
        assert "compression_config" not in json.loads((directory / "config.json").read_text())
