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


def workers() -> Workers:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Workers(0, 1)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
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
