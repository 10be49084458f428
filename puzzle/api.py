"""The pipeline as plain typed functions: one per stage, each `run_stage` with that stage's options.

The CLI, the benchmarks and the tests call these; each returns the stage's summary, read back from the
run directory when the stage is already done (docs/design.md §11).
"""

from __future__ import annotations

from pathlib import Path

from puzzle.config import PuzzleConfig, apply_overrides, budget_overrides, validate
from puzzle.pipeline import run_stage
from puzzle.rundir import Stage


def with_settings(config: PuzzleConfig, overrides: list[str]) -> PuzzleConfig:
    """The config with `--set`-style overrides applied and validated again."""
    if not overrides:
        return config
    return validate(apply_overrides(config.model_dump(mode="json"), overrides), PuzzleConfig, "options")


def parent_stage(config: PuzzleConfig):
    return run_stage(Stage.parent, config)


def distill_stage(config: PuzzleConfig):
    return run_stage(Stage.library, config)


def score_stage(config: PuzzleConfig):
    return run_stage(Stage.scores, config)


def profile_stage(config: PuzzleConfig, check_models: int = 0):
    summary = run_stage(Stage.profile, config)
    if check_models:
        from puzzle.stages.profile import with_checks

        summary = with_checks(summary, config, check_models)
    return summary


def search_stage(config: PuzzleConfig, budgets: list[str] = (), solutions: int | None = None,
                 min_diff: int | None = None):
    """`budgets` as on the command line (`latency=0.5x`): each sets search.budgets of its kind."""
    overrides = budget_overrides(list(budgets))
    overrides += [f"search.solutions={solutions}"] if solutions is not None else []
    overrides += [f"search.min_diff={min_diff}"] if min_diff is not None else []
    return run_stage(Stage.search, with_settings(config, overrides))


def realize_stage(config: PuzzleConfig, solution: int | None = None):
    return run_stage(Stage.child, with_settings(config, [f"realize.solution={solution}"] if solution is not None else []))


def kd_stage(config: PuzzleConfig):
    return run_stage(Stage.kd, config)


def eval_stage(config: PuzzleConfig):
    return run_stage(Stage.eval, config)


def report_stage(config: PuzzleConfig):
    return run_stage(Stage.report, config)


def fuse_stage(config: PuzzleConfig, *, child: Path | None = None, output: Path | None = None,
               include_last: bool = False, max_distance: float | None = None):
    return run_stage(Stage.fuse, config, child=child, output=output, include_last=include_last,
                     max_distance=max_distance)
