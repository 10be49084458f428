"""BLD efficiency on the embedded parent, measured side by side in one run.

Prints:
  1. BLD step time over its compute floor: (parent-forward FLOPs + every candidate's forward+backward
     FLOPs) / this machine's matmul rate, both measured here. FLOPs are counted by torch's
     FlopCounterMode (matrix products only, so the floor is a lower bound).
  2. The speedup of one shared parent pass per batch over a naive loop that runs the parent once per
     candidate, and the most any sharing could give for the same work.

    python bench/bld.py [--config examples/default.yaml] [--steps 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from puzzle.distill.bld import parent_activations, train_step
from puzzle.config import load_config
from puzzle.distill.library import bld_candidates
from puzzle.stages.library import group_modules, job_spaces, prepare_bld
from puzzle.memory import linear_fit_slots, model_shape, target
from puzzle.parents import load_parent, parent_config


def matmul_rate(n: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="examples/default.yaml")
    parser.add_argument("--steps", type=int, default=2, help="timed steps of each method")
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.time()

    config = load_config(args.config)
    parent = load_parent(config.parent)
    adapter = parent.adapter
    shapes = [adapter.shape(i) for i in range(adapter.num_layers)]
    candidates = bld_candidates(job_spaces(config, shapes), shapes)
    fit_slots = linear_fit_slots(config, model_shape(config, parent_config(config.parent)), candidates, target(config))
    job = prepare_bld(config, parent, candidates, fit_slots)
    modules = group_modules(config, parent, job, candidates)
    x = job.train[: config.bld.batch_size]
    params = [p for p in modules.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=True)
    n = len(candidates)

    with FlopCounterMode(display=False) as parent_count:
        parent_activations(adapter, x)
    with FlopCounterMode(display=False) as step_count:
        train_step(candidates, modules, adapter, x, optimizer)
    parent_flops = parent_count.get_total_flops()
    candidate_flops = step_count.get_total_flops() - parent_flops
    rate = matmul_rate()
    floor = (parent_flops + candidate_flops) / rate

    ours = timed(lambda: train_step(candidates, modules, adapter, x, optimizer), args.steps)

    def naive_step():
        for c in candidates:
            train_step([c], modules, adapter, x, optimizer)

    naive = timed(naive_step, max(1, args.steps // 2))
    parent_time = timed(lambda: parent_activations(adapter, x), 5)
    # Sharing can save at most the n-1 extra parent passes: naive = n·P + C, ours ≥ P + C.
    best_possible = naive / (naive - (n - 1) * parent_time)

    tokens = x.numel()
    print(f"machine: {torch.get_num_threads()} threads, matmul rate {rate / 1e9:.1f} GFLOP/s (1024² fp32)")
    print(f"candidates trained per batch: {n}; batch {tuple(x.shape)} = {tokens} tokens")
    print(f"FLOPs per step: parent forward {parent_flops / 1e9:.2f} G, candidates fwd+bwd {candidate_flops / 1e9:.2f} G")
    print(f"BLD step: {ours:.3f} s; compute floor {floor:.3f} s; ratio {ours / floor:.2f}x (target <= 2x)")
    print(f"naive step (parent pass per candidate): {naive:.3f} s; parent pass {parent_time * 1e3:.1f} ms")
    print(
        f"naive/ours speedup: {naive / ours:.2f}x (target >= {n / 2:.0f}x = half the candidates; "
        f"bound for this parent and library: {best_possible:.2f}x)"
    )
    print(f"bench time: {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
