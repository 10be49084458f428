"""Token streams for calibration, training and validation.

Documents (local text files, or a hub dataset when online) are read through `datasets`, tokenized
without special tokens, joined with an end-of-sequence token between documents and cut into blocks of
`sequence_length` tokens. The train/validation split is a fixed, seeded choice of blocks, so every
stage of every run sees the same held-out text.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from puzzle.config import DataSection, ParentSection
from puzzle.errors import PuzzleError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TokenBlocks:
    train: torch.Tensor  # [n_train, sequence_length] int64
    validation: torch.Tensor  # [n_validation, sequence_length] int64
    fingerprint: str  # identifies documents, tokenizer and split

    def calibration(self, n: int) -> torch.Tensor:
        return self.train[:n]


def resolve_files(patterns: list[str]) -> list[Path]:
    """Expand globs; every pattern must match and every match must be a readable file."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise PuzzleError(f"data.files: no file matches {pattern!r}")
        for m in matches:
            p = Path(m)
            if not p.is_file():
                raise PuzzleError(f"data.files: {m!r} is not a file")
            if not os.access(p, os.R_OK):
                raise PuzzleError(f"data.files: {m!r} is not readable (check its permissions)")
            files.append(p)
    return files


def check_files(patterns: list[str]) -> None:
    """Every pattern matches, and every file is readable UTF-8 text (for checks before any work)."""
    for f in resolve_files(patterns):
        _read_text(f)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PuzzleError(f"data.files: {str(path)!r} is not UTF-8 text") from None
    except OSError as e:
        raise PuzzleError(f"data.files: cannot read {str(path)!r}: {e.strerror}") from None


def read_documents(section: DataSection) -> list[str]:
    """One string per document, in a fixed order, through `datasets` (local files or a hub dataset)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    if section.hub is None:
        files = resolve_files(section.files)
        for f in files:
            _read_text(f)  # a clear one-line error for undecodable files, before datasets sees them
        # One row per file; keep_in_memory leaves no cache files behind for a few MB of text.
        ds = datasets.load_dataset(
            "text", data_files=[str(f) for f in files], sample_by="document", split="train", keep_in_memory=True
        )
        return list(ds["text"])
    ds = datasets.load_dataset(section.hub.name, split=section.hub.split)
    if section.hub.text_column not in ds.column_names:
        raise PuzzleError(
            f"data.hub.text_column: {section.hub.text_column!r} is not a column of {section.hub.name} "
            f"(columns: {', '.join(ds.column_names)})"
        )
    return list(ds[section.hub.text_column])


def tokenize_documents(docs: list[str], tokenizer) -> torch.Tensor:
    import torch

    eos = tokenizer.eos_token_id
    if eos is None:
        raise PuzzleError("the tokenizer has no end-of-sequence token to separate documents")
    ids: list[int] = []
    for encoded in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def split_sizes(tokens: int, section: DataSection) -> tuple[int, int]:
    """(training blocks, validation blocks) that `tokens` tokens give; an error when either would be empty."""
    n = tokens // section.sequence_length
    n_val = max(1, round(n * section.validation_fraction))
    if n - n_val < 1:
        raise PuzzleError(
            f"data: only {tokens} tokens, too few for blocks of {section.sequence_length} "
            "with a validation split; add text or lower data.sequence_length"
        )
    return n - n_val, n_val


def split_blocks(stream: torch.Tensor, section: DataSection) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    n = stream.numel() // section.sequence_length
    n_val = split_sizes(stream.numel(), section)[1]
    blocks = stream[: n * section.sequence_length].view(n, section.sequence_length)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(section.split_seed))
    val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values
    return blocks[train_idx].clone(), blocks[val_idx].clone()


def _documents_with_text(section: DataSection) -> list[str]:
    docs = read_documents(section)
    if not any(d.strip() for d in docs):
        raise PuzzleError("data: the documents contain no text")
    return docs


def count_tokens(section: DataSection, parent: ParentSection) -> int:
    """Tokens the job's data gives with the job's tokenizer (data.tokenizer, else the parent's)."""
    from transformers import AutoTokenizer

    source = section.tokenizer or parent.path
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=parent.trust_remote_code)
    return tokenize_documents(_documents_with_text(section), tokenizer).numel()


def load_blocks(section: DataSection, tokenizer) -> TokenBlocks:
    stream = tokenize_documents(_documents_with_text(section), tokenizer)
    train, validation = split_blocks(stream, section)
    h = hashlib.sha256()
    h.update(stream.numpy().tobytes())
    h.update(f"{section.sequence_length}/{section.validation_fraction}/{section.split_seed}".encode())
    return TokenBlocks(train=train, validation=validation, fingerprint=h.hexdigest()[:16])


def job_blocks(section: DataSection, parent_tokenizer) -> TokenBlocks:
    """The job's token blocks, with `data.tokenizer` when set and the parent's tokenizer otherwise."""
    tokenizer = parent_tokenizer
    if section.tokenizer is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(section.tokenizer)
    return load_blocks(section, tokenizer)
