"""`puzzle search`: the best architecture under the user's budgets, from the scores and the profile."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd

from puzzle.blocks.costs import Scenario
from puzzle.blocks.errors import PuzzleError
from puzzle.blocks.io import atomic_path, atomic_write_json
from puzzle.distill.library import Library
from puzzle.config import PuzzleConfig
from puzzle.importance import BlockInfluence, job_block_influence
from puzzle.parents import load_parent
from puzzle.profile_stage import check_profile_section, cost_rows, scenario_of
from puzzle.rundir import RunDir, Stage, fingerprint
from puzzle.search import baselines
from puzzle.search.budgets import Budget, BudgetKind, parse_budget
from puzzle.search.mip import Block, InfeasibleBudget, Solution, greedy, solve

# Budgets become upper bounds on these summed quantities; throughput is bounded through latency.
QUANTITY = {
    BudgetKind.memory: "memory",
    BudgetKind.latency: "latency",
    BudgetKind.throughput: "latency",
    BudgetKind.params: "params",
    BudgetKind.kv: "kv",
    BudgetKind.experts: "experts",
    BudgetKind.active_params: "active_params",
}


@dataclass(frozen=True)
class SearchProblem:
    layers: list[list[Block]]
    fixed: dict[str, float]
    parent_choice: list[int]
    parent_totals: dict[str, float]
    scenario: Scenario


def _read(path: Path, command: str) -> pd.DataFrame:
    if not path.is_file():
        raise PuzzleError(f"{path} does not exist; run `puzzle {command}` first")
    return pd.read_csv(path)


def build_problem(config: PuzzleConfig, profile: pd.DataFrame | None = None,
                  scenario: Scenario | None = None) -> SearchProblem:
    """Blocks with scores and costs; the profile and scenario default to the run's profile stage."""
    run = RunDir.of(config)
    scores = _read(run.stage_dir(Stage.scores) / "scores.csv", "score")
    if profile is None:
        profile = _read(run.stage_dir(Stage.profile) / "profile.csv", "profile")
    scenario = scenario or scenario_of(config.profile)
    metric = config.search.metric
    cost = {(int(r.layer), r.candidate): r for r in profile.itertuples()}
    fixed_row = profile[profile.layer == -1].iloc[0]

    def latency(row) -> float:
        return row.prefill_seconds + scenario.decode_length * row.decode_seconds

    layers, parent_choice = [], []
    for layer, group in scores.groupby("layer"):
        options = []
        for r in group.itertuples():
            a, f = cost.get((layer, r.attention)), cost.get((layer, r.ffn))
            if a is None or f is None:
                raise PuzzleError(
                    f"the profile has no row for layer {layer} {r.attention if a is None else r.ffn}; "
                    "run `puzzle profile` again after `puzzle distill`"
                )
            score = 1.0 - getattr(r, metric) if metric.startswith("top") else getattr(r, metric)
            options.append(
                Block(
                    name=f"{r.attention}+{r.ffn}" + (" (coupled)" if r.coupled else ""),
                    score=float(score),
                    costs={
                        "params": float(a.params + f.params),
                        "memory": float(a.weight_bytes + f.weight_bytes + a.kv_bytes),
                        "kv": float(a.kv_bytes),
                        "latency": latency(a) + latency(f),
                        "experts": float(a.experts + f.experts),
                        "active_params": float(a.active_params + f.active_params),
                    },
                )
            )
        layers.append(options)
        # The parent's block is the first decoupled composition (the library lists the parent's specs first).
        parent_choice.append(0)
    fixed = {
        "params": float(fixed_row.params),
        "memory": float(fixed_row.weight_bytes),
        "kv": 0.0,
        "latency": latency(fixed_row),
        "experts": 0.0,
        "active_params": float(fixed_row.active_params),
    }
    totals = {k: fixed[k] + sum(layers[i][0].costs[k] for i in range(len(layers))) for k in fixed}
    return SearchProblem(layers, fixed, parent_choice, totals, scenario)


def budget_limits(budgets: list[Budget], problem: SearchProblem) -> tuple[dict[str, float], dict[str, str]]:
    """Limits on the summed quantities, and the user's text for each (for messages)."""
    limits, labels = {}, {}
    tokens_per_batch = problem.scenario.batch_size * problem.scenario.decode_length
    for b in budgets:
        quantity = QUANTITY[b.kind]
        parent = problem.parent_totals[quantity]
        if b.kind is BudgetKind.throughput:
            # throughput ≥ T  ⇔  latency ≤ tokens per batch / T; "2x" means twice the parent's throughput.
            limit = parent / b.value if b.relative else tokens_per_batch / b.value
        else:
            limit = b.limit(parent)
        if quantity in limits:
            limit = min(limit, limits[quantity])
        limits[quantity] = limit
        labels[quantity] = b.text
    return limits, labels


@dataclass(frozen=True)
class SearchOutcome:
    solutions: list[Solution]
    greedy: Solution | None
    problem: SearchProblem
    limits: dict[str, float]
    notes: list[str]
    file: Path
    solve_seconds: float
    seconds: float


