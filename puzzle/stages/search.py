"""The search stage (`puzzle search`): the best architecture under the job's budgets, from the scores and
the profile (docs/design.md §7).

The result, solutions.json, carries each layer's block as a typed choice (attention, FFN, coupled) with
its score, and each budget's use, limit and the parent's value; realize, eval and the report read it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace

import pandas as pd
import torch

from puzzle.errors import PuzzleError
from puzzle.io import atomic_write_json
from puzzle.config import PuzzleConfig
from puzzle.pipeline import StageContext
from puzzle.problem import describe_unreliable, job_problem, job_profile, job_scores, trusted, unreliable
from puzzle.solutions import Architecture, BatchResult, SearchOutcome, read_solutions, solutions_json
from puzzle.rundir import RunDir, Stage
from puzzle.search import baselines
from puzzle.search.mip import InfeasibleBudget, Solution, Status, greedy, solve
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
    scores = job_scores(config)
    out = []
    for batch in config.search.batch_sizes:
        scenario = replace(config.profile.scenario, batch_size=batch)
        rows = pd.DataFrame([asdict(r) for r in cost_rows(config, parent_shapes(hf_config), space, scenario, hf_config,
                                                          parent)])
        out.append((batch, build_problem(scores, trusted(rows, config), scenario, config.search.metric)))
    return out


def _choose(config: PuzzleConfig, problem: SearchProblem, limits, labels, influence, meter) -> list[Solution]:
    """The one place search.method is dispatched; every method answers with the same Solution type."""
    common = dict(layers=problem.layers, limits=limits, fixed={k: problem.fixed[k] for k in limits}, labels=labels)
    s = config.search
    diverse = dict(solutions=max(s.solutions, s.candidates), min_diff=s.min_diff, solver=s.solver_settings)
    methods = {
        "mip": lambda: _in_context(config, problem, common, solve(**common, **diverse), meter),
        "evolve": lambda: _evolved(config, problem, common, solve(**common, **{**diverse, "solutions": max(
            2, s.candidates)}), meter),
        "greedy": lambda: [baselines.greedy_search(**common)],
        "shortgpt": lambda: [baselines.shortgpt(**common, layer_influence=influence.layer)],
        "depth-mip": lambda: [baselines.depth_then_mip(**common, layer_influence=influence.layer, depth=s.depth,
                                                       solver=s.solver_settings)],
        "llm-drop": lambda: [baselines.llm_drop(**common, attention_influence=influence.attention)],
        "uniform-ffn": lambda: [baselines.uniform_ffn(**common)],
        "random": lambda: [baselines.random_search(**common, seed=config.run.seed)],
    }
    return methods[s.method]()


def measures_children(config: PuzzleConfig) -> bool:
    s = config.search
    return s.candidates > 1 or s.method == "evolve" or s.rounds > 0 or s.tournament > 0


def _children(problem: SearchProblem, choices: list[list[int]]) -> list[tuple]:
    return [tuple(problem.layers[i][c].label for i, c in enumerate(choice)) for choice in choices]


def _summed(problem: SearchProblem, solution: Solution) -> Solution:
    """A child a measured refinement found, with the sum of its blocks' replace-1-block scores as its objective
    (what the MIP predicts for it), and no claim of optimality for that sum."""
    return replace(solution, status=Status.heuristic,
                   objective=sum(problem.layers[i][c].score for i, c in enumerate(solution.choice)))


def _evolved(config: PuzzleConfig, problem: SearchProblem, common: dict, seeds: list[Solution],
             meter) -> list[Solution]:
    """The evolved child, then the MIP's solutions it started from (all measured afterwards)."""
    from puzzle.progress import progress_bar
    from puzzle.search.evolve import EvolveSettings, evolve

    s = config.search
    settings = EvolveSettings(generations=s.generations, offspring=s.offspring, seed=config.run.seed)
    measure = lambda choices, batches: meter.kl(_children(problem, choices), batches)  # noqa: E731
    with progress_bar() as bar:
        task = bar.add_task("evolve", total=s.generations, status="")
        evolution = evolve(layers=common["layers"], limits=common["limits"], fixed=common["fixed"],
                           seeds=[x.choice for x in seeds], measure=measure, batches=len(meter.batches),
                           settings=settings,
                           on_generation=lambda g, best: bar.update(task, completed=g, status=f"best KL {best:.5f}"))
    best = _summed(problem, evolution.best)
    return [best, *(x for x in seeds if x.choice != best.choice)]


