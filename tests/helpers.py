"""Helpers shared by the test modules: plain functions and constants, no fixtures (those are in conftest.py).

No test module imports from another test module; what more than one of them needs lives here.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
SONNETS = str(ROOT / "examples/data/shakespeare/sonnets.txt")
LUCRECE = str(ROOT / "examples/data/shakespeare/rape_of_lucrece.txt")

# Overrides that keep a `write_job` job quick: a short BLD (64 tokens per candidate), one scoring block, a
# small measured profile.
FAST = ["bld.tokens_per_candidate=64", "search.allow_unreliable_profile=true", "scoring.validation_blocks=1", "profile.weight_dtype=float32",
        "profile.prefill_length=16", "profile.decode_length=4", "profile.warmup=1", "profile.repeats=3"]


# --- job files -------------------------------------------------------------------------------------------


def write_job(tmp_path: Path, parent: Path, name: str = "job", **bld_changes) -> Path:
    """A stage-by-stage job on the sonnets: `tmp_path/<name>.yaml`, run directory `tmp_path/<name>`."""
    raw = {
        "run": {"dir": str(tmp_path / name), "seed": 0},
        "parent": {"path": str(parent)},
        "data": {
            "files": [SONNETS],
            "sequence_length": 64, "validation_fraction": 0.1, "calibration_blocks": 4,
        },
        "library": {"windows": [8], "ffn_fractions": [0.5]},
        "bld": {
            "sequence_length": 32, "batch_size": 2, "tokens_per_candidate": 8 * 2 * 32, "learning_rate": 1e-3,
            "eval_blocks": 2, "checkpoint_every": 2, **bld_changes,
        },
        "eval": {"batch_size": 2},
        # Within the tiny parents' context (128 positions), which every command checks before it starts.
        "profile": {"prefill_length": 16, "decode_length": 4},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def pipeline_job(tmp_path: Path, parent: Path, **changes) -> Path:
    """A whole-pipeline job (`puzzle run`) on two files: `tmp_path/job.yaml`, run directory `tmp_path/run`.

    `changes` update its sections, e.g. `kd={"tokens": 512}`.
    """
    raw = {
        "run": {"dir": str(tmp_path / "run")},
        "parent": {"path": str(parent)},
        "data": {"files": [SONNETS, LUCRECE], "sequence_length": 64, "validation_fraction": 0.1},
        "eval": {"validation_blocks": 4, "batch_size": 2},
        "bld": {"sequence_length": 32, "tokens_per_candidate": 128, "batch_size": 2},
        "scoring": {"validation_blocks": 2, "batch_size": 2},
        "profile": {"weight_dtype": "float32", "prefill_length": 16, "decode_length": 4, "warmup": 1, "repeats": 2},
        # Microsecond timings of tiny modules, two repeats: the profile is noise, and the search is told to take it.
        "search": {"budgets": {"params": "0.7x"}, "allow_unreliable_profile": True},
        "kd": {"tokens": 256, "batch_size": 2, "eval_blocks": 2},
    }
    for section, values in changes.items():
        raw.setdefault(section, {}).update(values)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# --- run directories -------------------------------------------------------------------------------------


def copy_run(source, tmp: Path, overrides=(), name: str = "job"):
    """A `write_job` job under `tmp` whose run directory starts as a copy of `source`'s (a loaded config).

    A stage's fingerprint leaves out the run directory, so the copied stages are reused, not redone; the
    copy keeps `source` (often a session fixture) untouched by whatever the test writes.
    Returns (job file, config with `overrides`).
    """
    from puzzle.config import load_config

    path = write_job(tmp, Path(source.parent.path), name)
    shutil.copytree(source.run.dir, tmp / name)
    return path, load_config(path, list(overrides))


def scored_job(tmp, parent, overrides=FAST, start_from=None):
    """A tiny job with its library trained, its blocks scored and profiled: what search and later stages read.

    `start_from` (a config): begin from a copy of that job's run directory (and its parent), so that what it
    has already finished with the same settings (e.g. the session's library) is reused, not redone.
    """
    from puzzle.api import distill_stage, profile_stage, score_stage
    from puzzle.config import load_config

    if start_from is not None:
        path, config = copy_run(start_from, tmp, overrides)
    else:
        path = write_job(tmp, parent)
        config = load_config(path, overrides)
    distill_stage(config)
    score_stage(config)
    profile_stage(config)
    return path, config


def library_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every library entry, keyed by file and tensor name."""
    out = {}
    for f in sorted((run_dir / "library/entries").glob("*.safetensors")):
        for k, v in load_file(f).items():
            out[f"{f.name}/{k}"] = v
    return out


def with_solution(config, blocks: list[str]):
    """Write a solutions file by hand, as a search would, to realize chosen architectures."""
    from puzzle.api import realize_stage
    from puzzle.blocks.specs import BlockChoice

    file = config.run.dir / "search/solutions.json"
    file.parent.mkdir(parents=True, exist_ok=True)
    layers = [{"layer": i, **BlockChoice.from_id(b).to_json()} for i, b in enumerate(blocks)]
    file.write_text(json.dumps({"solutions": [{"layers": layers}]}))
    return realize_stage(config, 0)


# --- models ----------------------------------------------------------------------------------------------


def with_random_norms(model):
    """Norm weights other than ones, so that a fusion that forgot to fold them fails."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(torch.rand_like(p) + 0.5)
    return model.eval()


# --- the command line ------------------------------------------------------------------------------------


def cli(monkeypatch, capsys, *args):
    """Run `puzzle *args` in this process. Returns (exit code, captured): `captured.out`, `captured.err`
    (pytest's CaptureResult, so `code, (out, err) = cli(...)` unpacks it too)."""
    from puzzle.cli import main

    monkeypatch.setattr(sys, "argv", ["puzzle", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    return code, capsys.readouterr()


def assert_clean_failure(code, err, tmp_path, *fragments):
    assert code == 2
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err
    assert not (tmp_path / "run").exists(), "a failed command must not write its run directory"


def hybrid_parent(directory: Path, tokenizer_parent: Path, **config_changes) -> Path:
    """A tiny random Nemotron-H parent (`tests.tiny`) with `tokenizer_parent`'s tokenizer, saved in `directory`;
    `config_changes` edit its config.json afterwards."""
    from tests.tiny import tiny_model

    tokenizer = json.loads((tokenizer_parent / "config.json").read_text())["vocab_size"]
    tiny_model("nemotron_h", vocab_size=tokenizer).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_parent / name, directory / name)
    if config_changes:
        data = json.loads((directory / "config.json").read_text())
        data.update(config_changes)
        (directory / "config.json").write_text(json.dumps(data))
    return directory


def grid_llama(directory: Path, hidden_size: int, max_position_embeddings: int = 128) -> Path:
    """A tiny Llama whose FFN width (512) is on the engines' 256 grid, with a byte-fallback tokenizer: 3 layers,
    4 query heads and 2 KV heads (head size hidden_size / 4; vLLM's CPU build takes 32, not 16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from puzzle.tokenizer import build_tokenizer

    tokenizer = build_tokenizer([open(SONNETS).read()], vocab_size=384)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=512, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def engine_check_module():
    """scripts/engine_check.py as a module: its cases, realize and its engines' reality, for the engine tests."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("engine_check", ROOT / "scripts/engine_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
