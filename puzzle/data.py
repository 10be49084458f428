"""Token streams for calibration, training and validation.

Documents (local text files, one document each; jsonl, json, parquet or arrow files, one document per row
of `data.text_column` or of `data.messages_column` rendered with the tokenizer's chat template; or a hub
dataset when online) are streamed through `datasets`, tokenized without special tokens, joined with an end-of-sequence token
between documents and cut into blocks of `sequence_length` tokens. A job's stream is tokenized once,
streaming, into the run's token file, which every stage and job memory-maps: a batch is read from it
when it is needed, and the corpus is never held in memory. The train/validation split is a fixed, seeded choice of blocks, so every
stage of every run sees the same held-out text.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

from puzzle.config import DataSection, PuzzleConfig
from puzzle.errors import PuzzleError
from puzzle.io import atomic_path, sha256_file

if TYPE_CHECKING:
    import torch


class BlockSet:
    """Blocks of `length` tokens starting at `starts` in a token array (the run's memory-mapped token file),
    read when indexed: indexing gives an int64 tensor of the chosen blocks, and nothing else is held."""

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, length: int):
        self.tokens, self.starts, self.length = tokens, starts, length

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index) -> torch.Tensor:
        import torch

        if isinstance(index, torch.Tensor):
            index = index.numpy()
        rows = np.atleast_1d(self.starts[index])
        blocks = torch.from_numpy(self.tokens[rows[:, None] + np.arange(self.length)].astype(np.int64))
        return blocks[0] if np.ndim(self.starts[index]) == 0 else blocks

    def recut(self, length: int) -> BlockSet:
        """The same tokens in blocks of `length` (the tail of each block that does not fill one is dropped)."""
        if length > self.length:
            raise PuzzleError(f"bld.sequence_length: {length} is longer than data.sequence_length ({self.length}); "
                              "lower it or raise data.sequence_length")
        per = self.length // length
        return BlockSet(self.tokens, (self.starts[:, None] + np.arange(per) * length).ravel(), length)


@dataclass(frozen=True)
class TokenBlocks:
    train: BlockSet
    validation: BlockSet
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


def _rows(section: DataSection, table, source: str, tokenizer) -> Iterator[str]:
    """A table's documents, row by row: its text column, or its messages column rendered with the tokenizer's
    chat template."""
    column = section.messages_column or section.text_column
    key = "data.messages_column" if section.messages_column else "data.text_column"
    if section.messages_column and (tokenizer is None or not getattr(tokenizer, "chat_template", None)):
        raise PuzzleError(f"data.messages_column: the tokenizer has no chat template to render {source}'s "
                          f"{column!r} with; give a tokenizer that has one (data.tokenizer) or use data.text_column")
    for row in table:
        if column not in row:
            raise PuzzleError(f"{key}: {column!r} is not a column of {source} (columns: {', '.join(row)})")
        value = row[column]
        yield tokenizer.apply_chat_template(value, tokenize=False) if section.messages_column else str(value)


def _table_rows(section: DataSection, kind: str, path: Path, tokenizer) -> Iterator[str]:
    """A table file's documents, streamed from the file (nothing cached, nothing held whole)."""
    datasets = _quiet_datasets()
    rows = iter(_rows(section, datasets.load_dataset(kind, data_files=[str(path)], split="train", streaming=True),
                      str(path), tokenizer))
    while True:
        try:
            yield next(rows)
        except StopIteration:
            return
        except PuzzleError:
            raise
        except Exception as e:  # noqa: BLE001 - any reader failure of a user's file is that file's problem
            raise PuzzleError(f"data.files: {str(path)!r} is not a readable {kind} file ({str(e).splitlines()[0]})") from None


def iter_documents(section: DataSection, tokenizer=None) -> Iterator[str]:
    """The documents, in a fixed order, one at a time: a text file is one document, a table file (jsonl, json,
    parquet, arrow) or a hub dataset one per row. `tokenizer` renders chat messages."""
    if section.hub is not None:
        table = _quiet_datasets().load_dataset(section.hub.name, split=section.hub.split, streaming=True)
        yield from _rows(section, table, section.hub.name, tokenizer)
        return
    for f in resolve_files(section.files):
        kind = TABLE_FORMATS.get(f.suffix.lower())
        if kind is None:
            yield _read_text(f)
        else:
            yield from _table_rows(section, kind, f, tokenizer)


def read_documents(section: DataSection, tokenizer=None) -> list[str]:
    """Every document (for what needs them all at once: training a tokenizer on a small corpus)."""
    return list(iter_documents(section, tokenizer))


def tokenize_documents(docs: Iterable[str], tokenizer, chunk: int = 256) -> Iterator[np.ndarray]:
    """The documents' tokens as int32 arrays, an end-of-sequence token after each, `chunk` documents at a time;
    an error when no document has text."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise PuzzleError("the tokenizer has no end-of-sequence token to separate documents")
    has_text = False
    docs = iter(docs)
    while batch := [d for _, d in zip(range(chunk), docs)]:
        has_text = has_text or any(d.strip() for d in batch)
        encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        yield np.concatenate([np.asarray(ids + [eos], dtype=np.int32) for ids in encoded])
    if not has_text:
        raise PuzzleError("data: the documents contain no text")


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


def split_starts(tokens: int, section: DataSection) -> tuple[np.ndarray, np.ndarray]:
    """Token offsets of the training and validation blocks: a fixed, seeded choice of held-out blocks."""
    import torch

    n = tokens // section.sequence_length
    n_val = split_sizes(tokens, section)[1]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(section.split_seed))
    val_idx, train_idx = order[:n_val].sort().values.numpy(), order[n_val:].sort().values.numpy()
    return train_idx * section.sequence_length, val_idx * section.sequence_length


def count_tokens(config: PuzzleConfig) -> int:
    """Tokens the job's data gives with the job's tokenizer (data.tokenizer, else the parent's): the size of the
    run's token file when it exists, else counted by tokenizing (nothing is written)."""
    from transformers import AutoTokenizer

    section, parent = config.data, config.parent
    tokenizer = AutoTokenizer.from_pretrained(section.tokenizer or parent.path, trust_remote_code=parent.trust_remote_code)
    file = Path(config.run.dir) / "tokens" / f"{stream_key(section, tokenizer)}.int32"
    if file.is_file():
        return file.stat().st_size // 4
    return sum(len(chunk) for chunk in tokenize_documents(iter_documents(section, tokenizer), tokenizer))


def _blocks(tokens: np.ndarray, identity: str, section: DataSection) -> TokenBlocks:
    train, validation = split_starts(len(tokens), section)
    h = hashlib.sha256(identity.encode())
    h.update(f"{section.sequence_length}/{section.validation_fraction}/{section.split_seed}".encode())
    length = section.sequence_length
    return TokenBlocks(BlockSet(tokens, train, length), BlockSet(tokens, validation, length), h.hexdigest()[:16])


def load_blocks(section: DataSection, tokenizer) -> TokenBlocks:
    """Blocks of a small corpus tokenized in memory (parent training: no run directory to cache it in)."""
    tokens = np.concatenate(list(tokenize_documents(iter_documents(section, tokenizer), tokenizer)))
    return _blocks(tokens, hashlib.sha256(tokens.tobytes()).hexdigest(), section)


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


def token_stream(section: DataSection, tokenizer, cache: Path) -> tuple[np.ndarray, str]:
    """The job's token stream, memory-mapped from `cache`, where the first call writes it by streaming the
    documents through the tokenizer; every later stage and job reads the file.

    The file is int32 tokens, written whole or not at all; its name is the stream's key."""
    from puzzle.progress import progress_bar

    key = stream_key(section, tokenizer)
    file = cache / f"{key}.int32"
    if not file.is_file():
        with atomic_path(file) as tmp, open(tmp, "wb") as out, progress_bar() as bar:
            task = bar.add_task("tokenizing the documents", total=None, status="")
            written = 0
            for chunk in tokenize_documents(iter_documents(section, tokenizer), tokenizer):
                chunk.tofile(out)
                written += len(chunk)
                bar.update(task, status=f"{written:,} tokens")
    return np.memmap(file, dtype=np.int32, mode="r"), key


def job_blocks(config: PuzzleConfig, parent_tokenizer) -> TokenBlocks:
    """The job's token blocks, with `data.tokenizer` when set and the parent's tokenizer otherwise, from the
    run's token file (RUN_DIR/tokens/), which the first stage that needs it writes."""
    tokenizer = parent_tokenizer
    if config.data.tokenizer is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.data.tokenizer, trust_remote_code=config.parent.trust_remote_code)
    tokens, key = token_stream(config.data, tokenizer, Path(config.run.dir) / "tokens")
    return _blocks(tokens, key, config.data)