def _in_context(config: PuzzleConfig, problem: SearchProblem, common: dict, found: list[Solution],
                meter) -> list[Solution]:
    """search.rounds: each round scores every block again with the chosen child as the context (the child with
    that one layer replaced, measured whole), solves the MIP on those scores, and keeps its child only if it
    measures lower; stops early when the architecture stops changing. The kept child comes first."""
    if config.search.rounds == 0:
        return found
    from puzzle.progress import progress_bar
    from puzzle.search.mip import Block

    current = found[0]
    [current_kl] = meter.kl(_children(problem, [current.choice]))
    options = [(i, b) for i, layer in enumerate(problem.layers) for b in range(len(layer))]
    with progress_bar() as bar:
        task = bar.add_task("re-scoring in the child's context", total=config.search.rounds, status="")
        for _ in range(config.search.rounds):
            variants = [current.choice[:i] + [b] + current.choice[i + 1:] for i, b in options]
            kls = iter(meter.kl(_children(problem, variants)))
            rescored = [[Block(block.label, next(kls), block.costs) for block in layer] for layer in problem.layers]
            [candidate] = solve(**{**common, "layers": rescored}, solver=config.search.solver_settings)
            if candidate.choice == current.choice:
                break
            [kl] = meter.kl(_children(problem, [candidate.choice]))
            bar.update(task, advance=1, status=f"KL {current_kl:.5f} → {kl:.5f}")
            if kl >= current_kl:
                break
            current, current_kl = _summed(problem, candidate), kl
    return [current, *(x for x in found if x.choice != current.choice)]


def _tournament(config: PuzzleConfig, architectures: list[Architecture], meter, directory) -> list[Architecture]:
    """search.tournament: the first k children each distilled for search.tournament_tokens (the kd settings,
    in memory), then ordered by their held-out KL after it; the rest follow as they were."""
    import shutil

    from puzzle.checkpoint import build_child
    from puzzle.data import job_blocks
    from puzzle.distill.kd import distill
    from puzzle.progress import progress_bar

    k = min(config.search.tournament, len(architectures))
    short = config.kd_settings(config.search.tournament_tokens)
    short = replace(short, checkpoint_every=short.steps + 1)  # a short run: no checkpoint to resume from
    parent = meter.parent
    train = job_blocks(config, parent.tokenizer).train
    held_out = torch.cat([b.input_ids for b in meter.batches])

    healed = []
    with progress_bar() as bar:
        task = bar.add_task("tournament: a short KD of each child", total=k, status="")
        for n, architecture in enumerate(architectures[:k]):
            child = build_child(parent, meter.library, architecture.blocks).float()
            outcome = distill(child, parent.adapter.states_and_logits, train, held_out, short,
                              directory / "tournament" / str(n))
            healed.append(replace(architecture, tournament_kl=outcome.after["kl"]))
            bar.update(task, advance=1, status=f"child {n}: KL {outcome.before['kl']:.5f} → {outcome.after['kl']:.5f}")
    shutil.rmtree(directory / "tournament", ignore_errors=True)
    return sorted(healed, key=lambda a: a.tournament_kl) + architectures[k:]


def _measured(problem: SearchProblem, found: list[Solution], meter) -> list[float] | None:
    """Each solution's measured KL when the search measures children."""
    return None if meter is None else meter.kl(_children(problem, [x.choice for x in found]))


def run(ctx: StageContext) -> SearchOutcome:
    started = time.time()
    config = ctx.config
    s = config.search
    if not s.budgets:
        raise PuzzleError("no budget given: pass --budget KIND=VALUE (e.g. latency=0.5x) or set search.budgets")
    budgets = list(s.budgets.values())
    influence = None
    if s.method in baselines.NEEDS_INFLUENCE:
        from puzzle.importance import job_block_influence

        influence = job_block_influence(config)
    solve_seconds, batches, best = 0.0, [], None
    meter = None
    if measures_children(config):
        from puzzle.measured import job_meter

        meter = job_meter(config)
    for batch, problem in _problems(config):
        limits, labels = budget_limits(budgets, problem)
        solve_started = time.time()
        try:
            found = _choose(config, problem, limits, labels, influence, meter)
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
    measured = _measured(problem, found, meter)
    architectures = [Architecture.of(x, problem, labels) for x in found]
    if measured is not None:
        # The lowest measured KL first: the child realize builds. The MIP's own best is among them, so the
        # choice is never worse than it on the measured blocks.
        architectures = sorted((replace(a, measured_kl=kl) for a, kl in zip(architectures, measured)),
                               key=lambda a: a.measured_kl)
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
    before = list(architectures)
    if config.search.tournament > 0:
        architectures = _tournament(config, architectures, meter, ctx.directory)
    if measured is not None:
        mip_best = min(range(len(found)), key=lambda k: (found[k].status is not Status.optimal, found[k].objective))
        notes.append(
            f"measured {len(found)} children whole on {s.measure_blocks} training blocks: the chosen one's KL is "
            f"{architectures[0].measured_kl:.5f} (its blocks' scores sum to {architectures[0].objective:.5f}); the "
            f"MIP's best by the sum measures {measured[mip_best]:.5f} (sum {found[mip_best].objective:.5f})")
    if config.search.tournament > 0:
        moved = architectures[0].blocks != before[0].blocks
        notes.append(f"tournament: {min(s.tournament, len(before))} children each distilled for "
                     f"{s.tournament_tokens:,} tokens; the ranking "
                     + ("changed after KD: the chosen child was not the best before it" if moved
                        else "held: the best before KD is still the best after it"))
    outcome = SearchOutcome(
        method=s.method, solutions=architectures,
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
