import os

import pytest
import torch

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
