"""Token streams for calibration, training and validation.

Documents (local text files, one document each; jsonl, json, parquet or arrow files, one document per row
of `data.text_column` or of `data.messages_column` rendered with the tokenizer's chat template; or a hub
dataset when online) are read through `datasets`, tokenized without special tokens, joined with an
end-of-sequence token between documents and cut into blocks of `sequence_length` tokens. A job's stream
is tokenized once into the run's token file and read from it by every stage and job. The train/validation split is a fixed, seeded choice of blocks, so every
stage of every run sees the same held-out text.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from puzzle.config import DataSection, PuzzleConfig
from puzzle.errors import PuzzleError
from puzzle.io import atomic_path, sha256_file

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
    """Every pattern matches, and every plain-text file reads as UTF-8 (for checks before any work; a table
    file is read when its tokens are counted)."""
    for f in resolve_files(patterns):
        if f.suffix.lower() not in (".parquet", ".arrow"):
            _read_text(f)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PuzzleError(f"data.files: {str(path)!r} is not UTF-8 text") from None
    except OSError as e:
        raise PuzzleError(f"data.files: cannot read {str(path)!r}: {e.strerror}") from None


# Table files give one document per row; any other file is one document of plain text.
TABLE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _rows(section: DataSection, table, source: str, tokenizer) -> list[str]:
    """A table's documents: its text column, or its messages column rendered with the tokenizer's chat template."""
    column = section.messages_column or section.text_column
    key = "data.messages_column" if section.messages_column else "data.text_column"
    if column not in table.column_names:
        raise PuzzleError(f"{key}: {column!r} is not a column of {source} (columns: {', '.join(table.column_names)})")
    if not section.messages_column:
        return [str(text) for text in table[column]]
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise PuzzleError(f"data.messages_column: the tokenizer has no chat template to render {source}'s "
                          f"{column!r} with; give a tokenizer that has one (data.tokenizer) or use data.text_column")
    return [tokenizer.apply_chat_template(messages, tokenize=False) for messages in table[column]]


def read_documents(section: DataSection, tokenizer=None) -> list[str]:
    """The documents, in a fixed order, through `datasets`: a text file is one document, a table file (jsonl,
    json, parquet, arrow) or a hub dataset one per row. `tokenizer` renders chat messages."""
    datasets = _quiet_datasets()
    if section.hub is not None:
        table = datasets.load_dataset(section.hub.name, split=section.hub.split)
        return _rows(section, table, section.hub.name, tokenizer)
    docs = []
    for f in resolve_files(section.files):
        kind = TABLE_FORMATS.get(f.suffix.lower())
        if kind is None:
            docs.append(_read_text(f))
            continue
        try:
            table = datasets.load_dataset(kind, data_files=[str(f)], split="train", keep_in_memory=True)
        except Exception as e:  # noqa: BLE001 - any reader failure of a user's file is that file's problem
            raise PuzzleError(f"data.files: {str(f)!r} is not a readable {kind} file ({str(e).splitlines()[0]})") from None
        docs += _rows(section, table, str(f), tokenizer)
    return docs


def tokenize_documents(docs: list[str], tokenizer, chunk: int = 256) -> torch.Tensor:
    """The documents' tokens, an end-of-sequence token after each, tokenized `chunk` documents at a time."""
    import numpy as np
    import torch

    eos = tokenizer.eos_token_id
    if eos is None:
        raise PuzzleError("the tokenizer has no end-of-sequence token to separate documents")
    parts = []
    for start in range(0, len(docs), chunk):
        for encoded in tokenizer(docs[start : start + chunk], add_special_tokens=False)["input_ids"]:
            parts.append(np.asarray(encoded + [eos], dtype=np.int32))
    return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)).long()


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


def _documents_with_text(section: DataSection, tokenizer=None) -> list[str]:
    docs = read_documents(section, tokenizer)
    if not any(d.strip() for d in docs):
        raise PuzzleError("data: the documents contain no text")
    return docs


def count_tokens(config: PuzzleConfig) -> int:
    """Tokens the job's data gives with the job's tokenizer (data.tokenizer, else the parent's): the size of the
    run's token file when it exists, else counted by tokenizing (nothing is written)."""
    from transformers import AutoTokenizer

    section, parent = config.data, config.parent
    tokenizer = AutoTokenizer.from_pretrained(section.tokenizer or parent.path, trust_remote_code=parent.trust_remote_code)
    file = Path(config.run.dir) / "tokens" / f"{stream_key(section, tokenizer)}.int32"
    if file.is_file():
        return file.stat().st_size // 4
    return tokenize_documents(_documents_with_text(section, tokenizer), tokenizer).numel()


def _blocks(stream: torch.Tensor, identity: str, section: DataSection) -> TokenBlocks:
    train, validation = split_blocks(stream, section)
    h = hashlib.sha256(identity.encode())
    h.update(f"{section.sequence_length}/{section.validation_fraction}/{section.split_seed}".encode())
    return TokenBlocks(train=train, validation=validation, fingerprint=h.hexdigest()[:16])


def load_blocks(section: DataSection, tokenizer) -> TokenBlocks:
    stream = tokenize_documents(_documents_with_text(section, tokenizer), tokenizer)
    return _blocks(stream, hashlib.sha256(stream.numpy().tobytes()).hexdigest(), section)


def _tokenizer_identity(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return text + f"|eos={tokenizer.eos_token_id}|template={getattr(tokenizer, 'chat_template', None)}"


def stream_key(section: DataSection, tokenizer) -> str:
    """What the token stream is a function of: the documents' bytes (or the hub dataset's name and split), how
    rows become documents, and the tokenizer."""
    h = hashlib.sha256(_tokenizer_identity(tokenizer).encode())
    h.update(f"{section.text_column}|{section.messages_column}".encode())
    if section.hub is not None:
        h.update(f"hub:{section.hub.name}:{section.hub.split}".encode())
    for f in [] if section.hub is not None else resolve_files(section.files):
        h.update(f"{f.suffix.lower()}:{sha256_file(f)}".encode())
    return h.hexdigest()[:24]


def token_stream(section: DataSection, tokenizer, cache: Path) -> tuple[torch.Tensor, str]:
    """The job's token stream, tokenized once into `cache` and read from it by every later stage and job.

    The file is int32 tokens, written whole or not at all; its name is the stream's key."""
    import numpy as np
    import torch

    key = stream_key(section, tokenizer)
    file = cache / f"{key}.int32"
    if not file.is_file():
        stream = tokenize_documents(_documents_with_text(section, tokenizer), tokenizer)
        with atomic_path(file) as tmp:
            stream.numpy().astype(np.int32).tofile(tmp)
    return torch.from_numpy(np.fromfile(file, dtype=np.int32)).long(), key


def job_blocks(config: PuzzleConfig, parent_tokenizer) -> TokenBlocks:
    """The job's token blocks, with `data.tokenizer` when set and the parent's tokenizer otherwise, from the
    run's token file (RUN_DIR/tokens/), which the first stage that needs it writes."""
    tokenizer = parent_tokenizer
    if config.data.tokenizer is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.data.tokenizer)
    stream, key = token_stream(config.data, tokenizer, Path(config.run.dir) / "tokens")
    return _blocks(stream, key, config.data)
