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
