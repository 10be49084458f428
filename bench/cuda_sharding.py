"""FSDP2 on one device (NCCL on a GPU, world size 1), the paths the CPU tests cannot reach: a random bf16 parent
of the Llama-3.2-1B shape is read a layer at a time and sharded (`puzzle.sharding`), with and without the
host offload (pinned on CUDA), and compared with the whole parent: logits agreement, the allocator's peak and
the time of a forward; then a few fp32 training steps of the offloaded model, the setting of `kd.offload`.

    python bench/cuda_sharding.py --parent /tmp/gc/parent        # after bench/gpu_check.py built it
    python bench/cuda_sharding.py --device cpu --layers 2 --vocab-size 2048 --length 128   # dry run (gloo)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import gpu_check  # bench/gpu_check.py: the 1B shape
import scale  # bench/scale.py: parents from a config

from puzzle.config import ParentSection
from puzzle.families import FamilyAdapter
from puzzle.memory import GIB
from puzzle.parents import load_parent, parent_skeleton
from puzzle.sharding import CheckpointReader, held_bytes, shard_from_checkpoint


def timed(device: torch.device, fn):
    """(result, seconds, peak allocated bytes on a GPU) of fn()."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    began = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")
    return out, time.perf_counter() - began, peak


@torch.no_grad()
def logits_row(what: str, model, x: torch.Tensor, device: torch.device, reference: torch.Tensor | None,
               rows: list) -> torch.Tensor:
    """The model's logits, timed after one warm-up call, and their agreement with `reference`."""
    adapter = FamilyAdapter(model)
    adapter.logits(x)
    logits, seconds, peak = timed(device, lambda: adapter.logits(x).float())
    if reference is None:
        reference = logits
    error = ((logits - reference).norm() / reference.norm()).item()
    agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    rows.append((what, held_bytes(model), peak, seconds, error, agree))
    return logits


def sharded_parent(section: ParentSection, device: torch.device, dtype: torch.dtype, offload: bool):
    model = parent_skeleton(section).model
    shard_from_checkpoint(model, CheckpointReader(Path(section.path)), device=device, dtype=dtype, offload=offload)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parent", type=Path, default=Path("/tmp/gc/parent"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=gpu_check.ONE_B["vocab_size"])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    scale.build_parent({"config": {**gpu_check.ONE_B, "vocab_size": args.vocab_size}, "layers": args.layers}, args.parent)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    section = ParentSection(path=str(args.parent), dtype="bfloat16", device=args.device)
    x = torch.randint(0, 512, (args.batch_size, args.length), generator=torch.Generator().manual_seed(0)).to(device)
    rows = []

    whole = load_parent(section).model
    reference = logits_row("whole parent (bf16)", whole, x, device, None, rows)
    del whole
    for offload in (False, True):
        model = sharded_parent(section, device, torch.bfloat16, offload)
        logits_row(f"sharded, offload {offload} (bf16)", model, x, device, reference, rows)
        del model

    # kd.offload: fp32 shards, gradients and AdamW moments on the host, each unit copied to the GPU in turn.
    model = sharded_parent(section, device, torch.float32, offload=True).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    losses = []

    def step():
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    for _ in range(3):
        _, seconds, peak = timed(device, step)
    rows.append((f"offloaded fp32 training step (losses {', '.join(f'{v:.3f}' for v in losses)})", held_bytes(model), peak,
                 seconds, float("nan"), float("nan")))
    dist.destroy_process_group()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{name}, torch {torch.__version__}, batch {args.batch_size} x {args.length} tokens, {args.layers} layers\n")
    print("| model | parameters held, GiB (device or host) | allocator peak, GiB | seconds | logits rel. error | argmax agreement |")
    print("|---|---:|---:|---:|---:|---:|")
    for what, held, peak, seconds, error, agree in rows:
        print(f"| {what} | {held / GIB:.2f} | {peak / GIB:.2f} | {seconds:.3f} | {error:.2e} | {agree:.4f} |")


if __name__ == "__main__":
    sys.exit(main())