@dataclass(frozen=True)
class BatchResult:
    batch_size: int
    objective: float | None  # None: no child meets the budgets at this batch size


def _problems(config: PuzzleConfig) -> list[tuple[int, SearchProblem]]:
    """One problem per batch size of search.batch_sizes (each profiled here), or the profile stage's own."""
    if not config.search.batch_sizes:
        problem = build_problem(config)
        return [(problem.scenario.batch_size, problem)]
    check_profile_section(config.profile)
    parent = load_parent(config.parent)
    library = Library(RunDir.of(config).stage_dir(Stage.library), parent.adapter)
    out = []
    for batch in config.search.batch_sizes:
        scenario = replace(scenario_of(config.profile), batch_size=batch)
        rows = pd.DataFrame([asdict(r) for r in cost_rows(config, parent, library, scenario)])
        out.append((batch, build_problem(config, rows, scenario)))
    return out


def _choose(config: PuzzleConfig, problem: SearchProblem, limits, labels, solutions: int, min_diff: int,
            influence: BlockInfluence | None) -> list[Solution]:
    """The one place search.method is dispatched; every method answers with the same Solution type."""
    common = dict(layers=problem.layers, limits=limits, fixed={k: problem.fixed[k] for k in limits}, labels=labels)
    methods = {
        "mip": lambda: solve(**common, solutions=solutions, min_diff=min_diff, solver=config.search.solver),
        "greedy": lambda: [baselines.greedy_search(**common)],
        "shortgpt": lambda: [baselines.shortgpt(**common, layer_influence=influence.layer)],
        "llm-drop": lambda: [baselines.llm_drop(**common, attention_influence=influence.attention)],
        "uniform-ffn": lambda: [baselines.uniform_ffn(**common)],
        "random": lambda: [baselines.random_search(**common, seed=config.run.seed)],
    }
    return methods[config.search.method]()


def search_stage(config: PuzzleConfig, budget_texts: list[str], solutions: int | None = None,
                 min_diff: int | None = None) -> SearchOutcome:
    started = time.time()
    texts = [f"{k}={v}" for k, v in config.search.budgets.items()] + list(budget_texts)
    if not texts:
        raise PuzzleError("no budget given: pass --budget KIND=VALUE (e.g. latency=0.5x) or set search.budgets")
    budgets = [parse_budget(t) for t in texts]
    method, count = config.search.method, solutions or config.search.solutions
    if method != "mip" and count > 1:
        raise PuzzleError(f"search.solutions: {count} solutions need search.method=mip; {method} gives one")
    influence = job_block_influence(config) if method in baselines.NEEDS_INFLUENCE else None
    solve_seconds, batches, best = 0.0, [], None
    for batch, problem in _problems(config):
        limits, labels = budget_limits(budgets, problem)
        solve_started = time.time()
        try:
            found = _choose(config, problem, limits, labels, count, min_diff or config.search.min_diff, influence)
        except InfeasibleBudget:
            if not config.search.batch_sizes:
                raise
            batches.append(BatchResult(batch, None))
            continue
        finally:
            solve_seconds += time.time() - solve_started
        batches.append(BatchResult(batch, found[0].objective))
        if best is None or found[0].objective < best[1][0].objective:
            best = (problem, found, limits, labels, batch)
    if best is None:
        raise InfeasibleBudget(
            f"no batch size in {config.search.batch_sizes} has a child within {', '.join(texts)}; relax a budget"
        )
    problem, found, limits, labels, batch = best
    fixed = {k: problem.fixed[k] for k in limits}
    baseline = greedy(layers=problem.layers, limits=limits, fixed=fixed)
    notes = [
        f"budget {labels[k]}: the parent already meets it ({problem.parent_totals[k]:.6g} ≤ {limit:.6g})"
        for k, limit in limits.items()
        if problem.parent_totals[k] <= limit
    ]
    if config.search.batch_sizes:
        notes.append("batch sizes: " + ", ".join(
            f"{b.batch_size}: {'infeasible' if b.objective is None else f'{b.objective:.4g}'}" for b in batches
        ) + f"; best at batch size {batch}")
    run = RunDir.of(config)
    key = fingerprint(config, ("search", "scoring", "profile", "run.seed")) + f"-{method}-" + ",".join(texts)
    with run.stage(Stage.search, key) as record:
        file = run.stage_dir(Stage.search) / "solutions.json"
        data = {"method": method, **_solutions_json(problem, found, baseline, limits, labels, solve_seconds)}
        if influence is not None:
            data["block_influence"] = asdict(influence)
        data["batch_size"] = batch
        data["batch_sweep"] = [b.__dict__ for b in batches]
        atomic_write_json(file, data)
        record.outputs = {"solutions": file.name, "count": len(found), "budgets": texts, "batch_size": batch}
    return SearchOutcome(found, baseline, problem, limits, notes, file, solve_seconds, time.time() - started)


