"""Parent and children measured in llama.cpp, the engine itself (optional: `pip install llama-cpp-python`).

Each model is converted by llama.cpp's own converter (`convert_hf_to_gguf.py`, from llama.cpp or the
llama-cpp-python source, given as --converter) to a float32 GGUF, run by llama.cpp's runtime on a held-out
block, and checked against transformers on the same token ids: the relative error of the logits
(‖llama.cpp − transformers‖ / ‖transformers‖) and the share of positions whose argmax agrees. Prefill
tokens/s is one forward of the block; decode tokens/s is one token at a time after the first; each is the
fastest of 3 rounds.
`puzzle eval JOB --engine llama.cpp --converter PATH` writes RUN_DIR/eval/llama_cpp.json, which the report
shows beside the speedups the cost model predicted and PyTorch measured.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from puzzle.config import PuzzleConfig
from puzzle.errors import PuzzleError
from puzzle.io import atomic_path, atomic_write_json
from puzzle.rundir import RunDir, Stage


ROUNDS = 3


@dataclass(frozen=True)
class EngineRun:
    name: str
    relative_error: float
    argmax_agreement: float
    prefill_tokens_per_second: float
    decode_tokens_per_second: float


@dataclass(frozen=True)
class EngineSummary:
    runs: list[EngineRun]
    tokens: int  # of the checked block
    file: Path

    def speedup(self, name: str, phase: str) -> float:
        """The model's tokens/s over the parent's in `phase` (prefill or decode)."""
        rate = {r.name: getattr(r, f"{phase}_tokens_per_second") for r in self.runs}
        return rate[name] / rate["parent"]


def _converted(model: Path, out: Path, converter: Path) -> Path:
    """`model` as a float32 GGUF made by llama.cpp's converter; its refusal is the engine's verdict."""
    if out.is_file():
        return out
    with atomic_path(out) as tmp:
        done = subprocess.run([sys.executable, str(converter), str(model), "--outfile", str(tmp), "--outtype", "f32"],
                              capture_output=True, text=True)
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise PuzzleError(f"llama.cpp's converter refused {model}: {last}")
    return out


class _Runner:
    """One model in llama.cpp's runtime, on one block of token ids."""

    def __init__(self, gguf: Path, tokens: list[int], decode: int):
        from llama_cpp import Llama

        self.tokens, self.decode = tokens, decode
        self.llm = Llama(model_path=str(gguf), n_ctx=len(tokens) + 8, logits_all=True, verbose=False,
                         n_threads=max(1, (os.cpu_count() or 1)))

    def prefill(self) -> float:
        self.llm.reset()
        began = time.perf_counter()
        self.llm.eval(self.tokens)
        return time.perf_counter() - began

    def logits(self) -> torch.Tensor:
        import numpy as np

        self.prefill()
        return torch.from_numpy(np.array(self.llm.scores[: len(self.tokens)], dtype=np.float32))

    def one_at_a_time(self) -> float:
        self.llm.reset()
        self.llm.eval(self.tokens[:1])
        began = time.perf_counter()
        for token in self.tokens[1: self.decode + 1]:
            self.llm.eval([token])
        return time.perf_counter() - began


def _timed(runners: dict[str, _Runner]) -> dict[str, tuple[float, float]]:
    """(prefill, decode) seconds of each model: the models take turns in each round and the fastest round of
    each is kept (the project's timing rule, docs/design.md §14), so load on the machine hits them alike."""
    best = {name: (float("inf"), float("inf")) for name in runners}
    for _ in range(ROUNDS):
        for name, runner in runners.items():
            prefill, decode = runner.prefill(), runner.one_at_a_time()
            best[name] = (min(best[name][0], prefill), min(best[name][1], decode))
    return best


def evaluated_models(config: PuzzleConfig) -> list[tuple[str, Path]]:
    """The models an engine evaluation runs, parent first: those of the job that exist."""
    run = RunDir.of(config)
    found = [("parent", Path(config.parent.path).expanduser()), ("child", run.stage_dir(Stage.child) / "checkpoint"),
             ("child + KD", run.stage_dir(Stage.kd) / "checkpoint")]
    return [(name, path) for name, path in found if (path / "config.json").is_file()]


def engine_eval(config: PuzzleConfig, converter: Path, tokens: int = 128, decode: int = 64) -> EngineSummary:
    """Parent and children converted, checked and timed in llama.cpp (see the module's docstring)."""
    from puzzle.checkpoint import load_child
    from puzzle.data import job_blocks
    from puzzle.parents import load_parent

    if not Path(converter).is_file():
        raise PuzzleError(f"--converter: {str(converter)!r} is not a file; give llama.cpp's convert_hf_to_gguf.py "
                          "(in llama.cpp's source, or vendor/llama.cpp in llama-cpp-python's)")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise PuzzleError("--engine llama.cpp: llama-cpp-python is not installed (pip install llama-cpp-python)") from None
    parent = load_parent(config.parent)
    block = job_blocks(config, parent.tokenizer).validation[0][: max(tokens, decode + 1)]
    directory = RunDir.of(config).stage_dir(Stage.eval)
    runners, checks = {}, {}
    for name, path in evaluated_models(config):
        model = parent.model if name == "parent" else load_child(path, torch.float32)
        with torch.no_grad():
            reference = model.float()(block[None]).logits[0].float()
        gguf = _converted(path, directory / "gguf" / f"{name.replace(' + ', '-').replace(' ', '-')}.gguf", converter)
        runners[name] = _Runner(gguf, block.tolist(), decode)
        logits = runners[name].logits()
        checks[name] = (((logits - reference).norm() / reference.norm()).item(),
                        (logits.argmax(-1) == reference.argmax(-1)).float().mean().item())
    seconds = _timed(runners)
    runs = [EngineRun(name, *checks[name], len(block) / seconds[name][0], decode / seconds[name][1]) for name in runners]
    file = directory / "llama_cpp.json"
    atomic_write_json(file, {"tokens": len(block), "decode": decode, "runs": [asdict(r) for r in runs]})
    return EngineSummary(runs, len(block), file)
