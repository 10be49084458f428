"""Replace-1-block scoring with the parent's prefix cached vs. the full model per candidate, in one run.

    python bench/score.py [--config examples/default.yaml] [--blocks 32]

Both methods score the same block candidates (spread evenly over the layers) on the same held-out
blocks and must agree; the wall times and their ratio are printed.
"""

from __future__ import annotations

import argparse
import time

import torch

from puzzle.distill.library import Library
from puzzle.distill.scoring import ParentReference
from puzzle.config import load_config
from puzzle.data import job_blocks
from puzzle.parents import load_parent
from puzzle.rundir import RunDir, Stage


def full_model_kl(reference: ParentReference, layer, attention, ffn) -> float:
    """The naive way: every candidate runs the whole model from the embeddings.

    The parent's log-probabilities come from its cached last hidden state, as in the cached method; only
    the prefix of layers before `layer` is recomputed per candidate.
    """
    adapter = reference.adapter
    total, count = 0.0, 0
    with torch.no_grad():
        for b in reference.batches:
            h = adapter.embed(b.input_ids)
            for i in range(adapter.num_layers):
                if i == layer:
                    h = h + attention(h, b.context.candidate_position_embeddings)
                    h = h + ffn(h)
                else:
                    h = adapter.run_layer(i, h, b.context)
            log_q = torch.log_softmax(adapter.head(h)[:, :-1].float(), -1)
            log_p = torch.log_softmax(adapter.head(b.hidden[-1])[:, :-1].float(), -1)
            total += (log_p.exp() * (log_p - log_q)).sum().item()
            count += log_q.shape[0] * log_q.shape[1]
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="examples/default.yaml")
    parser.add_argument("--blocks", type=int, default=32, help="block candidates to score with each method")
    args = parser.parse_args()
    started = time.time()
    config = load_config(args.config)
    parent = load_parent(config.parent)
    adapter = parent.adapter
    library = Library(RunDir.of(config).stage_dir(Stage.library), adapter)
    held_out = job_blocks(config, parent.tokenizer).validation[: config.scoring.validation_blocks]
    all_blocks = [(i, a, f) for i, layer in enumerate(library.layers) for a in layer.attention for f in layer.ffn]
    step = max(1, len(all_blocks) // args.blocks)
    chosen = all_blocks[::step][: args.blocks]
    modules = [(i, library.module(i, a), library.module(i, f)) for i, a, f in chosen]
    bs = config.scoring.batch_size

    t0 = time.perf_counter()
    reference = ParentReference(adapter, held_out, bs)
    t_reference = time.perf_counter() - t0

    t0 = time.perf_counter()
    cached = [reference.score(i, a, f).kl for i, a, f in modules]
    t_cached = time.perf_counter() - t0

    t0 = time.perf_counter()
    naive = [full_model_kl(reference, i, a, f) for i, a, f in modules]
    t_naive = time.perf_counter() - t0

    worst = max(abs(x - y) for x, y in zip(cached, naive))
    print(f"{len(modules)} block candidates over {adapter.num_layers} layers, {held_out.numel()} held-out tokens")
    print(f"parent reference (shared by both): {t_reference:.2f} s")
    print(f"prefix cached: {t_cached:.2f} s; full model per candidate: {t_naive:.2f} s")
    print(f"speedup: {t_naive / t_cached:.2f}x (including the reference once: "
          f"{(t_naive + t_reference) / (t_cached + t_reference):.2f}x); "
          f"largest KL difference between methods: {worst:.2e}")
    print(f"bench time: {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
