"""`puzzle eval`: the parent, the realized child and the distilled child side by side.

Quality on held-out text against the parent (KL(parent ‖ model), perplexity, top-1 agreement with the
parent's greedy token); size (parameters, weight and KV-cache bytes at the profile's scenario); speed
measured here (prefill and decode tokens/s of the model's own forward with its KV cache, warm-up then
medians) next to the speed the cost model predicted. lm-evaluation-harness tasks run when installed.
Writes RUN_DIR/eval/results.json and results.csv.
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from puzzle.blocks.costs import DTYPE_BYTES, Scenario, kv_cache_bytes
from puzzle.blocks.errors import PuzzleError
from puzzle.blocks.io import atomic_path, atomic_write_json
from puzzle.blocks.specs import ParentShape, spec_from_id
from puzzle.distill.library import Library
from puzzle.config import PuzzleConfig
from puzzle.data import job_blocks
from puzzle.parents import load_parent
from puzzle.profile_stage import predicted_latency, read_profile, scenario_of
from puzzle.progress import progress_bar
from puzzle.realize_stage import LayerChoice, build_child, load_child
from puzzle.rundir import RunDir, Stage, fingerprint
from puzzle.search.profile import local_device_name, sync


@dataclass(frozen=True)
class ModelResult:
    name: str  # "parent" | "child" | "child + KD"
    parameters: int
    weight_bytes: float  # at profile.weight_dtype
    kv_bytes: float  # at the profile scenario
    kl: float  # mean KL(parent ‖ model) per token
    lm_loss: float
    perplexity: float
    top1: float  # agreement with the parent's greedy next token
    prefill_tokens_per_second: float
    decode_tokens_per_second: float
    measured_latency: float  # seconds per batch: prefill + every decode step, medians
    predicted_latency: float | None  # the cost model's sum of blocks + fixed, when the profile has every block
    tasks: dict[str, dict] = field(default_factory=dict)  # lm-evaluation-harness results per task
    kv_fp8_added_kl: float | None = None  # with eval.kv_dtype fp8: KL to the parent a simulated FP8 KV cache adds
    kv_fp8_scales: dict | None = None  # and its calibrated per-layer scales: layers, k, v


@dataclass(frozen=True)
class EvalSummary:
    models: list[ModelResult]
    scenario: Scenario
    device: str
    validation_tokens: int
    file: Path
    seconds: float

    def speedup(self, name: str, kind: str) -> float | None:
        """Parent latency over the model's: kind 'measured' or 'predicted'."""
        parent, model = self.models[0], next(m for m in self.models if m.name == name)
        a, b = getattr(parent, f"{kind}_latency"), getattr(model, f"{kind}_latency")
        return None if a is None or b is None else a / b


def eval_problems(config: PuzzleConfig) -> list[str]:
    """Problems with the eval section that can be seen before any work starts."""
    if not config.eval.tasks:
        return []
    if importlib.util.find_spec("lm_eval") is None:
        return [f"eval.tasks: got {config.eval.tasks}; lm-evaluation-harness is not installed "
                "(pip install lm-eval), or remove eval.tasks"]
    from lm_eval.tasks import TaskManager

    known = set(TaskManager().all_tasks)
    unknown = [t for t in config.eval.tasks if t not in known]
    return [f"eval.tasks: {', '.join(unknown)} not known to lm-evaluation-harness (see `lm_eval --tasks list`)"] if unknown else []


def evaluated_models(config: PuzzleConfig) -> list[tuple[str, Path]]:
    """The run's child and distilled child that exist; the child is required."""
    run = RunDir.of(config)
    child = run.stage_dir(Stage.child) / "checkpoint"
    if run.done_fingerprint(Stage.child) is None or not child.is_dir():
        raise PuzzleError(f"{child} does not exist; run `puzzle realize` first")
    models = [("child", child)]
    kd = run.stage_dir(Stage.kd) / "checkpoint"
    if run.done_fingerprint(Stage.kd) is not None and kd.is_dir():
        models.append(("child + KD", kd))
    return models


