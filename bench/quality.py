"""Puzzle against the simpler methods at the same budgets, before and after the same KD.

On the embedded parent, at three latency budgets (ratios of the parent at the profile's scenario), every
method (the MIP; the MIP with its children measured whole: mip+rerank (search.candidates 8), mip+rounds
(search.rounds 3), evolve; depth+mip (2 whole layers removed by Block Influence, then the MIP); mip+tournament (the 4 best of 8
measured children each get a short KD, search.tournament); and each baseline) picks a child from the same library, scores and profile; each child is realized, distilled with the same KD token budget and evaluated on the same
held-out text. Prints one table (KL to the parent and perplexity before and after KD, parameters,
predicted and measured speedup), writes it as CSV and plots the frontier.

    python bench/quality.py [--config examples/default.yaml] [--budgets 0.7 0.5 0.35] [--kd-tokens N]

The jobs go to RUN_DIR/jobs/<method>-<budget>x, sharing the run's library, scores and profile, so a run
of `puzzle run examples/default.yaml` beforehand saves the shared stages, and a killed benchmark
resumes where it stopped.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import yaml

from puzzle.config import load_jobs, read_yaml
from puzzle.errors import PuzzleError
from puzzle.pipeline import RUN_ORDER, run_stage
from puzzle.preflight import check_inputs
from puzzle.rundir import JOB_STAGES, Stage
from puzzle.search.mip import InfeasibleBudget

# The pipeline's order, without the parent summary and the report, which the table does not use.
SHARED = [s for s in RUN_ORDER if s not in JOB_STAGES and s is not Stage.parent]
PER_JOB = [s for s in RUN_ORDER if s in JOB_STAGES and s is not Stage.report]

# Each method's search settings: the MIP, the searches that measure children whole (search.candidates,
# search.rounds, method evolve), and the baselines.
METHODS = {
    "mip": {"method": "mip"},
    "mip+rerank": {"method": "mip", "candidates": 8},
    "mip+rounds": {"method": "mip", "rounds": 3},
    "evolve": {"method": "evolve", "candidates": 4},
    # Evolution given 7.5x the evaluations (150 generations of 16 offspring), seeded with 8 MIP solutions.
    "evolve-long": {"method": "evolve", "candidates": 8, "generations": 150, "offspring": 16},
    "depth+mip": {"method": "depth-mip", "depth": 2},
    "mip+tournament": {"method": "mip", "candidates": 8, "tournament": 4},
    **{m: {"method": m} for m in ("greedy", "shortgpt", "llm-drop", "uniform-ffn", "random")},
}
# Puzzle's own variants, compared with the plain MIP; the rest are baselines.
VARIANTS = ("mip+rerank", "mip+rounds", "evolve", "evolve-long", "depth+mip", "mip+tournament")


def job_file(config: Path, budgets: list[float], methods: list[str], kd_tokens: int | None, out: Path) -> Path:
    raw = read_yaml(config)
    raw.setdefault("search", {}).pop("budgets", None)
    raw["jobs"] = {
        f"{method.replace('+', '_')}-{budget:g}x": {  # a job's name takes no plus sign
            "search": {**METHODS[method], "budgets": {"latency": f"{budget:g}x"}},
            **({"kd": {"tokens": kd_tokens}} if kd_tokens else {}),
        }
        for budget in budgets
        for method in methods
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def run_job(job) -> dict:
    method, budget = job.run.job.rpartition("-")[0].replace("_", "+"), job.search.budgets["latency"].value_text
    row = {"budget": budget, "method": method}
    summaries = {}
    try:
        for stage in PER_JOB:
            summaries[stage] = run_stage(stage, job)
    except InfeasibleBudget as e:
        return {**row, "note": f"infeasible: {e}"}
    except PuzzleError as e:  # a method that does not apply to this parent is a row of the table, not the end of it
        return {**row, "note": f"not applicable: {e}"}
    chosen = summaries[Stage.search].solutions[0]
    results = {m.name: m for m in summaries[Stage.eval].models}
    parent, child, distilled = results["parent"], results["child"], results["child + KD"]
    return {
        **row,
        "params": child.parameters / parent.parameters,
        "predicted speedup": parent.predicted_latency / child.predicted_latency,
        "measured speedup": parent.measured_latency / distilled.measured_latency,
        "KL before KD": child.kl,
        "KL after KD": distilled.kl,
        "perplexity before KD": child.perplexity,
        "perplexity after KD": distilled.perplexity,
        "parent perplexity": parent.perplexity,
        "predicted KL (sum)": chosen.objective,
        "measured KL (search)": chosen.measured_kl,
        "search seconds": summaries[Stage.search].seconds,
        "note": "",
    }


def plot(frame: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = frame[frame.note == ""]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, column in zip(axes, ("KL before KD", "KL after KD")):
        for method, group in done.groupby("method"):
            group = group.sort_values("predicted speedup")
            mine = method in ("mip", *VARIANTS)
            ax.plot(group["predicted speedup"], group[column], "o-" if mine else "s--",
                    label="puzzle (MIP)" if method == "mip" else method, linewidth=2.5 if mine else 1)
        ax.set_yscale("log")
        ax.set_xlabel("predicted speedup over the parent (latency per batch)")
        ax.set_title(column)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("KL(parent ‖ child) on held-out text")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("examples/default.yaml"))
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5, 0.35])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--kd-tokens", type=int, default=None, help="KD tokens per child (default: the config's)")
    args = parser.parse_args()
    started = time.time()
    base = load_jobs(args.config)[0]
    file = job_file(args.config, args.budgets, args.methods, args.kd_tokens, base.run.dir / "bench_quality.yaml")
    jobs = load_jobs(file)
    check_inputs(jobs)
    for stage in SHARED:
        run_stage(stage, jobs[0])
    rows = []
    for n, job in enumerate(jobs, 1):
        print(f"[{n}/{len(jobs)}] {job.run.job} ({time.time() - started:.0f} s so far)", flush=True)
        rows.append(run_job(job))
    frame = pd.DataFrame(rows)
    table, figure = base.run.dir / "bench_quality.csv", base.run.dir / "bench_quality.png"
    frame.to_csv(table, index=False)
    plot(frame, figure)
    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 20)
    shown = frame.drop(columns=["parent perplexity"]).assign(note=frame.note.str.split(":").str[0])
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    for _, row in frame[frame.note != ""].iterrows():
        print(f"{row.method} at {row.budget}: {row.note}")
    print(f"parent perplexity {frame['parent perplexity'].dropna().iloc[0]:.2f}")
    for budget, group in frame[frame.note == ""].groupby("budget", sort=False):
        puzzle = group[group.method == "mip"]
        others = group[~group.method.isin(["mip", *VARIANTS])]
        for column in ("KL before KD", "KL after KD"):
            if not puzzle.empty and not others.empty:
                best = others.loc[others[column].idxmin()]
                print(f"latency {budget}: {column}: puzzle / best baseline ({best.method}) = "
                      f"{puzzle[column].iloc[0] / best[column]:.2f}")
            for method in VARIANTS:
                refined = group[group.method == method]
                if not puzzle.empty and not refined.empty:
                    print(f"latency {budget}: {column}: {method} / mip = "
                          f"{refined[column].iloc[0] / puzzle[column].iloc[0]:.2f}")
    print(f"table: {table}, plot: {figure}; {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
