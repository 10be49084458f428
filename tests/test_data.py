from pathlib import Path

import torch

from puzzle.config import DataSection
from puzzle.data import load_blocks, split_blocks
from puzzle.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SONNETS = str(ROOT / "examples/data/shakespeare/sonnets.txt")


def test_split_is_fixed_and_disjoint():
    stream = torch.arange(1000)
    section = DataSection(files=["x"], sequence_length=10, validation_fraction=0.2, split_seed=3)
    train, val = split_blocks(stream, section)
    train2, val2 = split_blocks(stream, section)
    assert torch.equal(val, val2) and torch.equal(train, train2)
    assert len(val) == 20 and len(train) == 80
    starts = set(train[:, 0].tolist()) | set(val[:, 0].tolist())
    assert len(starts) == 100  # every block in exactly one split


def test_blocks_from_text_files():
    tokenizer = build_tokenizer([Path(SONNETS).read_text()], vocab_size=320)
    section = DataSection(files=[SONNETS], sequence_length=32, validation_fraction=0.1)
    blocks = load_blocks(section, tokenizer)
    assert blocks.train.shape[1] == 32 and blocks.train.dtype == torch.long
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
