"""The job's search problem, read from the run's scores and profile, and its quality/cost frontier.

Shared by the search stage, `puzzle search --sweep` and the report's frontier plot.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from puzzle.io import atomic_path
from puzzle.config import PuzzleConfig
from puzzle.errors import PuzzleError
from puzzle.rundir import RunDir, Stage
from puzzle.search.budgets import Sweep
from puzzle.search.problem import QUANTITY, FrontierPoint, SearchProblem, build_problem, frontier_points


def job_problem(config: PuzzleConfig) -> SearchProblem:
    """The job's problem at its profile scenario, from the run's scores and profile tables."""
    return build_problem(job_scores(config), trusted(job_profile(config), config), config.profile.scenario,
                         config.search.metric)


def job_scores(config: PuzzleConfig) -> pd.DataFrame:
    """The run's scores of the blocks the job's target engine serves (every block for transformers)."""
    from puzzle.engines import Engine, servable_scores
    from puzzle.families import parent_shapes
    from puzzle.parents import parent_config

    scores = pd.read_csv(RunDir.of(config).stage_dir(Stage.scores) / "scores.csv")
    engine = config.target.engine
    return scores if engine is Engine.transformers else servable_scores(engine, scores, parent_shapes(
        parent_config(config.parent)))


def job_profile(config: PuzzleConfig) -> pd.DataFrame:
    return pd.read_csv(RunDir.of(config).stage_dir(Stage.profile) / "profile.csv", keep_default_na=False,
                       na_values={c: ["nan"] for c in ("prefill_seconds", "decode_seconds")})


def unreliable(profile: pd.DataFrame) -> pd.DataFrame:
    """The rows the profile marked unreliable (none in a profile written before the mark existed)."""
    return profile[profile.get("unreliable", pd.Series("", index=profile.index)).astype(str) != ""]


def describe_unreliable(marked: pd.DataFrame) -> str:
    return "; ".join(f"L{r.layer} {r.candidate}: {r.unreliable}" for r in marked.head(3).itertuples())


def trusted(profile: pd.DataFrame, config: PuzzleConfig) -> pd.DataFrame:
    """The profile, unless rows of it are marked unreliable and search.allow_unreliable_profile is off."""
    marked = unreliable(profile)
    if len(marked) and not config.search.allow_unreliable_profile:
        shown = describe_unreliable(marked)
        raise PuzzleError(
            f"profile: {len(marked)} measured cost(s) stayed unreliable after re-measuring ({shown}); delete "
            f"{RunDir.of(config).stage_dir(Stage.profile)} and profile again on a quiet machine, use the roofline "
            "(profile.device: h100 or another GPU), or set search.allow_unreliable_profile: true to search on them"
        )
    return profile


def job_frontier(config: PuzzleConfig, sweep: Sweep) -> tuple[list[FrontierPoint], float]:
    """Best predicted quality along the sweep, the job's budgets on other quantities held; and the parent's
    cost in the swept quantity."""
    problem = job_problem(config)
    points = frontier_points(problem, sweep, list(config.search.budgets.values()), config.search.solver_settings)
    return points, problem.parent_totals[QUANTITY[sweep.kind]]


def write_frontier(config: PuzzleConfig, sweep: Sweep) -> tuple[list[FrontierPoint], Path, Path]:
    """`job_frontier` written as search/frontier.csv and plotted as search/frontier.png."""
    points, parent_cost = job_frontier(config, sweep)
    directory = RunDir.of(config).stage_dir(Stage.search)
    table, plot = directory / "frontier.csv", directory / "frontier.png"
    with atomic_path(table) as tmp:
        pd.DataFrame([p.__dict__ for p in points]).to_csv(tmp, index=False)
    plot_frontier(points, parent_cost, sweep.text, config.search.metric, plot)
    return points, table, plot


def plot_frontier(points: list[FrontierPoint], parent_cost: float, title: str, metric: str, path: Path,
                  marks: list[tuple[str, float, float, str]] = ()) -> None:
    """MIP and greedy objectives against cost; `marks`: (label, cost ratio, value, matplotlib style) points,
    e.g. the child's predicted and measured KL."""
    from puzzle.plots import pyplot, save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    mip = [(p.used / parent_cost, p.objective) for p in points if p.objective is not None]
    grd = [(p.limit / parent_cost, p.greedy_objective) for p in points if p.greedy_objective is not None]
    uni = [(p.limit / parent_cost, p.uniform_objective) for p in points if p.uniform_objective is not None]
    if mip:
        ax.plot(*zip(*mip), "o-", label="MIP (puzzle)")
    if grd:
        ax.plot(*zip(*grd), "s--", alpha=0.7, label="greedy (budget limit)")
    if uni:
        ax.plot(*zip(*uni), "x:", alpha=0.7, label="uniform FFN width (budget limit)")
    ax.plot([1.0], [0.0], "k*", markersize=12, label="parent")
    for label, x, y, style in marks:
        ax.plot([x], [y], style, markersize=9, label=label)
    ax.set_xlabel("cost (ratio of the parent)")
    ax.set_ylabel(f"predicted damage (sum of block {metric})")
    ax.set_title(f"frontier: {title}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save(fig, path, dpi=120)
