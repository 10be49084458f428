"""The eval stage (`puzzle eval`): the parent, the realized child and the distilled child side by side
(docs/design.md §10).

Quality on held-out text against the parent (KL(parent ‖ model), perplexity, top-1 agreement with the
parent's greedy token); size (parameters, weight and KV-cache bytes at the profile's scenario); speed
measured here by the one timing rule (docs/design.md §14) next to the speed the cost model predicted.
lm-evaluation-harness tasks run when installed. Writes eval/results.json and results.csv.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from puzzle.blocks.costs import DTYPE_BYTES, Scenario, kv_cache_bytes
from puzzle.io import atomic_path, atomic_write_json, read_json
from puzzle.blocks.specs import BlockChoice
from puzzle.checkpoint import build_child, child_choices, load_child, load_child_sharded
from puzzle.config import PuzzleConfig, read_yaml
from puzzle.data import job_blocks
from puzzle.distill.library import Library
from puzzle.distill.metrics import hf_logits, perplexity, quality
from puzzle.distributed import Workers
from puzzle.errors import PuzzleError
from puzzle.parents import load_parent
from puzzle.pipeline import StageContext
from puzzle.progress import progress_bar
from puzzle.rundir import RunDir, Stage
from puzzle.search.profile import predicted_latency, read_profile
from puzzle.sharding import held_bytes
from puzzle.search.timing import generation_times, local_device_name


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
    # Speed: None when the models were sharded over processes (a sharded model's speed is not the model's).
    prefill_tokens_per_second: float | None
    decode_tokens_per_second: float | None
    measured_latency: float | None  # seconds per batch: prefill + every decode step, by the timing rule
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


def evaluated_models(run: RunDir) -> list[tuple[str, Path]]:
    """The run's child, and its distilled child when KD is done."""
    models = [("child", run.stage_dir(Stage.child) / "checkpoint")]
    kd = run.stage_dir(Stage.kd) / "checkpoint"
    if run.done_fingerprint(Stage.kd) is not None and kd.is_dir():
        models.append(("child + KD", kd))
    return models


def is_task_file(task: str) -> bool:
    """An eval.tasks entry that names a task YAML of one's own rather than a task of the harness."""
    return task.endswith((".yaml", ".yml"))


def task_config(path: Path) -> dict:
    """A local task YAML as lm-evaluation-harness takes it, its `data_files` read relative to the YAML."""
    task = read_yaml(path)
    files = task.get("dataset_kwargs", {}).get("data_files")
    if isinstance(files, dict):
        task["dataset_kwargs"]["data_files"] = {k: str(path.parent.resolve() / v) for k, v in files.items()}
    return task


def lm_eval_tasks(model, tokenizer, config: PuzzleConfig) -> dict[str, dict]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.eval.batch_size)
    tasks = [task_config(Path(t)) if is_task_file(t) else t for t in config.eval.tasks]
    results = lm_eval.simple_evaluate(model=wrapped, tasks=tasks, limit=config.eval.task_limit)
    return {task: {k: v for k, v in r.items() if isinstance(v, (int, float))} for task, r in results["results"].items()}


