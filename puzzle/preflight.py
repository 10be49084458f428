"""Checks of a job's inputs that run before any command writes anything (and in full under `puzzle validate`).

Cheap checks only: the parent's config (not its weights), the data files, the settings that depend on
the parent's shape; each problem is one line naming the key or file, the value and what would fix it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from puzzle.config import PuzzleConfig
from puzzle.errors import ConfigError, PuzzleError


def _parent_problems(config: PuzzleConfig) -> list[str]:
    from puzzle.distill.library import layer_spaces
    from puzzle.families import parent_shapes
    from puzzle.parents import parent_config

    problems = []
    try:
        shapes = parent_shapes(parent_config(config.parent))
        layer_spaces(shapes, config.library, config.bld.coupled_pairs, every_pair=config.bld.mode == "coupled")
    except PuzzleError as e:
        problems.append(str(e))
    return problems


def _data_problems(config: PuzzleConfig) -> list[str]:
    from puzzle.data import check_files

    problems = []
    if config.data.files:
        try:
            check_files(config.data.files)
        except PuzzleError as e:
            problems.append(str(e))
    if config.data.tokenizer is not None and not Path(config.data.tokenizer).is_dir():
        problems.append(f"data.tokenizer: {config.data.tokenizer!r} is not a directory")
    if config.bld.sequence_length > config.data.sequence_length:
        problems.append(
            f"bld.sequence_length: {config.bld.sequence_length} is longer than data.sequence_length "
            f"({config.data.sequence_length})"
        )
    return problems


def _kd_problems(config: PuzzleConfig) -> list[str]:
    problems = []
    per_step = config.kd.batch_size * config.data.sequence_length
    if config.kd_steps == 0:
        problems.append(
            f"kd.tokens: got {config.kd.tokens}; one step takes kd.batch_size × data.sequence_length = {per_step} "
            f"tokens, so the budget is at least {per_step} (or lower kd.batch_size)"
        )
    if config.kd.child is not None and not (Path(config.kd.child) / "config.json").is_file():
        problems.append(f"kd.child: {config.kd.child!r} is not a child checkpoint (no config.json there)")
    return problems


def _eval_problems(config: PuzzleConfig) -> list[str]:
    if not config.eval.tasks:
        return []
    if importlib.util.find_spec("lm_eval") is None:
        return [f"eval.tasks: got {config.eval.tasks}; lm-evaluation-harness is not installed "
                "(pip install lm-eval), or remove eval.tasks"]
    from lm_eval.tasks import TaskManager

    known = set(TaskManager().all_tasks)
    unknown = [t for t in config.eval.tasks if t not in known]
    return [f"eval.tasks: {', '.join(unknown)} not known to lm-evaluation-harness (see `lm_eval --tasks list`)"] if unknown else []


def preflight(config: PuzzleConfig) -> list[str]:
    """Every problem with the job's inputs that can be seen without loading weights."""
    return _parent_problems(config) + _data_problems(config) + _kd_problems(config) + _eval_problems(config)


def check_inputs(configs: list[PuzzleConfig], source: str = "inputs") -> None:
    """Raise one ConfigError listing every problem of every job (a problem shared by jobs once)."""
    problems = list(dict.fromkeys(p for config in configs for p in preflight(config)))
    if problems:
        raise ConfigError(problems, source)