@torch.no_grad()
def quality(parent_logits_of, models: dict, blocks: torch.Tensor, batch_size: int) -> tuple[dict[str, dict[str, float]], int]:
    """KL to the parent, LM loss and top-1 agreement of each model (the parent included), and the tokens scored."""
    sums = {name: {"kl": 0.0, "lm": 0.0, "top1": 0.0} for name in ["parent", *models]}
    count = 0
    for start in range(0, len(blocks), batch_size):
        x = blocks[start : start + batch_size]
        p_logp = F.log_softmax(parent_logits_of(x)[:, :-1].float(), dim=-1)
        greedy = p_logp.argmax(-1)
        targets = x[:, 1:]
        count += targets.numel()
        outputs = {"parent": p_logp}
        for name, model in models.items():
            outputs[name] = F.log_softmax(model(x.to(model.device), use_cache=False).logits[:, :-1].float(), dim=-1)
        for name, logp in outputs.items():
            logp = logp.to(p_logp.device)
            sums[name]["kl"] += (p_logp.exp() * (p_logp - logp)).sum().item()
            sums[name]["lm"] += F.nll_loss(logp.flatten(0, 1), targets.flatten(), reduction="sum").item()
            sums[name]["top1"] += (logp.argmax(-1) == greedy).sum().item()
    return {name: {k: v / count for k, v in s.items()} for name, s in sums.items()}, count


