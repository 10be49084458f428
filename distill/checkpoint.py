"""Resumable training state shared by BLD and KD: weights and AdamW moments as safetensors, no pickles.

A checkpoint is a directory replaced atomically, so a kill at any moment leaves the previous one whole.
Sharded (FSDP2) weights and moments are saved as the rank's own shards, in the rank's own directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import DTensor

from puzzle.io import atomic_dir, restore_swapped


@dataclass
class TrainingState:
    step: int = 0
    initial: dict[str, float] = field(default_factory=dict)
    train_loss: dict[str, list[float]] = field(default_factory=dict)
    log: list[dict] = field(default_factory=list)  # free-form rows a trainer keeps (e.g. per-step records)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded (DTensor) tensor; a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def _optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[nn.Parameter, str]) -> dict[str, torch.Tensor]:
    out = {}
    for param, state in optimizer.state.items():
        for k, v in state.items():
            v = _local(v).detach()
            out[f"{names[param]}::{k}"] = v.clone().reshape(-1) if v.dim() == 0 else v.contiguous()
    return out


def _like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """An optimizer state read from disk, sharded as its parameter is."""
    if isinstance(param, DTensor):
        return DTensor.from_local(value.to(param.device), param.device_mesh, param.placements,
                                  shape=param.shape, stride=param.stride())
    return value


def save_checkpoint(directory: Path, modules: nn.ModuleDict, optimizer, state: TrainingState, tag: str) -> None:
    """`tag` names the settings the state was trained with; only the same tag resumes from it."""
    names = {p: n for n, p in modules.named_parameters()}
    with atomic_dir(directory) as tmp:
        save_file({k: _local(v).contiguous() for k, v in modules.state_dict().items()}, tmp / "weights.safetensors")
        save_file(_optimizer_tensors(optimizer, names), tmp / "optimizer.safetensors")
        (tmp / "state.json").write_text(
            json.dumps({"tag": tag, "step": state.step, "keys": list(modules.keys()), "initial": state.initial,
                        "train_loss": state.train_loss, "log": state.log})
        )


def saved_step(directory: Path, tag: str) -> int | None:
    """The step of the checkpoint in `directory` if it was saved with `tag`."""
    restore_swapped(directory)
    state_file = directory / "state.json"
    if not state_file.is_file():
        return None
    saved = json.loads(state_file.read_text())
    return saved["step"] if saved.get("tag") == tag else None


def load_checkpoint(directory: Path, modules: nn.ModuleDict, optimizer, tag: str) -> TrainingState | None:
    """The saved state if it belongs to these modules and settings; None otherwise (training starts over)."""
    restore_swapped(directory)
    state_file = directory / "state.json"
    if not state_file.is_file():
        return None
    saved = json.loads(state_file.read_text())
    if saved.get("tag") != tag or saved["keys"] != list(modules.keys()):
        return None
    weights, current = load_file(directory / "weights.safetensors"), modules.state_dict()
    if weights.keys() != current.keys():
        return None
    with torch.no_grad():
        for key, value in current.items():
            _local(value).copy_(weights[key])
    tensors = load_file(directory / "optimizer.safetensors")
    for name, param in modules.named_parameters():
        entries = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.split("::", 1)[0] == name}
        if entries:
            optimizer.state[param] = {k: v.reshape(()) if k == "step" else _like(param, v) for k, v in entries.items()}
    return TrainingState(saved["step"], saved["initial"], saved["train_loss"], saved.get("log", []))
