from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import puzzle.train_parent as tp
from puzzle.config import ParentTrainingConfig, validate

ROOT = Path(__file__).resolve().parent.parent


def tiny_training(tmp_path: Path, name: str) -> ParentTrainingConfig:
    return validate(
        {
            "output": str(tmp_path / name / "parent"),
            "work_dir": str(tmp_path / name / "work"),
            "data": {"files": [str(ROOT / "examples/data/shakespeare/sonnets.txt")], "sequence_length": 32},
            "tokenizer": {"vocab_size": 320},
            "model": {
                "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "max_position_embeddings": 32,
            },
            "training": {
                "steps": 4, "batch_size": 2, "warmup_steps": 1, "eval_every": 2, "eval_blocks": 2,
                "checkpoint_every": 2, "save_dtype": "float32",
            },
        },
        ParentTrainingConfig,
    )


def test_killed_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    straight = tp.train_parent(tiny_training(tmp_path, "straight"))

    real = tp.batch_indices

    def dies_at_step_3(step, *args):
        if step == 3:
            raise KeyboardInterrupt  # as if killed after the checkpoint of step 2
        return real(step, *args)

    resumed_cfg = tiny_training(tmp_path, "resumed")
    monkeypatch.setattr(tp, "batch_indices", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        tp.train_parent(resumed_cfg)
    assert not resumed_cfg.output.exists()
    monkeypatch.setattr(tp, "batch_indices", real)
    resumed = tp.train_parent(resumed_cfg)

    a = load_file(straight.output / "model.safetensors")
    b = load_file(resumed.output / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert resumed.validation_loss == straight.validation_loss
    for name in ("config.json", "tokenizer.json", "generation_config.json", "training_log.jsonl"):
        assert (resumed.output / name).is_file()


def test_batches_cover_every_block_once_per_epoch():
    seen = torch.cat([tp.batch_indices(s, 10, 5, seed=0) for s in range(2)])
    assert sorted(seen.tolist()) == list(range(10))
    assert torch.equal(tp.batch_indices(7, 10, 5, seed=0), tp.batch_indices(7, 10, 5, seed=0))


def test_learning_rate_schedule():
    cfg = tiny_training(Path("/tmp"), "x")
    t = cfg.training
    assert tp.learning_rate(0, cfg) == pytest.approx(t.learning_rate)  # one warm-up step
    assert tp.learning_rate(t.steps, cfg) == pytest.approx(t.min_learning_rate)


def test_mixtral_parent_trains_saves_and_loads_with_its_experts(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_training(tmp_path, "moe")
    raw = cfg.model_dump(mode="json")
    raw["model"].update(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2)
    result = tp.train_parent(validate(raw, ParentTrainingConfig))
    model = AutoModelForCausalLM.from_pretrained(result.output)
    config = model.config
    assert config.model_type == "mixtral" and config.num_local_experts == 4 and config.num_experts_per_tok == 2
    assert not config.output_router_logits  # a training signal only
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 2 * 64, 32)
    assert result.validation_loss < 7.0  # finite and near ln(320) = 5.77 after 4 steps: training did not diverge


def test_experts_per_token_beyond_the_experts_is_rejected(tmp_path):
    from puzzle.errors import ConfigError

    raw = tiny_training(tmp_path, "bad").model_dump(mode="json")
    raw["model"].update(model_type="mixtral", num_local_experts=2, num_experts_per_tok=3)
    with pytest.raises(ConfigError, match="num_experts_per_tok must be at most num_local_experts"):
        validate(raw, ParentTrainingConfig)


FAMILY_SETTINGS = {
    "llama": {}, "mistral": {"sliding_window": 8}, "qwen2": {}, "qwen3": {"head_dim": 16},
    "mixtral": {"num_local_experts": 4}, "qwen3_moe": {"num_local_experts": 4, "head_dim": 16},
    "gpt_oss": {"num_local_experts": 4, "sliding_window": 8},
    "nemotron_h": {"num_hidden_layers": 4, "layers_block_type": ["mamba", "mlp", "attention", "moe"],
                   "num_local_experts": 4, "mamba_num_heads": 4, "mamba_head_dim": 8, "n_groups": 2,
                   "ssm_state_size": 8},
}


@pytest.mark.parametrize("model_type", sorted(FAMILY_SETTINGS))
def test_every_family_trains_and_runs_layer_by_layer_like_its_forward(tmp_path, model_type):
    from transformers import AutoModelForCausalLM

    from puzzle.config import ParentSection
    from puzzle.parents import load_parent

    raw = tiny_training(tmp_path, model_type).model_dump(mode="json")
    raw["model"].update(model_type=model_type, **FAMILY_SETTINGS[model_type])
    raw["training"]["steps"] = 2
    result = tp.train_parent(validate(raw, ParentTrainingConfig))
    assert result.validation_loss < 7.0  # near ln(320) = 5.77: finite, not diverged
    model = AutoModelForCausalLM.from_pretrained(result.output, dtype=torch.float32).eval()
    assert model.config.model_type == model_type
    if "head_dim" in FAMILY_SETTINGS[model_type]:
        assert model.config.head_dim == 16 != 32 // 4
    parent = load_parent(ParentSection(path=str(result.output), dtype="float32"))
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(parent.adapter.logits(ids), model(ids).logits, rtol=1e-4, atol=1e-4)


def test_hybrid_layer_types_must_match_the_layer_count(tmp_path):
    from puzzle.errors import ConfigError

    raw = tiny_training(tmp_path, "bad").model_dump(mode="json")
    raw["model"].update(model_type="nemotron_h", num_hidden_layers=3, layers_block_type=["mamba", "mlp"])
    with pytest.raises(ConfigError, match="layers_block_type names 2 layers; num_hidden_layers is 3"):
        validate(raw, ParentTrainingConfig)
    raw["model"].update(num_hidden_layers=2, layers_block_type=["mamba", "convolution"])
    with pytest.raises(ConfigError, match="convolution"):
        validate(raw, ParentTrainingConfig)
