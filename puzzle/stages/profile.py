"""The profile stage (`puzzle profile`): parameters, memory and time of every subblock candidate at the
job's scenario (docs/design.md §6).

A measured profile is reused as it is: measuring again would move the search's choice with the machine's
load and redo every stage after it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd

from puzzle.io import atomic_path
from puzzle.distill.library import Library
from puzzle.parents import load_parent, parent_config
from puzzle.pipeline import StageContext
from puzzle.families import parent_shapes
from puzzle.profiling import AdditiveCheck, Fit, additive_checks, cost_rows, parent_fit
from puzzle.rundir import RunDir, Stage
from puzzle.search.profile import CostRow, read_profile


@dataclass(frozen=True)
class ProfileSummary:
    table: Path
    rows: list[CostRow]
    checks: list[AdditiveCheck]
    device: str
    seconds: float
    fit: Fit | None = None  # the roofline's: does the parent fit the GPUs at the scenario


def run(ctx: StageContext) -> ProfileSummary:
    started = time.time()
    config = ctx.config
    hf_config = parent_config(config.parent)
    shapes = parent_shapes(hf_config)
    space = Library(ctx.run.stage_dir(Stage.library), None).layers
    # The roofline needs only the parent's config; measuring needs its weights.
    parent = load_parent(config.parent) if config.profile.device == "local" else None
    rows = cost_rows(config, shapes, space, config.profile.scenario, hf_config, parent)
    table = ctx.directory / "profile.csv"
    with atomic_path(table) as tmp:
        pd.DataFrame([asdict(r) for r in rows]).to_csv(tmp, index=False)
    ctx.record.outputs = {"table": table.name, "device": rows[0].device, "method": rows[0].method}
    return _summary(config, table, rows, shapes, time.time() - started)


def _summary(config, table: Path, rows: list[CostRow], shapes, seconds: float) -> ProfileSummary:
    fit = None if config.profile.device == "local" else parent_fit(rows, shapes, config.profile.device,
                                                                    config.profile.gpus)
    return ProfileSummary(table, rows, [], rows[0].device, seconds, fit)


def read(ctx: StageContext) -> ProfileSummary:
    table = ctx.directory / "profile.csv"
    return _summary(ctx.config, table, read_profile(table), parent_shapes(parent_config(ctx.config.parent)), 0.0)


def with_checks(summary: ProfileSummary, config, children: int) -> ProfileSummary:
    """The summary with the additive cost model checked on the parent and `children` random children
    (whole models timed here); the profile itself is not measured again."""
    parent = load_parent(config.parent)
    library = Library(RunDir.of(config).stage_dir(Stage.library), parent.adapter)
    checks = additive_checks(config, parent, library, summary.rows, config.profile.scenario, children)
    return replace(summary, checks=checks)
