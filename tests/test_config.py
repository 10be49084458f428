from pathlib import Path

import pytest

from puzzle.config import (
    ParentTrainingConfig,
    PuzzleConfig,
    apply_overrides,
    describe_fields,
    dump_config,
    load_config,
    load_jobs,
    read_yaml,
    validate,
)
from puzzle.errors import ConfigError
from puzzle.search.budgets import BudgetKind, parse_budget

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MINIMAL = {"parent": {"path": "p"}, "data": {"files": ["x.txt"]}}


def _schema_for(raw: dict):
    return ParentTrainingConfig if "training" in raw else PuzzleConfig


# examples/tasks holds lm-evaluation-harness task YAMLs, which the harness reads (tests/test_pipeline.py runs one).
@pytest.mark.parametrize("path", sorted(p for p in EXAMPLES.glob("**/*.yaml") if "tasks" not in p.parts),
                         ids=lambda p: p.name)
def test_every_example_yaml_validates(path):
    raw = read_yaml(path)
    configs = load_jobs(path) if "jobs" in raw else [validate(raw, _schema_for(raw), str(path))]
    for config in configs:
        # The dump is complete and round-trips to the same config.
        assert validate(read_yaml_text(dump_config(config)), _schema_for(raw)) == config
    if "jobs" in raw:
        assert [c.run.job for c in configs] == list(raw["jobs"])
        assert len({c.run.dir for c in configs}) == 1


def read_yaml_text(text: str) -> dict:
    import yaml

    return yaml.safe_load(text)


def test_examples_exist():
    assert (EXAMPLES / "default.yaml").is_file()
    assert (EXAMPLES / "train_parent.yaml").is_file()


def test_all_problems_reported_together_with_key_value_and_expectation():
    raw = {
        "parent": {"path": "p", "dtype": "float8", "colour": "red"},
        "data": {"files": ["x.txt"], "sequence_length": "long"},
        "kd": {"tokens": 0},
        "extra_section": {},
    }
    with pytest.raises(ConfigError) as info:
        validate(raw)
    problems = info.value.problems
    assert len(problems) == 5
    text = "\n".join(problems)
    assert "parent.dtype: got 'float8'; Input should be 'auto', 'float32', 'bfloat16' or 'float16'" in text
    assert "parent.colour: unknown key; allowed keys here: path, dtype, device" in text
    assert "data.sequence_length: got 'long'" in text
    assert "kd.tokens: got 0; Input should be greater than or equal to 1" in text
    assert "extra_section: unknown key; allowed keys here: run, parent, data" in text


def test_missing_required_section():
    with pytest.raises(ConfigError) as info:
        validate({"data": {"files": ["x"]}})
    assert info.value.problems == ["parent: required, not given"]


def test_data_needs_exactly_one_source():
    with pytest.raises(ConfigError, match="exactly one of data.files"):
        validate({"parent": {"path": "p"}, "data": {}})


def test_overrides_are_typed_and_nested():
    raw = apply_overrides(MINIMAL, ["kd.tokens=1000", "parent.dtype=bfloat16", "search.budgets.latency=0.5x"])
    config = validate(raw)
    assert config.kd.tokens == 1000
    assert config.parent.dtype == "bfloat16"
    # Budgets are parsed when the config loads, and written back as the user gave them.
    assert config.search.budgets == {BudgetKind.latency: parse_budget("latency=0.5x")}
    assert config.model_dump(mode="json")["search"]["budgets"] == {"latency": "0.5x"}
    assert MINIMAL == {"parent": {"path": "p"}, "data": {"files": ["x.txt"]}}  # input not mutated


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected KEY.SUB=VALUE"):
        apply_overrides(MINIMAL, ["kd.tokens"])


def test_malformed_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("parent:\n  path: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert "malformed YAML at line" in info.value.problems[0]


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("parent: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(evil)


def test_config_is_frozen():
    config = validate(MINIMAL)
    with pytest.raises(Exception):
        config.kd.tokens = 5


def test_every_field_is_documented():
    for model in (PuzzleConfig, ParentTrainingConfig):
        for key, _default, description in describe_fields(model):
            assert description, f"{key} has no description"


def test_training_architecture_checks_heads():
    raw = read_yaml(EXAMPLES / "train_parent.yaml")
    raw = apply_overrides(raw, ["model.num_key_value_heads=4"])
    with pytest.raises(ConfigError, match="num_key_value_heads must divide num_attention_heads"):
        validate(raw, ParentTrainingConfig)
