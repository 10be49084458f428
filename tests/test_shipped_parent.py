"""The shipped parent loads offline, runs through its adapter, and scores what the README says."""

import json
import math
import re
from pathlib import Path

import pytest
import torch

from puzzle.config import DataSection, ParentSection
from puzzle.data import load_blocks
from puzzle.parents import load_parent
from puzzle.stages.parent import validation_loss

ROOT = Path(__file__).resolve().parent.parent
PARENT = ROOT / "examples/parent"


def readme_figure(name: str) -> float:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"\| {name} \| ([0-9.]+) \|", text)
    assert match, f"README has no '| {name} | … |' row"
    return float(match.group(1))


@pytest.fixture(scope="module")
def shipped():
    parent = load_parent(ParentSection(path=str(PARENT)))
    section = DataSection(files=[str(ROOT / "examples/data/shakespeare/*.txt")], sequence_length=512)
    return parent, load_blocks(section, parent.tokenizer)


def test_shipped_parent_is_small_and_safetensors():
    weights = PARENT / "model.safetensors"
    assert weights.is_file() and weights.stat().st_size <= 12 * 1024 * 1024
    assert not list(PARENT.glob("*.bin")) and not list(PARENT.glob("*.pt"))
    config = json.loads((PARENT / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] < config["num_attention_heads"]
    assert config["intermediate_size"] % 256 == 0


@pytest.mark.slow
def test_validation_perplexity_matches_the_readme(shipped):
    parent, blocks = shipped
    loss, tokens = validation_loss(parent.adapter, blocks.validation, batch_size=8)
    summary = json.loads((PARENT / "training_summary.json").read_text())
    assert tokens == summary["validation_tokens"]
    # Layer-by-layer through the adapter vs. the model's own forward at training time: rounding only.
    assert math.exp(loss) == pytest.approx(readme_figure("validation perplexity"), rel=2e-3)
    assert loss == pytest.approx(readme_figure("validation loss"), abs=2e-3)


@pytest.mark.slow
def test_shipped_parent_generates_text(shipped):
    parent, _ = shipped
    ids = parent.tokenizer("ROMEO.\n", return_tensors="pt").input_ids
    torch.manual_seed(0)
    out = parent.model.generate(ids, max_new_tokens=20, do_sample=False)
    text = parent.tokenizer.decode(out[0], skip_special_tokens=True)
    assert text.startswith("ROMEO.") and len(text) > len("ROMEO.") + 20


def scores_what_its_summary_says(directory: Path, figure: str) -> dict:
    """A shipped parent: small safetensors, and its validation perplexity through the adapter equals its
    training summary and the README's row `figure`. Returns its config."""
    weights = directory / "model.safetensors"
    assert weights.is_file() and weights.stat().st_size <= 12 * 1024 * 1024
    parent = load_parent(ParentSection(path=str(directory)))
    section = DataSection(files=[str(ROOT / "examples/data/shakespeare/*.txt")], sequence_length=512)
    blocks = load_blocks(section, parent.tokenizer)
    loss, tokens = validation_loss(parent.adapter, blocks.validation, batch_size=8)
    summary = json.loads((directory / "training_summary.json").read_text())
    assert tokens == summary["validation_tokens"]
    assert math.exp(loss) == pytest.approx(readme_figure(figure), rel=2e-3)
    assert summary["validation_perplexity"] == pytest.approx(readme_figure(figure), rel=1e-4)
    return json.loads((directory / "config.json").read_text())


@pytest.mark.slow
def test_shipped_moe_parent_is_small_and_scores_what_its_summary_says():
    config = scores_what_its_summary_says(ROOT / "examples/moe_parent", "MoE validation perplexity")
    assert config["model_type"] == "mixtral"
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (8, 2)


@pytest.mark.slow
def test_shipped_hybrid_parent_is_small_and_scores_what_its_summary_says():
    config = scores_what_its_summary_says(ROOT / "examples/hybrid_parent", "hybrid validation perplexity")
    assert config["model_type"] == "nemotron_h"
    assert config["layers_block_type"] == ["linear_attention", "mlp", "linear_attention", "full_attention",
                                           "linear_attention", "moe", "linear_attention", "mlp"]