def _describe(problem: SearchProblem, solution: Solution, limits, labels) -> dict:
    return {
        "status": solution.status.value,
        "objective": solution.objective,
        "layers": [
            {"layer": i, "block": problem.layers[i][c].name, "score": problem.layers[i][c].score}
            for i, c in enumerate(solution.choice)
        ],
        "usage": {
            labels.get(k, k): {"used": u.used, "limit": u.limit, "parent": problem.parent_totals[k]}
            for k, u in solution.usage.items()
        },
    }


def _solutions_json(problem, found, baseline, limits, labels, solve_seconds) -> dict:
    return {
        "solve_seconds": solve_seconds,
        "solutions": [_describe(problem, s, limits, labels) for s in found],
        "greedy": _describe(problem, baseline, limits, labels) if baseline else None,
    }


@dataclass(frozen=True)
class FrontierPoint:
    budget: str
    limit: float
    objective: float | None  # None: infeasible at this budget
    used: float | None
    greedy_objective: float | None


def parse_sweep(text: str) -> list[str]:
    """'latency=0.3x:1.0x:8' -> eight budget strings from 0.3x to 1.0x."""
    kind, sep, spec = text.partition("=")
    parts = spec.split(":")
    if not sep or len(parts) != 3:
        raise PuzzleError(f"--sweep {text!r}: expected KIND=LOW:HIGH:STEPS, for example latency=0.3x:1.0x:8")
    low, high = parse_budget(f"{kind}={parts[0]}"), parse_budget(f"{kind}={parts[1]}")
    if low.relative != high.relative:
        raise PuzzleError(f"--sweep {text!r}: give both ends as ratios (x) or both with units")
    try:
        steps = int(parts[2])
    except ValueError:
        steps = 0
    if steps < 2:
        raise PuzzleError(f"--sweep {text!r}: STEPS must be an integer of at least 2")
    values = [low.value + (high.value - low.value) * i / (steps - 1) for i in range(steps)]
    unit = "x" if low.relative else ""
    return [f"{kind}={v:.6g}{unit}" for v in values]


def frontier_points(config: PuzzleConfig, sweep_text: str, budget_texts: list[str]) -> tuple[list[FrontierPoint], float]:
    """Best predicted quality at each budget of the sweep (other budgets held), and the parent's swept cost."""
    problem = build_problem(config)
    swept_quantity = QUANTITY[parse_budget(parse_sweep(sweep_text)[0]).kind]
    others = [parse_budget(t) for t in [f"{k}={v}" for k, v in config.search.budgets.items()] + list(budget_texts)]
    # A budget on the swept quantity would cap the sweep; only the other quantities are held.
    others = [b for b in others if QUANTITY[b.kind] != swept_quantity]
    points = []
    for text in parse_sweep(sweep_text):
        swept = parse_budget(text)
        limits, labels = budget_limits([*others, swept], problem)
        fixed = {k: problem.fixed[k] for k in limits}
        quantity = QUANTITY[swept.kind]
        try:
            [best] = solve(layers=problem.layers, limits=limits, fixed=fixed, solver=config.search.solver, labels=labels)
            objective, used = best.objective, best.usage[quantity].used
        except InfeasibleBudget:
            objective = used = None
        g = greedy(layers=problem.layers, limits=limits, fixed=fixed)
        points.append(FrontierPoint(text, limits[quantity], objective, used, g.objective if g else None))
    return points, problem.parent_totals[swept_quantity]


def frontier(config: PuzzleConfig, sweep_text: str, budget_texts: list[str]) -> tuple[list[FrontierPoint], Path, Path]:
    """`frontier_points` written as search/frontier.csv and plotted as search/frontier.png."""
    points, parent_cost = frontier_points(config, sweep_text, budget_texts)
    directory = RunDir.of(config).stage_dir(Stage.search)
    table, plot = directory / "frontier.csv", directory / "frontier.png"
    with atomic_path(table) as tmp:
        pd.DataFrame([p.__dict__ for p in points]).to_csv(tmp, index=False)
    plot_frontier(points, parent_cost, sweep_text, config.search.metric, plot)
    return points, table, plot


def plot_frontier(points: list[FrontierPoint], parent_cost: float, title: str, metric: str, path: Path,
                  chosen: tuple[float, float] | None = None) -> None:
    """MIP and greedy objectives against cost; `chosen` marks a (cost ratio, objective) point, e.g. the child."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    mip = [(p.used / parent_cost, p.objective) for p in points if p.objective is not None]
    grd = [(p.limit / parent_cost, p.greedy_objective) for p in points if p.greedy_objective is not None]
    if mip:
        ax.plot(*zip(*mip), "o-", label="MIP (puzzle)")
    if grd:
        ax.plot(*zip(*grd), "s--", alpha=0.7, label="greedy (budget limit)")
    ax.plot([1.0], [0.0], "k*", markersize=12, label="parent")
    if chosen is not None:
        ax.plot([chosen[0]], [chosen[1]], "rD", markersize=9, label="this child")
    ax.set_xlabel("cost (ratio of the parent)")
    ax.set_ylabel(f"predicted damage (sum of block {metric})")
    ax.set_title(f"frontier: {title}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
