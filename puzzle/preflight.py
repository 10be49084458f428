"""Checks of a job's inputs that every command runs before it writes anything, and `puzzle validate` in full.

Cheap checks only: the parent's config, its safetensors headers (not its weights) and its tokenizer; the
device; the data (readable, and enough tokens for the job once tokenized); the run directory; the
outputs of earlier stages that the command needs. Each problem is one line naming the key or file, the
value and what would fix it; all of a job's problems are reported together.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

from puzzle.config import PuzzleConfig
from puzzle.errors import ConfigError, PuzzleError
from puzzle.rundir import RunDir, Stage


def _parent_problems(config: PuzzleConfig) -> tuple[list[str], object | None]:
    """Problems with the parent, and its config when it could be read."""
    from puzzle.families import parent_shapes
    from puzzle.parents import check_tokenizer, check_weights, parent_config, parent_device
    from puzzle.stages.library import job_spaces

    try:
        hf_config = parent_config(config.parent)
        shapes = parent_shapes(hf_config)
    except PuzzleError as e:
        return [str(e)], None
    problems = []
    if shapes[0].hybrid and config.eval.kv_dtype == "fp8":
        problems.append("eval.kv_dtype: 'fp8' is simulated in DeciLM children only, and this parent's children are "
                        "hybrid (Nemotron-H Puzzle); leave it at 'model'")
    if shapes[0].hybrid and config.kd.shard:
        problems.append("kd.shard: hybrid (Nemotron-H Puzzle) children are not sharded over processes yet; set it to "
                        "false (each process then holds the whole child)")
    for check in (lambda: check_weights(config.parent), lambda: parent_device(config.parent.device),
                  lambda: job_spaces(config, shapes)):
        try:
            check()
        except PuzzleError as e:
            problems.append(str(e))
    if config.data.tokenizer is None:
        try:
            check_tokenizer(config.parent)
        except PuzzleError as e:
            problems.append(str(e))
    return problems + _context_problems(config, hf_config) + _engine_problems(config, hf_config), hf_config


def _engine_problems(config: PuzzleConfig, hf_config) -> list[str]:
    """What keeps the target engine from serving any child of this parent: its model-wide parts, its
    tokenizer, or one of its own layers (the search may keep any of them)."""
    from puzzle.blocks.specs import BlockChoice
    from puzzle.checkpoint import child_config
    from puzzle.engines import Engine, choice_reasons, model_reasons, tokenizer_reasons
    from puzzle.families import parent_shapes
    from puzzle.parents import local_checkpoint

    engine = config.target.engine
    if engine is Engine.transformers:
        return []
    shapes = parent_shapes(hf_config)
    # Judged as the child of its own blocks: the same config words (biases, norms, sinks) as any child's.
    reasons = model_reasons(engine, child_config(hf_config, [BlockChoice(s.attention, s.ffn) for s in shapes]))
    tokenizer = config.data.tokenizer or local_checkpoint(config.parent)
    reasons += tokenizer_reasons(engine, tokenizer) if tokenizer else []
    for i, shape in enumerate(shapes):
        own = choice_reasons(engine, i, len(shapes), BlockChoice(shape.attention, shape.ffn), shape)
        reasons += [f"the parent's layer {i}: {r}" for r in own[:1]]
    if not reasons:
        return []
    more = f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""
    return [f"target.engine: {engine.value} cannot serve this parent: {reasons[0]}{more}; choose another "
            "target.engine, or transformers"]


def engine_removals(config: PuzzleConfig) -> list[str]:
    """The library candidates `target.engine` removes (for `puzzle validate`)."""
    from puzzle.families import parent_shapes
    from puzzle.parents import parent_config
    from puzzle.stages.library import targeted_spaces

    return targeted_spaces(config, parent_shapes(parent_config(config.parent)))[1]


def _context_problems(config: PuzzleConfig, hf_config) -> list[str]:
    """Lengths the parent cannot attend over."""
    context = getattr(hf_config, "max_position_embeddings", None)
    if not context:
        return []
    problems = []
    if config.data.sequence_length > context:
        problems.append(f"data.sequence_length: got {config.data.sequence_length}; the parent attends over at most "
                        f"{context} positions (max_position_embeddings)")
    if config.bld.sequence_length > context:
        problems.append(f"bld.sequence_length: got {config.bld.sequence_length}; the parent attends over at most "
                        f"{context} positions")
    p = config.profile
    if p.prefill_length + p.decode_length > context:
        problems.append(f"profile.prefill_length: {p.prefill_length} + profile.decode_length {p.decode_length} tokens "
                        f"exceed the parent's context of {context} positions")
    return problems


def _data_problems(config: PuzzleConfig, tokenizer_ok: bool) -> list[str]:
    from puzzle.data import check_files, count_tokens, split_sizes

    data = config.data
    problems = []
    if data.files:
        try:
            check_files(data.files)
        except PuzzleError as e:
            return [str(e)]
    if data.tokenizer is not None and not Path(data.tokenizer).is_dir():
        return [f"data.tokenizer: {data.tokenizer!r} is not a directory"]
    if config.bld.sequence_length > data.sequence_length:
        problems.append(
            f"bld.sequence_length: {config.bld.sequence_length} is longer than data.sequence_length "
            f"({data.sequence_length})"
        )
    if tokenizer_ok and data.files:  # a hub dataset is counted when it is fetched
        try:
            split_sizes(count_tokens(config), data)
        except PuzzleError as e:
            problems.append(str(e))
    return problems


def _kd_problems(config: PuzzleConfig) -> list[str]:
    from puzzle.parents import check_checkpoint_weights

    problems = []
    per_step = config.kd.batch_size * config.data.sequence_length
    if config.kd_steps == 0:
        problems.append(
            f"kd.tokens: got {config.kd.tokens}; one step takes kd.batch_size × data.sequence_length = {per_step} "
            f"tokens, so the budget is at least {per_step} (or lower kd.batch_size)"
        )
    if config.kd.child is not None:
        child = Path(config.kd.child)
        if not (child / "config.json").is_file():
            problems.append(f"kd.child: {config.kd.child!r} is not a child checkpoint (no config.json there)")
        else:
            try:
                check_checkpoint_weights(child, "kd.child")
            except PuzzleError as e:
                problems.append(str(e))
    return problems


def _eval_problems(config: PuzzleConfig) -> list[str]:
    if not config.eval.tasks:
        return []
    if importlib.util.find_spec("lm_eval") is None:
        return [f"eval.tasks: got {config.eval.tasks}; lm-evaluation-harness is not installed "
                "(pip install lm-eval), or remove eval.tasks"]
    from lm_eval.tasks import TaskManager

    from puzzle.stages.eval import is_task_file

    files = [t for t in config.eval.tasks if is_task_file(t)]
    missing = [f"eval.tasks: {t!r} is not a file; give the path of a task YAML, or a task's name"
               for t in files if not Path(t).is_file()]
    known = set(TaskManager().all_tasks)
    unknown = [t for t in config.eval.tasks if t not in known and t not in files]
    return missing + ([f"eval.tasks: {', '.join(unknown)} not known to lm-evaluation-harness (see `lm_eval --tasks "
                       "list`)"] if unknown else [])


def run_dir_problems(path: Path) -> list[str]:
    """The run directory can be created and written to; it is not a file and lies under no file."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            return [f"run.dir: {str(path)!r} is a file; give a directory (it is created if missing)"]
        existing = path
    else:
        existing = path.parent
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            return [f"run.dir: {str(existing)!r} is a file, so {str(path)!r} cannot be created under it"]
    try:
        # A probe that leaves nothing behind: it is created and removed at once.
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".puzzle-probe-"))
    except OSError as e:
        return [f"run.dir: {str(path)!r} cannot be created or written in {str(existing)!r} ({e.strerror})"]
    return []


