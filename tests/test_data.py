from pathlib import Path

import numpy as np
import torch

from puzzle.config import DataSection
from puzzle.data import BlockSet, load_blocks, split_starts
from puzzle.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SONNETS = str(ROOT / "examples/data/shakespeare/sonnets.txt")


def test_split_is_fixed_and_disjoint():
    section = DataSection(files=["x"], sequence_length=10, validation_fraction=0.2, split_seed=3)
    train, val = split_starts(1000, section)
    train2, val2 = split_starts(1000, section)
    assert (val == val2).all() and (train == train2).all()
    assert len(val) == 20 and len(train) == 80
    assert len(set(train.tolist()) | set(val.tolist())) == 100  # every block in exactly one split


def test_block_sets_read_only_the_blocks_asked_for():
    tokens = np.arange(100, dtype=np.int32)
    blocks = BlockSet(tokens, np.array([0, 50, 20]), 10)
    assert blocks[1].tolist() == list(range(50, 60)) and blocks[1].dtype == torch.long
    assert blocks[torch.tensor([2, 0])][:, 0].tolist() == [20, 0]
    assert blocks[:2].shape == (2, 10)
    halves = blocks.recut(4)  # two blocks of 4 from each block of 10
    assert len(halves) == 6 and halves[1].tolist() == [4, 5, 6, 7] and halves[2].tolist() == [50, 51, 52, 53]


def test_blocks_from_text_files():
    tokenizer = build_tokenizer([Path(SONNETS).read_text()], vocab_size=320)
    section = DataSection(files=[SONNETS], sequence_length=32, validation_fraction=0.1)
    blocks = load_blocks(section, tokenizer)
    assert blocks.train[:3].shape == (3, 32) and blocks.train[:3].dtype == torch.long
    assert len(blocks.validation) >= 1
    assert blocks.fingerprint == load_blocks(section, tokenizer).fingerprint
    assert torch.equal(blocks.calibration(4), blocks.train[:4])


def test_tokenizer_is_llama_style():
    tokenizer = build_tokenizer([Path(SONNETS).read_text()], vocab_size=320)
    text = "Shall I compare thee — to a summer's day?"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert pieces[0].startswith("▁")  # SentencePiece-style space marker
    assert "<0xE2>" in pieces  # the em dash is not in the vocabulary: byte fallback
    assert tokenizer.decode(ids) == text
    assert tokenizer(text).input_ids[0] == tokenizer.bos_token_id
    assert type(tokenizer.backend_tokenizer.decoder).__name__ == "Sequence"
