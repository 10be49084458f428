"""The bad-input catalog: every case is refused with exit code 2 and one line per problem naming the key or
file, without a traceback and without changing anything on disk (the file list and every file's checksum
are the same before and after). No case starts real work: each fails in the checks that run first.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

from puzzle.cli import main

ROOT = Path(__file__).resolve().parent.parent
TEXT = (ROOT / "examples/data/shakespeare/sonnets.txt").read_text()[:20_000]


@dataclass(frozen=True)
class Case:
    id: str
    args: list[str]  # after `puzzle`; {job}, {ws} are filled in
    expect: str  # a fragment of the one problem line
    job: dict = field(default_factory=dict)  # changes to the standard job
    setup: Callable[[Path], None] | None = None  # damages or prepares files in the workspace


def _job(ws: Path, changes: dict) -> dict:
    job = {
        "parent": {"path": str(ws / "parent")},
        "data": {"files": [str(ws / "data.txt")], "sequence_length": 64},
        "run": {"dir": str(ws / "run")},
        "bld": {"sequence_length": 32, "tokens_per_candidate": 128, "batch_size": 2},
        "kd": {"tokens": 256, "batch_size": 2},
        "profile": {"device": "h100", "prefill_length": 16, "decode_length": 8},
        "search": {"budgets": {"params": "0.7x"}},
    }
    for section, values in changes.items():
        if values is None:
            job.pop(section, None)
        elif isinstance(values, dict) and isinstance(job.get(section), dict):
            job[section] = {**job[section], **values}
        else:
            job[section] = values
    return job


def _write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


def _raw(text: str) -> Callable[[Path], None]:
    """Replace the job file by this text ({ws} filled in)."""
    return lambda ws: _write(ws / "job.yaml", text.replace("{ws}", str(ws)))


def _weights(ws: Path) -> Path:
    return ws / "parent/model.safetensors"


def _truncate(ws: Path) -> None:
    data = _weights(ws).read_bytes()
    _write(_weights(ws), data[: len(data) // 2])


def _bin_only(ws: Path) -> None:
    _weights(ws).rename(ws / "parent/pytorch_model.bin")


def _stage_done(ws: Path, stage: str, files: dict[str, str]) -> None:
    """A stage folder as a finished stage leaves it (manifest and the given files)."""
    for name, text in files.items():
        _write(ws / "run" / stage / name, text)
    _write(ws / "run" / stage / "manifest.json", json.dumps({"stage": stage, "status": "done", "fingerprint": "x"}))


def _solutions(text: str) -> Callable[[Path], None]:
    return lambda ws: _stage_done(ws, "search", {"solutions.json": text})


GOOD_SOLUTION = json.dumps({"solutions": [{"layers": [
    {"layer": i, "attention": "attention.kv2", "ffn": "ffn.i96", "coupled": False} for i in range(2)]}]})

CASES = [
    # --- the config file: syntax, keys, types, values ------------------------------------------------------
    Case("yaml-syntax", ["validate", "{job}"], "malformed YAML at line", setup=_raw("parent: {path: [x\n")),
    Case("yaml-not-mapping", ["validate", "{job}"], "top level must be a mapping", setup=_raw("- a\n- b\n")),
    Case("yaml-python-tag", ["validate", "{job}"], "could not determine a constructor",
         setup=_raw("parent: !!python/object/apply:os.system [echo]\n")),
    Case("yaml-duplicate-key", ["validate", "{job}"], "duplicate key 'tokens' (first at line 4, again at line 5)",
         setup=_raw("parent: {path: {ws}/parent}\ndata: {files: [{ws}/data.txt]}\nkd:\n  tokens: 512\n  tokens: 9\n")),
    Case("yaml-duplicate-section", ["validate", "{job}"], "duplicate key 'kd' (first at line 3, again at line 4)",
         setup=_raw("parent: {path: {ws}/parent}\ndata: {files: [{ws}/data.txt]}\nkd: {tokens: 512}\nkd: {tokens: 9}\n")),
    Case("yaml-not-utf8", ["validate", "{job}"], "not a text file (UTF-8 expected)",
         setup=lambda ws: _write(ws / "job.yaml", b"\xff\xfe\x00parent")),
    Case("config-missing", ["validate", "{ws}/none.yaml"], "file not found"),
    Case("config-is-directory", ["validate", "{ws}/parent"], "is a directory; give a YAML config file"),
    Case("unknown-section", ["validate", "{job}"], "trainer: unknown key", job={"trainer": {"steps": 1}}),
    Case("unknown-key", ["validate", "{job}"], "kd.tokenz: unknown key; did you mean 'tokens'?", job={"kd": {"tokenz": 1}}),
    Case("wrong-type", ["validate", "{job}"], "kd.tokens: got 'many'", job={"kd": {"tokens": "many"}}),
    Case("parent-section-missing", ["validate", "{job}"], "parent: required, not given", job={"parent": None}),
    Case("infinite-learning-rate", ["validate", "{job}"], "kd.learning_rate: got inf; Input should be a finite number",
         job={"kd": {"learning_rate": float("inf")}}),
    Case("infinite-kl-weight", ["validate", "{job}"], "kd.kl_weight: got inf; Input should be a finite number",
         job={"kd": {"kl_weight": float("inf")}}),
    Case("nan-bld-learning-rate", ["validate", "{job}"], "bld.learning_rate: got nan",
         job={"bld": {"learning_rate": float("nan")}}),
    Case("negative-count", ["validate", "{job}"], "bld.batch_size: got 0", job={"bld": {"batch_size": 0}}),
    Case("budget-not-a-number", ["validate", "{job}"], "budget 'latency=abc': 'abc' is not a number",
         job={"search": {"budgets": {"latency": "abc"}}}),
    Case("budget-unknown-kind", ["validate", "{job}"], "unknown budget 'speed'", job={"search": {"budgets": {"speed": "2x"}}}),
    Case("budget-not-a-mapping", ["validate", "{job}"], "expected a mapping of budget kinds to values",
         job={"search": {"budgets": ["latency=0.5x"]}}),
    Case("budget-negative", ["validate", "{job}"], "the value must be positive", job={"search": {"budgets": {"params": "0x"}}}),
    Case("profile-device-unknown", ["validate", "{job}"], "profile.device: got 'h1000'; unknown device 'h1000'",
         job={"profile": {"device": "h1000"}}),
    Case("fp8-weights-on-a100", ["validate", "{job}"], "fp8 cannot be profiled on a100",
         job={"profile": {"device": "a100", "weight_dtype": "fp8"}}),
    Case("coupled-pair-malformed", ["validate", "{job}"], "bld.coupled_pairs.0: got 'attention.kv1'",
         job={"bld": {"coupled_pairs": ["attention.kv1"]}}),
    Case("coupled-pair-not-in-library", ["validate", "{job}"], "'attention.kv1+ffn.i7' names a candidate that is not",
         job={"bld": {"coupled_pairs": ["attention.kv1+ffn.i7"]}}),
    Case("data-files-and-hub", ["validate", "{job}"], "give exactly one of data.files",
         job={"data": {"hub": {"name": "x"}}}),
    Case("kd-all-weights-zero", ["validate", "{job}"], "nothing to train on",
         job={"kd": {"kl_weight": 0, "cosine_weight": 0}}),
    Case("job-sets-shared-section", ["validate", "{job}"], "jobs.a.bld: a job can set only search, realize, kd, eval",
         job={"jobs": {"a": {"bld": {"batch_size": 2}}}}),
    Case("sequence-beyond-context", ["validate", "{job}"], "data.sequence_length: got 4096; the parent attends over at most 128",
         job={"data": {"sequence_length": 4096}}),
    Case("prefill-beyond-context", ["validate", "{job}"], "profile.prefill_length: 1000 + profile.decode_length 8 tokens exceed",
         job={"profile": {"prefill_length": 1000}}),
    Case("kv-heads-not-a-divisor", ["validate", "{job}"], "library.kv_heads: 3 does not divide the parent's 2 KV heads",
         job={"library": {"kv_heads": [3]}}),
    Case("ffn-size-too-large", ["validate", "{job}"], "library.ffn_sizes: 500 is outside 1..96",
         job={"library": {"ffn_sizes": [500]}}),
    Case("experts-on-dense-parent", ["validate", "{job}"], "library.experts: the parent has no MoE layers",
         job={"library": {"experts": [2]}}),
    Case("bld-longer-than-data", ["validate", "{job}"], "bld.sequence_length: 64 is longer than data.sequence_length (32)",
         job={"data": {"sequence_length": 32}, "bld": {"sequence_length": 64}}),
    Case("kd-budget-under-one-batch", ["validate", "{job}"], "kd.tokens: got 10; one step takes", job={"kd": {"tokens": 10}}),
    Case("eval-task-file-missing", ["validate", "{job}"], "eval.tasks: 'missing_task.yaml' is not a file",
         job={"eval": {"tasks": ["missing_task.yaml"]}}),
    Case("validation-fraction", ["validate", "{job}"], "data.validation_fraction: got 1.5",
         job={"data": {"validation_fraction": 1.5}}),
    Case("set-malformed", ["validate", "{job}", "--set", "kd.tokens"], "expected KEY.SUB=VALUE"),
    Case("set-unknown-key", ["validate", "{job}", "--set", "kd.nope=1"], "kd.nope: unknown key"),
    # --- command-line flags ---------------------------------------------------------------------------------
    Case("flag-budget-malformed", ["search", "{job}", "--budget", "latency"], "expected KIND=VALUE"),
    Case("flag-budget-unknown", ["search", "{job}", "--budget", "speed=2x"], "unknown budget 'speed'"),
    Case("flag-budget-twice", ["search", "{job}", "--budget", "latency=0.3x", "--budget", "latency=0.9x"],
         "latency is already given as 'latency=0.3x'"),
    Case("flag-budget-unit", ["validate", "{job}", "--budget", "memory=5XB"], "unknown unit 'xb' for memory"),
    Case("flag-sweep-malformed", ["search", "{job}", "--sweep", "latency=1x"], "expected KIND=LOW:HIGH:STEPS"),
    Case("flag-sweep-one-step", ["validate", "{job}", "--sweep", "latency=0.3x:1x:1"], "STEPS must be an integer of at least 2"),
    Case("flag-sweep-mixed-units", ["validate", "{job}", "--sweep", "latency=0.3x:1s:4"], "both ends as ratios"),
    Case("flag-solutions-zero", ["search", "{job}", "--solutions", "0"], "search.solutions: got 0"),
    Case("flag-min-diff-zero", ["search", "{job}", "--min-diff", "0"], "search.min_diff: got 0"),
    Case("flag-processes-zero", ["distill", "{job}", "--num-processes", "0"], "--num-processes: got 0"),
    Case("flag-processes-negative", ["kd", "{job}", "--num-processes", "-1"], "--num-processes: got -1"),
    Case("flag-check-negative", ["profile", "{job}", "--check", "-1"], "--check: got -1"),
    Case("flag-check-on-roofline", ["profile", "{job}", "--check", "2"], "--check: times whole models here"),
    Case("flag-device-unknown", ["profile", "{job}", "--device", "banana"], "profile.device: got 'banana'"),
    Case("flag-job-unknown", ["realize", "{job}", "--job", "nope"], "--job: got 'nope'"),
    Case("flag-solution-negative", ["realize", "{job}", "--solution", "-1"], "realize.solution: got -1"),
    Case("flag-kv-dtype", ["eval", "{job}", "--kv-dtype", "fp4"], "eval.kv_dtype: got 'fp4'"),
    Case("flag-max-distance", ["fuse", "{job}", "--max-distance", "0"], "--max-distance: got 0.0"),
    Case("flag-baseline-method", ["baseline", "nonsense", "{job}"], "search.method: got 'nonsense'"),
    # --- the parent's files ---------------------------------------------------------------------------------
    Case("parent-missing", ["validate", "{job}"], "parent.path: '{ws}/nowhere' does not exist",
         job={"parent": {"path": "{ws}/nowhere"}}),
    Case("parent-no-config", ["validate", "{job}"], "has no config.json",
         setup=lambda ws: (ws / "parent/config.json").unlink()),
    Case("parent-config-not-json", ["validate", "{job}"], "config.json is not valid JSON",
         setup=lambda ws: _write(ws / "parent/config.json", "{oops")),
    Case("parent-unsupported-family", ["validate", "{job}"], "parent.path: model_type 'bert' is not supported",
         setup=lambda ws: _write(ws / "parent/config.json", json.dumps({"model_type": "bert"}))),
    Case("parent-bin-only", ["validate", "{job}"], "has only pickled weights (pytorch_model.bin)", setup=_bin_only),
    Case("parent-no-weights", ["validate", "{job}"], "has no model weights (*.safetensors)",
         setup=lambda ws: _weights(ws).unlink()),
    Case("parent-truncated-weights", ["validate", "{job}"], "model.safetensors is damaged", setup=_truncate),
    Case("parent-zero-byte-weights", ["validate", "{job}"], "model.safetensors is damaged",
         setup=lambda ws: _write(_weights(ws), b"")),
    Case("parent-damaged-header", ["validate", "{job}"], "model.safetensors is damaged",
         setup=lambda ws: _write(_weights(ws), b"\xff" * 64 + _weights(ws).read_bytes()[64:])),
    Case("parent-index-missing-shard", ["validate", "{job}"], "names shards that are not there: model-2.safetensors",
         setup=lambda ws: _write(ws / "parent/model.safetensors.index.json",
                                 json.dumps({"weight_map": {"lm_head.weight": "model-2.safetensors"}}))),
    Case("parent-no-tokenizer", ["validate", "{job}"], "parent.path: no tokenizer loads",
         setup=lambda ws: [p.unlink() for p in (ws / "parent").glob("tokenizer*")]),
    Case("parent-device-banana", ["validate", "{job}"], "parent.device: 'banana' is not a torch device",
         job={"parent": {"device": "banana"}}),
    Case("parent-device-cuda", ["validate", "{job}"], "no CUDA device is available here", job={"parent": {"device": "cuda"}}),
    Case("kd-child-not-a-checkpoint", ["validate", "{job}"], "kd.child: '{ws}/data.txt' is not a child checkpoint",
         job={"kd": {"child": "{ws}/data.txt"}}),
    Case("kd-child-pickled", ["validate", "{job}"], "kd.child: '{ws}/pickled' has only pickled weights",
         job={"kd": {"child": "{ws}/pickled"}},
         setup=lambda ws: (_write(ws / "pickled/config.json", "{}"), _write(ws / "pickled/pytorch_model.bin", b"x"))),
    # --- the data -------------------------------------------------------------------------------------------
    Case("data-file-missing", ["validate", "{job}"], "data.files: '{ws}/gone.txt' is not a file",
         job={"data": {"files": ["{ws}/gone.txt"]}}),
    Case("data-glob-empty", ["validate", "{job}"], "data.files: no file matches", job={"data": {"files": ["{ws}/*.md"]}}),
    Case("data-not-utf8", ["validate", "{job}"], "is not UTF-8 text",
         setup=lambda ws: _write(ws / "data.txt", b"\xff\xfe\xfa" * 100)),
    Case("data-empty", ["validate", "{job}"], "data: the documents contain no text",
         setup=lambda ws: _write(ws / "data.txt", "  \n\n")),
    Case("data-too-few-tokens", ["validate", "{job}"], "too few for blocks of 64 with a validation split",
         setup=lambda ws: _write(ws / "data.txt", "Shall I compare thee to a summer's day?")),
    Case("data-is-a-directory", ["validate", "{job}"], "is not a file", job={"data": {"files": ["{ws}/parent"]}}),
    Case("data-tokenizer-missing", ["validate", "{job}"], "data.tokenizer: '{ws}/tok' is not a directory",
         job={"data": {"tokenizer": "{ws}/tok"}}),
    # --- the run directory ----------------------------------------------------------------------------------
    Case("run-dir-is-a-file", ["validate", "{job}"], "run.dir: '{ws}/data.txt' is a file", job={"run": {"dir": "{ws}/data.txt"}}),
    Case("run-dir-under-a-file", ["validate", "{job}"], "run.dir: '{ws}/data.txt' is a file, so",
         job={"run": {"dir": "{ws}/data.txt/run"}}),
    Case("run-dir-not-creatable", ["validate", "{job}"], "run.dir: '/proc/puzzle-run' cannot be created",
         job={"run": {"dir": "/proc/puzzle-run"}}),
    # --- stages run out of order ----------------------------------------------------------------------------
    Case("score-before-distill", ["score", "{job}"], "no library in"),
    Case("profile-before-distill", ["profile", "{job}"], "no library in"),
    Case("search-before-score", ["search", "{job}"], "scores/scores.csv does not exist; run `puzzle score` first"),
    Case("sweep-before-score", ["search", "{job}", "--sweep", "params=0.5x:1x:3"], "run `puzzle score` first"),
    Case("baseline-before-score", ["baseline", "greedy", "{job}"], "run `puzzle score` first"),
    Case("realize-before-search", ["realize", "{job}"], "search/solutions.json does not exist; run `puzzle search` first"),
    Case("kd-before-realize", ["kd", "{job}"], "child/checkpoint does not exist; run `puzzle realize` first"),
    Case("eval-before-realize", ["eval", "{job}"], "child/checkpoint does not exist; run `puzzle realize` first"),
    Case("report-before-eval", ["report", "{job}"], "search/solutions.json does not exist"),
    Case("fuse-without-a-child", ["fuse", "{job}"], "no child to fuse"),
    Case("fuse-child-not-a-run", ["fuse", "{ws}/parent"], "not a child checkpoint inside a run directory"),
    # --- damaged outputs of earlier stages ------------------------------------------------------------------
    Case("manifest-not-json", ["score", "{job}"], "manifest.json: not valid JSON",
         setup=lambda ws: (_stage_done(ws, "library", {"space.json": "{}"}),
                           _write(ws / "run/library/manifest.json", "{broken"))),
    Case("solutions-not-json", ["realize", "{job}"], "solutions.json: damaged, not valid JSON", setup=_solutions("{oops")),
    Case("solutions-unknown-block", ["realize", "{job}"], "'attention.kv9z' is not a candidate id",
         setup=_solutions(GOOD_SOLUTION.replace("attention.kv2", "attention.kv9z"))),
    Case("solutions-without-solutions", ["realize", "{job}"], "solutions.json: damaged",
         setup=_solutions(json.dumps({"method": "mip"}))),
    Case("solution-index-beyond", ["realize", "{job}", "--solution", "3"], "solution 3 does not exist: the search found 1",
         setup=_solutions(GOOD_SOLUTION)),
]


def _fill(value, ws: Path):
    if isinstance(value, str):
        return value.replace("{ws}", str(ws))
    if isinstance(value, dict):
        return {k: _fill(v, ws) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, ws) for v in value]
    return value


def _snapshot(ws: Path) -> dict[str, str]:
    return {str(p.relative_to(ws)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(ws.rglob("*"))}


@pytest.fixture
def workspace(tmp_path, tiny_parent_dir) -> Path:
    shutil.copytree(tiny_parent_dir, tmp_path / "parent")
    (tmp_path / "data.txt").write_text(TEXT)
    return tmp_path


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_refused_in_one_line_and_leaves_the_disk_as_it_was(case, workspace, monkeypatch, capsys):
    ws = workspace
    (ws / "job.yaml").write_text(yaml.safe_dump(_fill(_job(ws, case.job), ws)))
    if case.setup is not None:
        case.setup(ws)
    before = _snapshot(ws)
    monkeypatch.setattr(sys, "argv", ["puzzle", *(a.replace("{job}", str(ws / "job.yaml")).replace("{ws}", str(ws))
                                                  for a in case.args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err and err.startswith("error: "), err
    lines = err.rstrip("\n").splitlines()
    header, problems = lines[0], [line.strip() for line in lines[1:]]
    if header.endswith("problem(s)"):
        assert header.endswith(f" {len(problems)} problem(s)") and all(line.startswith("  ") for line in lines[1:])
    else:
        assert problems == [], err  # a single error: exactly one line
        problems = [header.removeprefix("error: ")]
    expected = case.expect.replace("{ws}", str(ws))
    assert any(expected in p for p in problems), err
    assert _snapshot(ws) == before


def test_the_catalog_covers_every_class():
    classes = {
        "config": [c for c in CASES if c.args[0] == "validate" and not c.setup and not c.id.startswith(("parent", "data", "run"))],
        "flags": [c for c in CASES if c.id.startswith("flag")],
        "parent files": [c for c in CASES if c.id.startswith(("parent", "kd-child"))],
        "data": [c for c in CASES if c.id.startswith("data")],
        "run directory": [c for c in CASES if c.id.startswith("run-dir")],
        "stage order": [c for c in CASES if "before" in c.id or c.id.startswith("fuse")],
        "damaged artifacts": [c for c in CASES if c.id.startswith(("manifest", "solution"))],
    }
    assert all(len(cases) >= 3 for cases in classes.values()), {k: len(v) for k, v in classes.items()}
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)
