"""Multi-process work on torch.distributed: candidates are sharded across ranks.

Processes come from an existing launcher, which sets RANK/WORLD_SIZE/MASTER_ADDR: `torchrun`, or
`accelerate launch --multi_gpu` on GPUs; a command's own `--num-processes N` starts N processes through
`torchrun --standalone`. Gloo on CPU, NCCL on CUDA.

accelerate is not a dependency: torch.distributed does all puzzle needs, and accelerate's state does not
see a CPU job at all (under torchrun with gloo, `PartialState()` reports `DistributedType.NO`; its
multi-CPU mode needs MPI), so the CPU runs that test this code could not run through it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from puzzle.errors import PuzzleError


@dataclass(frozen=True)
class Workers:
    rank: int
    world: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def shard(self, items: list) -> list:
        return items[self.rank :: self.world]

    def gather(self, value) -> list:
        """Every rank's `value`, in rank order."""
        return _all_gathered(value, self.world)


@dataclass(frozen=True)
class LayerPipeline:
    """This rank's contiguous share of the parent's layers; the residual stream goes from rank to rank by
    point-to-point messages (gloo on CPU, NCCL on GPU)."""

    layers: range
    rank: int
    world: int
    hidden_size: int
    dtype: torch.dtype
    device: torch.device

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.world - 1

    def receive(self, batch_shape: tuple[int, ...]) -> torch.Tensor:
        hidden = torch.empty(*batch_shape, self.hidden_size, dtype=self.dtype, device=self.device)
        dist.recv(hidden, src=self.rank - 1)
        return hidden

    def send(self, hidden: torch.Tensor) -> None:
        dist.send(hidden.contiguous(), dst=self.rank + 1)

    def agree_step(self, step: int | None, training: bool) -> int | None:
        """The step to resume at: the one every rank with candidates saved; None (all start over) otherwise."""
        votes: list = [None] * self.world
        dist.all_gather_object(votes, (training, step))
        steps = {s for has, s in votes if has}
        return next(iter(steps)) if len(steps) == 1 and None not in steps else None

    def most(self, count: int) -> int:
        """The largest `count` of any rank."""
        return max(self.gather(count))

    def gather(self, value) -> list:
        """Every rank's `value`, in rank order."""
        return _all_gathered(value, self.world)


def _all_gathered(value, world: int) -> list:
    if world == 1:
        return [value]
    values: list = [None] * world
    dist.all_gather_object(values, value)
    return values


def layer_shares(num_layers: int, world: int) -> list[range]:
    """Contiguous ranges of layers, one per rank, as even as the count allows (the first ranks take one more)."""
    base, extra = divmod(num_layers, world)
    starts = [r * base + min(r, extra) for r in range(world + 1)]
    return [range(starts[r], starts[r + 1]) for r in range(world)]


def workers() -> Workers:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Workers(0, 1)
    if not dist.is_initialized():
        # Ranks wait for rank 0 through a one-process stage (a profile, a search): far longer than the defaults.
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=12))
    return Workers(dist.get_rank(), dist.get_world_size())


def relaunch(num_processes: int, argv: list[str]) -> int:
    """Run `python -m puzzle ARGV` in `num_processes` processes through torchrun; returns its exit code."""
    if num_processes < 1:
        raise PuzzleError(f"--num-processes: {num_processes} is not a positive count")
    # --standalone: torchrun runs its own rendezvous on a free port it picks, with no race for the port.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(num_processes),
           "-m", "puzzle", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))}
    return subprocess.run(cmd, env=env).returncode