@torch.no_grad()
def generation_times(model, scenario: Scenario, warmup: int, repeats: int) -> tuple[float, float]:
    """Median seconds of the prefill and of one decode step, through the model's own forward and KV cache."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (scenario.batch_size, scenario.prefill_length), generator=generator)
    ids = ids.to(device)

    def once() -> tuple[float, float]:
        sync(device)
        start = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        sync(device)
        prefilled = time.perf_counter()
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        for _ in range(scenario.decode_length):
            out = model(token, cache=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        sync(device)
        return prefilled - start, (time.perf_counter() - prefilled) / scenario.decode_length

    for _ in range(warmup):
        once()
    runs = [once() for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def kv_bytes_of(layers: list[tuple[str, ParentShape]], scenario: Scenario) -> float:
    return sum(kv_cache_bytes(spec_from_id(a), shape, scenario) for a, shape in layers)


def lm_eval_tasks(model, tokenizer, config: PuzzleConfig) -> dict[str, dict]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.eval.batch_size)
    results = lm_eval.simple_evaluate(model=wrapped, tasks=list(config.eval.tasks), limit=config.eval.task_limit)
    return {task: {k: v for k, v in r.items() if isinstance(v, (int, float))} for task, r in results["results"].items()}


def eval_stage(config: PuzzleConfig) -> EvalSummary:
    started = time.time()
    problems = eval_problems(config)
    if problems:
        raise PuzzleError("; ".join(problems))
    run = RunDir.of(config)
    models = evaluated_models(config)
    upstream = "-".join(str(run.done_fingerprint(s)) for s in (Stage.profile, Stage.child, Stage.kd))
    key = fingerprint(config, ("eval", "data", "parent", "profile")) + "-" + upstream
    file = run.stage_dir(Stage.eval) / "results.json"
    if run.is_done(Stage.eval, key) and file.is_file():
        return _read(file, time.time() - started)
    with run.stage(Stage.eval, key) as record:
        parent = load_parent(config.parent)
        device = parent.model.device
        dtype = next(parent.model.parameters()).dtype
        loaded = {name: load_child(path, dtype, device) for name, path in models}
        token_blocks = job_blocks(config.data, parent.tokenizer)
        blocks = token_blocks.validation[: config.eval.validation_blocks].to(device)
        scenario = scenario_of(config.profile)
        adapter = parent.adapter
        shapes = [adapter.shape(i) for i in range(adapter.num_layers)]
        choices = {"parent": [(s.attention.id, s.ffn.id) for s in shapes]}
        for name, path in models:
            layers = json.loads((path / "puzzle_child.json").read_text())["layers"]
            choices[name] = [(x["attention"], x["ffn"]) for x in layers]
        rows = _profile_rows(run)
        with progress_bar() as bar:
            fp8 = config.eval.kv_dtype == "fp8"
            task = bar.add_task("evaluate", total=1 + fp8 + 2 * (1 + len(loaded)), status="quality on held-out text")
            scores, tokens = quality(adapter.logits, loaded, blocks, config.eval.batch_size)
            bar.advance(task)
            effects = {}
            if fp8:
                bar.update(task, status="FP8 KV cache")
                calibration = token_blocks.calibration(config.data.calibration_blocks)
                effects = _fp8_effects(config, run, parent, loaded, calibration, blocks)
                bar.advance(task)
            results = []
            for name, model in [("parent", parent.model), *loaded.items()]:
                bar.update(task, status=f"speed of {name}")
                prefill, decode = generation_times(model, scenario, config.eval.speed_warmup, config.eval.speed_repeats)
                bar.advance(task)
                bar.update(task, status=f"tasks of {name}" if config.eval.tasks else "")
                tasks = lm_eval_tasks(model, parent.tokenizer, config) if config.eval.tasks else {}
                bar.advance(task)
                params = sum(p.numel() for p in model.parameters())
                s = scores[name]
                results.append(ModelResult(
                    name=name, parameters=params, weight_bytes=params * DTYPE_BYTES[scenario.weight_dtype],
                    kv_bytes=kv_bytes_of(list(zip((a for a, _ in choices[name]), shapes)), scenario),
                    kl=s["kl"], lm_loss=s["lm"], perplexity=math.exp(s["lm"]), top1=s["top1"],
                    prefill_tokens_per_second=scenario.batch_size * scenario.prefill_length / prefill,
                    decode_tokens_per_second=scenario.batch_size / decode,
                    measured_latency=prefill + scenario.decode_length * decode,
                    predicted_latency=_predicted(rows, choices[name], scenario), tasks=tasks,
                    **(_fp8_fields(effects[name]) if effects else {}),
                ))
        summary = EvalSummary(results, scenario, local_device_name(device), tokens, file, time.time() - started)
        _write(summary, file)
        record.outputs = {"results": file.name, "table": "results.csv"}
    return summary


def _fp8_effects(config: PuzzleConfig, run: RunDir, parent, loaded: dict, calibration: torch.Tensor,
                 blocks: torch.Tensor) -> dict:
    """FP8 KV cache of every model; the parent runs as a child that keeps every layer (the model that
    carries the simulation), whose own KL to the parent is rounding only."""
    from puzzle.kv_fp8 import fp8_kv_effect  # it imports this module's quality()

    shapes = [parent.adapter.shape(i) for i in range(parent.adapter.num_layers)]
    library = Library(run.stage_dir(Stage.library), parent.adapter)
    whole = build_child(parent, library, [LayerChoice(s.attention, s.ffn, False) for s in shapes])
    return fp8_kv_effect(parent.adapter.logits, {"parent": whole.to(parent.model.device), **loaded},
                         calibration=calibration, blocks=blocks, batch_size=config.eval.batch_size)


def _fp8_fields(effect) -> dict:
    s = effect.scales
    return {"kv_fp8_added_kl": effect.added_kl, "kv_fp8_scales": {"layers": list(s.layers), "k": list(s.k), "v": list(s.v)}}


def _profile_rows(run: RunDir):
    table = run.stage_dir(Stage.profile) / "profile.csv"
    return read_profile(table) if table.is_file() and run.done_fingerprint(Stage.profile) else None


def _predicted(rows, choice, scenario: Scenario) -> float | None:
    if rows is None:
        return None
    try:
        return predicted_latency(rows, choice, scenario)
    except (KeyError, StopIteration):
        return None


def _write(summary: EvalSummary, file: Path) -> None:
    data = {
        "scenario": asdict(summary.scenario), "device": summary.device, "validation_tokens": summary.validation_tokens,
        "seconds": summary.seconds, "models": [asdict(m) for m in summary.models],
    }
    atomic_write_json(file, data)
    with atomic_path(file.with_name("results.csv")) as tmp:
        rows = [{k: v for k, v in asdict(m).items() if k not in ("tasks", "kv_fp8_scales")} for m in summary.models]
        pd.DataFrame(rows).to_csv(tmp, index=False)


def _read(file: Path, seconds: float) -> EvalSummary:
    data = json.loads(file.read_text())
    return EvalSummary([ModelResult(**m) for m in data["models"]], Scenario(**data["scenario"]), data["device"],
                       data["validation_tokens"], file, seconds)