def run(ctx: StageContext, team: Workers) -> EvalSummary | None:
    """On several processes, the parent and the children are sharded over them by FSDP2 (each read a layer at a
    time) where the parent's weights can be read by key, and each process measures its share of the held-out
    blocks; speed, FP8 KV and lm-evaluation-harness tasks are for one process."""
    started = time.time()
    config, run_dir = ctx.config, ctx.run
    if team.world > 1 and (config.eval.kv_dtype == "fp8" or config.eval.tasks):
        raise PuzzleError("eval.kv_dtype fp8 and eval.tasks run on one process; leave them out of a multi-process eval")
    models = evaluated_models(run_dir)
    parent = load_parent(config.parent, sharded=team.world > 1)
    device, dtype, sharded = parent.device, parent.dtype, parent.sharded
    loaded = {name: load_child_sharded(path, dtype, device) if sharded else load_child(path, dtype, device)
              for name, path in models}
    token_blocks = job_blocks(config, parent.tokenizer)
    blocks = token_blocks.validation[: config.eval.validation_blocks].to(device)
    scenario = config.profile.scenario
    adapter = parent.adapter
    choices = {"parent": [BlockChoice(s.attention, s.ffn) for s in adapter.shapes]}
    choices.update({name: child_choices(path) for name, path in models})
    rows = read_profile(run_dir.stage_dir(Stage.profile) / "profile.csv") if _profiled(run_dir) else None
    fp8 = config.eval.kv_dtype == "fp8"
    everyone = [("parent", parent.model), *loaded.items()]
    with progress_bar() as bar:
        task = bar.add_task("evaluate", total=2 + fp8 + len(everyone), status="quality on held-out text",
                            visible=team.is_main)
        scores, tokens = quality(adapter.logits, {n: hf_logits(m) for n, m in loaded.items()}, blocks,
                                 config.eval.batch_size, team.rank, team.world)
        scores["parent"] = scores.pop("reference")
        bar.advance(task)
        held = team.gather(held_bytes(parent.model))
        if not team.is_main:
            return None
        effects = {}
        if fp8:
            bar.update(task, status="FP8 KV cache")
            effects = _fp8_effects(config, run_dir, parent, loaded,
                                   token_blocks.calibration(config.data.calibration_blocks), blocks, dict(models))
            bar.advance(task)
        bar.update(task, status="speed, every model in turn" if team.world == 1 else "")
        times = (generation_times([m for _, m in everyone], scenario, config.eval.speed_warmup,
                                  config.eval.speed_repeats) if team.world == 1 else [(None, None)] * len(everyone))
        bar.advance(task)
        results = []
        for (name, model), (prefill, decode) in zip(everyone, times):
            bar.update(task, status=f"tasks of {name}" if config.eval.tasks else "")
            tasks = lm_eval_tasks(model, parent.tokenizer, config) if config.eval.tasks else {}
            bar.advance(task)
            params = sum(p.numel() for p in model.parameters())
            s = scores[name]
            results.append(ModelResult(
                name=name, parameters=params, weight_bytes=params * DTYPE_BYTES[scenario.weight_dtype],
                kv_bytes=sum(kv_cache_bytes(c.attention, shape, scenario)
                             for c, shape in zip(choices[name], adapter.shapes)),
                kl=s["kl"], lm_loss=s["lm_loss"], perplexity=perplexity(s["lm_loss"]), top1=s["top1"],
                prefill_tokens_per_second=prefill and scenario.batch_size * scenario.prefill_length / prefill,
                decode_tokens_per_second=decode and scenario.batch_size / decode,
                measured_latency=prefill and scenario.latency(prefill, decode),
                predicted_latency=_predicted(rows, choices[name], scenario), tasks=tasks,
                **(_fp8_fields(effects[name]) if effects else {}),
            ))
    device_name = local_device_name(device) + (f", {team.world} processes (speed not measured)" if team.world > 1 else "")
    summary = EvalSummary(results, scenario, device_name, tokens, ctx.directory / "results.json", time.time() - started)
    _write(summary)
    ctx.record.outputs = {"results": summary.file.name, "table": "results.csv", "processes": team.world,
                          "sharded": sharded, "parent_bytes_per_rank": held}
    return summary


def _profiled(run: RunDir) -> bool:
    return (run.stage_dir(Stage.profile) / "profile.csv").is_file() and run.done_fingerprint(Stage.profile) is not None


def _fp8_effects(config: PuzzleConfig, run: RunDir, parent, loaded: dict, calibration, blocks,
                 paths: dict[str, Path]) -> dict:
    """FP8 KV cache of every model, with the scales its checkpoint carries where it carries them; the parent
    runs as a child that keeps every layer (the model that carries the simulation), whose own KL to the parent
    is rounding only."""
    from puzzle.kv_fp8 import fp8_kv_effect, read_kv_scales

    library = Library(run.stage_dir(Stage.library), parent.adapter)
    whole = build_child(parent, library, [BlockChoice(s.attention, s.ffn) for s in parent.adapter.shapes])
    stored = {name: scales for name, path in paths.items() if (scales := read_kv_scales(path)) is not None}
    return fp8_kv_effect(parent.adapter.logits, {"parent": whole.to(parent.model.device), **loaded},
                         calibration=calibration, blocks=blocks, batch_size=config.eval.batch_size, stored=stored)


def _fp8_fields(effect) -> dict:
    s = effect.scales
    return {"kv_fp8_added_kl": effect.added_kl, "kv_fp8_scales": {"layers": list(s.layers), "k": list(s.k), "v": list(s.v)}}


def _predicted(rows, choices: list[BlockChoice], scenario: Scenario) -> float | None:
    if rows is None:
        return None
    try:
        return predicted_latency(rows, choices, scenario)
    except (KeyError, StopIteration):
        return None


def _write(summary: EvalSummary) -> None:
    data = {
        "scenario": asdict(summary.scenario), "device": summary.device, "validation_tokens": summary.validation_tokens,
        "seconds": summary.seconds, "models": [asdict(m) for m in summary.models],
    }
    atomic_write_json(summary.file, data)
    with atomic_path(summary.file.with_name("results.csv")) as tmp:
        rows = [{k: v for k, v in asdict(m).items() if k not in ("tasks", "kv_fp8_scales")} for m in summary.models]
        pd.DataFrame(rows).to_csv(tmp, index=False)


def read(ctx: StageContext) -> EvalSummary:
    file = ctx.directory / "results.json"
    data = read_json(file)
    return EvalSummary([ModelResult(**m) for m in data["models"]], Scenario(**data["scenario"]), data["device"],
                       data["validation_tokens"], file, data["seconds"])
