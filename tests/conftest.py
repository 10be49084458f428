import os

import pytest
import torch

from tests.helpers import FAST, scored_job, write_job

# Determinism and a quiet, offline environment for every test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_parent_dir(tmp_path_factory):
    """A tiny Llama parent with a project-trained tokenizer, saved as a Hugging Face checkpoint."""
    from pathlib import Path

    from transformers import LlamaConfig, LlamaForCausalLM

    from puzzle.tokenizer import build_tokenizer

    root = Path(__file__).resolve().parent.parent
    text = (root / "examples/data/shakespeare/sonnets.txt").read_text()
    tokenizer = build_tokenizer([text], vocab_size=384)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    out = tmp_path_factory.mktemp("tiny_parent")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# The session's trained libraries, each trained once. They are shared: never write into their run
# directories; start from a copy instead (`tests.helpers.copy_run`, or `scored_job(..., start_from=...)`).


@pytest.fixture(scope="session")
def reference_library(tmp_path_factory, tiny_parent_dir):
    """`write_job`'s library as it stands (8 BLD steps, 512 tokens per candidate), trained in one uninterrupted
    run: (config, the library stage's summary of that training). test_bld's reference, test_scoring's library."""
    from puzzle.api import distill_stage
    from puzzle.config import load_config

    torch.manual_seed(0)
    config = load_config(write_job(tmp_path_factory.mktemp("reference_library"), tiny_parent_dir))
    return config, distill_stage(config)


@pytest.fixture(scope="session")
def fast_library(tmp_path_factory, tiny_parent_dir):
    """`write_job` with FAST: the library only (64 tokens per candidate). Its config."""
    from puzzle.api import distill_stage
    from puzzle.config import load_config

    torch.manual_seed(0)
    config = load_config(write_job(tmp_path_factory.mktemp("fast_library"), tiny_parent_dir), FAST)
    distill_stage(config)
    return config


@pytest.fixture(scope="session")
def fast_scored(tmp_path_factory, tiny_parent_dir, fast_library):
    """`fast_library` with its blocks scored and a measured profile (FAST): what search and later stages read."""
    torch.manual_seed(0)
    return scored_job(tmp_path_factory.mktemp("fast_scored"), tiny_parent_dir, FAST, start_from=fast_library)[1]