def _cheap_problems(config: PuzzleConfig) -> list[str]:
    """Problems found without importing torch or transformers: a job that has them is answered at once."""
    from puzzle.data import check_files
    from puzzle.parents import local_checkpoint

    problems = []
    try:
        local_checkpoint(config.parent)
    except PuzzleError as e:
        problems.append(str(e))
    if config.data.files:
        try:
            check_files(config.data.files)
        except PuzzleError as e:
            problems.append(str(e))
    return problems


def preflight(config: PuzzleConfig) -> list[str]:
    """Every problem with the job's inputs that can be seen without loading weights."""
    cheap = _cheap_problems(config)
    if cheap:
        return cheap + run_dir_problems(config.run.dir)
    parent, hf_config = _parent_problems(config)
    tokenizer_ok = hf_config is not None and not any(p.startswith("parent.path: no tokenizer") for p in parent)
    kd = _kd_problems(config)
    if any(p.startswith("data.sequence_length") for p in parent):
        kd = [p for p in kd if not p.startswith("kd.tokens")]  # a consequence of the length, not a problem of its own
    return (parent + _data_problems(config, tokenizer_ok) + kd + _eval_problems(config)
            + run_dir_problems(config.run.dir))


def training_hint(config: PuzzleConfig, config_file: Path) -> str | None:
    """For a parent that does not exist yet: the train-parent config beside the job file that makes it."""
    import yaml

    target = Path(config.parent.path).expanduser().resolve()
    for candidate in sorted(Path(config_file).parent.glob("*.yaml")):
        try:
            raw = yaml.safe_load(candidate.read_text(encoding="utf-8"))
        except (yaml.YAMLError, OSError, UnicodeDecodeError):
            continue
        if isinstance(raw, dict) and "output" in raw and Path(str(raw["output"])).expanduser().resolve() == target:
            return f"`puzzle train-parent {candidate}` makes it"
    return None


