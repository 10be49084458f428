"""The one timing rule behind every time and tokens/s the tool reports (docs/design.md §14).

Untimed warm-up runs first; then `repeats` timed runs. Things compared with each other are timed in
alternating rounds (one run of each per round), so a slow phase of a shared machine hits them alike;
each one's figure is its fastest run, the estimate least disturbed by other load. Medians and spreads
are recorded beside it where a reader wants to see the noise.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from puzzle.blocks.costs import Scenario
from puzzle.blocks.modeling_puzzle import CACHE


@dataclass(frozen=True)
class Timing:
    """`best` is the fastest repeat: on a shared machine, slower repeats measure the neighbours."""

    best: float
    median: float
    spread: float  # interquartile range / median


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a wall-clock timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def local_device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def measure(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> Timing:
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [median, median, median]
    return Timing(min(times), median, (q[2] - q[0]) / median if median > 0 else 0.0)


def measure_pair(a: Callable[[], object], b: Callable[[], object], device, warmup: int, repeats: int):
    """Time `a` and `b` alternately, so that slow phases of a shared machine hit both alike."""
    ta, tb = [], []
    with torch.no_grad():
        for _ in range(warmup):
            a(), b()
        for _ in range(repeats):
            for fn, times in ((a, ta), (b, tb)):
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                times.append(time.perf_counter() - start)
    return ta, tb



def _generate_once(model, ids: torch.Tensor, decode_length: int) -> tuple[float, float]:
    """Seconds of one prefill and of one decode step (the mean over `decode_length` greedy steps), through the
    model's own forward and KV cache."""
    device = ids.device
    sync(device)
    start = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1)
    sync(device)
    prefilled = time.perf_counter()
    cache, token = getattr(out, CACHE), out.logits[:, -1:].argmax(-1)
    for _ in range(decode_length):
        out = model(token, use_cache=True, **{CACHE: cache})
        token = out.logits[:, -1:].argmax(-1)
    sync(device)
    return prefilled - start, (time.perf_counter() - prefilled) / decode_length


@torch.no_grad()
def generation_times(models: list, scenario: Scenario, warmup: int, repeats: int) -> list[tuple[float, float]]:
    """(prefill seconds, seconds per decode step) of each model at the scenario, by the rule above: random
    prompts, models timed in turn within each round, the fastest round of each kept."""
    rounds = []
    for r in range(warmup + repeats):
        timed = []
        for model in models:
            device = next(model.parameters()).device
            generator = torch.Generator().manual_seed(0)
            ids = torch.randint(0, model.config.vocab_size, (scenario.batch_size, scenario.prefill_length),
                                generator=generator).to(device)
            timed.append(_generate_once(model, ids, scenario.decode_length))
        if r >= warmup:
            rounds.append(timed)
    return [(min(t[i][0] for t in rounds), min(t[i][1] for t in rounds)) for i in range(len(models))]
