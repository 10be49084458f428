"""The search stage (`puzzle search`): the best architecture under the job's budgets, from the scores and
the profile (docs/design.md §7).

The result, solutions.json, carries each layer's block as a typed choice (attention, FFN, coupled) with
its score, and each budget's use, limit and the parent's value; realize, eval and the report read it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace

import pandas as pd

from puzzle.errors import PuzzleError
from puzzle.io import atomic_write_json
from puzzle.config import PuzzleConfig
from puzzle.pipeline import StageContext
from puzzle.problem import describe_unreliable, job_problem, job_profile, trusted, unreliable
from puzzle.solutions import Architecture, BatchResult, SearchOutcome, read_solutions, solutions_json
from puzzle.rundir import RunDir, Stage
from puzzle.search import baselines
from puzzle.search.mip import InfeasibleBudget, Solution, greedy, solve
from puzzle.search.problem import SearchProblem, budget_limits, build_problem


def _problems(config: PuzzleConfig) -> list[tuple[int, SearchProblem]]:
    """One problem per batch size of search.batch_sizes (each profiled here), or the profile stage's own."""
    if not config.search.batch_sizes:
        return [(config.profile.batch_size, job_problem(config))]
    from puzzle.distill.library import Library
    from puzzle.families import parent_shapes
    from puzzle.parents import load_parent, parent_config
    from puzzle.profiling import cost_rows

    run = RunDir.of(config)
    hf_config = parent_config(config.parent)
    parent = load_parent(config.parent) if config.profile.device == "local" else None
    space = Library(run.stage_dir(Stage.library), None).layers
    scores = pd.read_csv(run.stage_dir(Stage.scores) / "scores.csv")
    out = []
    for batch in config.search.batch_sizes:
        scenario = replace(config.profile.scenario, batch_size=batch)
        rows = pd.DataFrame([asdict(r) for r in cost_rows(config, parent_shapes(hf_config), space, scenario, hf_config,
                                                          parent)])
        out.append((batch, build_problem(scores, trusted(rows, config), scenario, config.search.metric)))
    return out


def _choose(config: PuzzleConfig, problem: SearchProblem, limits, labels, influence) -> list[Solution]:
    """The one place search.method is dispatched; every method answers with the same Solution type."""
    common = dict(layers=problem.layers, limits=limits, fixed={k: problem.fixed[k] for k in limits}, labels=labels)
    s = config.search
    methods = {
        "mip": lambda: solve(**common, solutions=s.solutions, min_diff=s.min_diff, solver=s.solver),
        "greedy": lambda: [baselines.greedy_search(**common)],
        "shortgpt": lambda: [baselines.shortgpt(**common, layer_influence=influence.layer)],
        "llm-drop": lambda: [baselines.llm_drop(**common, attention_influence=influence.attention)],
        "uniform-ffn": lambda: [baselines.uniform_ffn(**common)],
        "random": lambda: [baselines.random_search(**common, seed=config.run.seed)],
    }
    return methods[s.method]()


def run(ctx: StageContext) -> SearchOutcome:
    started = time.time()
    config = ctx.config
    s = config.search
    if not s.budgets:
        raise PuzzleError("no budget given: pass --budget KIND=VALUE (e.g. latency=0.5x) or set search.budgets")
    if s.method != "mip" and s.solutions > 1:
        raise PuzzleError(f"search.solutions: {s.solutions} solutions need search.method=mip; {s.method} gives one")
    budgets = list(s.budgets.values())
    influence = None
    if s.method in baselines.NEEDS_INFLUENCE:
        from puzzle.importance import job_block_influence

        influence = job_block_influence(config)
    solve_seconds, batches, best = 0.0, [], None
    for batch, problem in _problems(config):
        limits, labels = budget_limits(budgets, problem)
        solve_started = time.time()
        try:
            found = _choose(config, problem, limits, labels, influence)
        except InfeasibleBudget:
            if not s.batch_sizes:
                raise
            batches.append(BatchResult(batch, None))
            continue
        finally:
            solve_seconds += time.time() - solve_started
        batches.append(BatchResult(batch, found[0].objective))
        if best is None or found[0].objective < best[1][0].objective:
            best = (problem, found, limits, labels, batch)
    if best is None:
        texts = ", ".join(b.text for b in budgets)
        raise InfeasibleBudget(f"no batch size in {s.batch_sizes} has a child within {texts}; relax a budget")
    problem, found, limits, labels, batch = best
    baseline = greedy(layers=problem.layers, limits=limits, fixed={k: problem.fixed[k] for k in limits})
    notes = [
        f"budget {labels[k]}: the parent already meets it ({problem.parent_totals[k]:.6g} ≤ {limit:.6g})"
        for k, limit in limits.items()
        if problem.parent_totals[k] <= limit
    ]
    marked = unreliable(job_profile(config))
    if len(marked):
        notes.append(f"searched on {len(marked)} measured cost(s) that stayed unreliable after re-measuring "
                     f"(search.allow_unreliable_profile), e.g. {describe_unreliable(marked)}")
    if s.batch_sizes:
        notes.append("batch sizes: " + ", ".join(
            f"{b.batch_size}: {'infeasible' if b.objective is None else f'{b.objective:.4g}'}" for b in batches
        ) + f"; best at batch size {batch}")
    outcome = SearchOutcome(
        method=s.method, solutions=[Architecture.of(x, problem, labels) for x in found],
        greedy=Architecture.of(baseline, problem, labels) if baseline else None, notes=notes, batch_size=batch,
        batch_sweep=batches, file=ctx.directory / "solutions.json", solve_seconds=solve_seconds,
        seconds=time.time() - started,
    )
    data = solutions_json(outcome)
    if influence is not None:
        data["block_influence"] = asdict(influence)
    atomic_write_json(outcome.file, data)
    ctx.record.outputs = {"solutions": outcome.file.name, "count": len(found),
                          "budgets": [b.text for b in budgets], "batch_size": batch}
    return outcome


def read(ctx: StageContext) -> SearchOutcome:
    return read_solutions(ctx.directory / "solutions.json")
