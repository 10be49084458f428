"""Is a search's child a local optimum of its measured KL? Steepest descent over its whole neighbourhood.

A child's neighbourhood is every child evolution's mutation can draw from it (`search.evolve.neighbours`):
one layer's block changed, and where that breaks a budget, a second layer's block of best score that
brings it back. Every neighbour is measured whole on the search's tokens (`puzzle.measured`); the best one
replaces the child while it measures lower. Evolution samples this neighbourhood; this enumerates it, so
"no neighbour is lower" is a statement about the search space around the child, not about luck.

Reads a job of `bench/quality.py` (its solutions and budget), so run that first:

    python bench/quality.py --methods mip evolve-long --budgets 0.5
    python bench/neighbours.py --job evolve-long-0.5x [--config examples/default.yaml] [--steps 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from puzzle.config import load_jobs  # noqa: E402
from puzzle.errors import PuzzleError  # noqa: E402
from puzzle.measured import job_meter  # noqa: E402
from puzzle.problem import job_problem  # noqa: E402
from puzzle.rundir import RunDir, Stage  # noqa: E402
from puzzle.search.evolve import neighbours  # noqa: E402
from puzzle.search.problem import budget_limits  # noqa: E402
from puzzle.solutions import read_solutions  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="examples/default.yaml", help="the config bench/quality.py ran on")
    parser.add_argument("--job", required=True, help="a job of bench/quality.py, e.g. evolve-long-0.5x")
    parser.add_argument("--steps", type=int, default=3, help="descent steps at most")
    args = parser.parse_args()
    file = load_jobs(args.config)[0].run.dir / "bench_quality.yaml"
    if not file.exists():
        raise SystemExit(f"{file} does not exist: run bench/quality.py with --config {args.config} first")
    config = next((j for j in load_jobs(file) if j.run.job == args.job), None)
    if config is None:
        raise SystemExit(f"{file} has no job {args.job!r}")
    problem = job_problem(config)
    limits, _ = budget_limits(list(config.search.budgets.values()), problem)
    fixed = {k: problem.fixed[k] for k in limits}
    labels = [[block.label for block in layer] for layer in problem.layers]
    found = read_solutions(RunDir.of(config).stage_dir(Stage.search) / "solutions.json").solutions[0]
    try:
        choice = [options.index(block) for options, block in zip(labels, found.blocks)]
    except ValueError:
        raise PuzzleError(f"{args.job}: its child has a block the run's scores no longer offer") from None
    meter = job_meter(config)
    child = lambda c: tuple(labels[i][b] for i, b in enumerate(c))  # noqa: E731
    [kl] = meter.kl([child(choice)])
    print(f"{args.job}: measured KL {kl:.5f} on {meter.blocks} blocks of the search's tokens")
    for step in range(args.steps):
        started = time.time()
        around = neighbours(problem.layers, choice, limits, fixed)
        kls = meter.kl([child(c) for c in around])
        best = min(range(len(around)), key=kls.__getitem__)
        print(f"step {step + 1}: {len(around)} neighbours measured in {time.time() - started:.0f} s; the lowest "
              f"{kls[best]:.5f} ({kls[best] / kl - 1:+.1%} against the child's {kl:.5f})", flush=True)
        if kls[best] >= kl:
            print("a local optimum: no neighbour measures lower")
            break
        choice, kl = around[best], kls[best]
    print("child:", ", ".join(f"{i}: {b.attention.id} + {b.ffn.id}" for i, b in enumerate(child(choice))))


if __name__ == "__main__":
    main()
