"""Data sources beyond plain text (jsonl, parquet, chat messages), and the run's token file tokenized once."""

import json
import shutil

import pandas as pd
import pytest
from transformers import AutoTokenizer

import puzzle.data as data
from puzzle.api import distill_stage, parent_stage
from puzzle.config import DataSection, load_config
from puzzle.errors import PuzzleError
from tests.helpers import SONNETS, write_job

TEXTS = [p for p in open(SONNETS, encoding="utf-8").read().split("\n\n") if p.strip()][:120]


def _section(files, **more) -> DataSection:
    return DataSection(files=[str(f) for f in files], sequence_length=32, **more)


def test_jsonl_and_parquet_give_one_document_per_row_of_the_text_column(tmp_path, tiny_parent_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_parent_dir)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    pd.DataFrame({"body": TEXTS}).to_parquet(tmp_path / "b.parquet")
    from_jsonl = data.read_documents(_section([tmp_path / "a.jsonl"], text_column="body"), tokenizer)
    from_parquet = data.read_documents(_section([tmp_path / "b.parquet"], text_column="body"), tokenizer)
    assert from_jsonl == from_parquet == TEXTS
    with pytest.raises(PuzzleError, match="data.text_column: 'text' is not a column of .*a.jsonl \\(columns: body, id\\)"):
        data.read_documents(_section([tmp_path / "a.jsonl"]), tokenizer)


def test_chat_messages_are_rendered_with_the_tokenizers_template(tmp_path, tiny_parent_dir):
    rows = [{"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": t[::-1]}]} for t in TEXTS[:5]]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    section = _section([tmp_path / "chat.jsonl"], messages_column="messages")
    tokenizer = AutoTokenizer.from_pretrained(tiny_parent_dir)
    with pytest.raises(PuzzleError, match="data.messages_column: the tokenizer has no chat template"):
        data.read_documents(section, tokenizer)
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}"
    docs = data.read_documents(section, tokenizer)
    assert docs[0] == f"<user> {TEXTS[0]}\n<assistant> {TEXTS[0][::-1]}\n" and len(docs) == 5


def test_the_token_file_is_written_once_and_read_by_later_stages_and_jobs(tmp_path, tiny_parent_dir, monkeypatch):
    config = load_config(write_job(tmp_path, tiny_parent_dir), ["bld.tokens_per_candidate=64"])
    calls = []
    real = data.tokenize_documents
    monkeypatch.setattr(data, "tokenize_documents", lambda *a, **k: calls.append(1) or real(*a, **k))
    parent_stage(config)
    files = list((tmp_path / "job/tokens").glob("*.int32"))
    assert len(calls) == 1 and len(files) == 1
    distill_stage(config)  # a later stage reads the file
    assert len(calls) == 1
    other = load_config(write_job(tmp_path, tiny_parent_dir, name="other"), ["bld.tokens_per_candidate=64"])
    shutil.copytree(tmp_path / "job/tokens", tmp_path / "other/tokens")
    parent_stage(other)  # another job (or run) with the same documents and tokenizer reads it too
    assert len(calls) == 1
    (tmp_path / "more.txt").write_text("A new document changes the stream.")
    changed = load_config(write_job(tmp_path, tiny_parent_dir), ["bld.tokens_per_candidate=64",
                                                                   f"data.files=[{SONNETS}, {tmp_path / 'more.txt'}]"])
    parent_stage(changed)
    assert len(calls) == 2 and len(list((tmp_path / "job/tokens").glob("*.int32"))) == 2