def job_plan(config: PuzzleConfig, *, device: str | None = None, gpus: int = 1, processes: int = 1):
    """The job's memory plan (puzzle/memory.py) on a GPU of the sheet, or on this machine."""
    from puzzle.distill.library import bld_candidates
    from puzzle.families import parent_shapes
    from puzzle.memory import plan, target
    from puzzle.parents import parent_config
    from puzzle.stages.library import job_spaces

    hf_config = parent_config(config.parent)
    shapes = parent_shapes(hf_config)
    candidates = bld_candidates(job_spaces(config, shapes), shapes)
    return plan(config, hf_config, target(config, device=device, gpus=gpus, processes=processes), candidates)


def process_problems(configs: list[PuzzleConfig], stage: Stage | None, processes: int) -> list[str]:
    """What a multi-process command cannot split: KD's batch over the processes, the parent's layers over
    the ranks of a pipeline; what eval does on one process only."""
    from puzzle.memory import split_problem
    from puzzle.parents import parent_config

    if processes < 2:
        return []
    problems = []
    for c in configs:
        if stage in (Stage.kd, None) and c.kd.batch_size % processes:
            problems.append(f"kd.batch_size: {c.kd.batch_size} does not split over {processes} processes; give a "
                            f"multiple of {processes}, or a process count that divides {c.kd.batch_size}")
        if stage in (Stage.eval, None) and (c.eval.kv_dtype == "fp8" or c.eval.tasks):
            key = "eval.kv_dtype" if c.eval.kv_dtype == "fp8" else "eval.tasks"
            problems.append(f"{key}: runs on one process (a sharded model is not what the engines serve); run eval "
                            f"without --num-processes, or leave {key} out")
        if stage in (Stage.library, Stage.scores, None) and c.run.parent_placement == "layers":
            problem = split_problem(c, parent_config(c.parent), processes)
            problems += [problem] if problem else []
    return problems


def memory_problems(configs: list[PuzzleConfig], stages: list[Stage], processes: int = 1,
                    bounds: bool = True) -> list[str]:
    """The memory plan's verdict on this machine for the stages a command runs: one line per stage that
    cannot fit, before anything is written. `bounds=False`: not the stages whose child the search has yet to
    choose (`puzzle run` checks those when it reaches them)."""
    problems = []
    for config in configs:
        label = f"job {config.run.job}: " if config.run.job else ""
        problems += [label + p for p in job_plan(config, processes=processes).problems(stages, bounds)]
    return list(dict.fromkeys(problems))


def check_inputs(configs: list[PuzzleConfig], stage: Stage | None = None, source: str = "inputs") -> None:
    """Raise one ConfigError listing every problem of every job (a problem shared by jobs once), including
    the earlier outputs `stage` needs when a command starts there. `source` is the job file, when there is one."""
    from puzzle.pipeline import SPECS, requirement_problems

    problems = []
    for config in configs:
        for problem in preflight(config):
            hint = training_hint(config, Path(source)) if "does not exist" in problem and problem.startswith(
                "parent.path") and Path(source).is_file() else None
            problems.append(f"{problem}; {hint}" if hint else problem)
        if stage is not None:
            problems += requirement_problems(SPECS[stage], RunDir.of(config))
    problems = list(dict.fromkeys(problems))
    if problems:
        raise ConfigError(problems, source)
