"""Models sharded by FSDP2 (`fully_shard`) over the default process group, built without a whole copy
anywhere (docs/design.md §9): the model is built on the meta device, then each decoder layer is read
whole from the checkpoint's safetensors files, moved to the device and sharded before the next one is
read; then the embeddings and the head, each a unit of its own (in the root's when they are tied), and
the final norm with the root last. A rank never holds more than one unit whole; at rest it holds 1/N of
every weight.

Code that runs a layer's parts itself (the family adapter calls attention and FFN apart, which FSDP2's
forward hooks do not see) gathers the unit around the call with `gathered`.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule


class CheckpointReader:
    """The tensors of a safetensors checkpoint by name; each file is memory-mapped when read, and only the
    tensors asked for are copied out."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.directory = Path(directory)
        self.files: dict[str, Path] = {}
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            self.files = {k: self.directory / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            for file in sorted(self.directory.glob("*.safetensors")):
                with safe_open(file, "pt") as f:
                    self.files.update(dict.fromkeys(f.keys(), file))

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, keys in by_file.items():
            with safe_open(file, "pt", device="cpu") as f:
                out.update({k: f.get_tensor(k) for k in keys})
        return out


def fill_from_checkpoint(module: nn.Module, prefix: str, reader: CheckpointReader, device: torch.device, dtype: torch.dtype,
          skip: tuple[str, ...] = ()) -> None:
    """Give `module`'s parameters (on the meta device) their weights from the checkpoint, a tensor at a time
    (a file's mapped pages count as resident while it is open)."""
    names = [n for n, _ in module.named_parameters(remove_duplicate=True) if not n.startswith(skip)]
    state = {n: reader.read([prefix + n])[prefix + n].to(device=device, dtype=dtype) for n in names}
    module.load_state_dict(state, strict=False, assign=True)


def shard_from_checkpoint(model: nn.Module, reader: CheckpointReader, *, device: torch.device, dtype: torch.dtype,
                          offload: bool = False) -> None:
    """Shard `model` (a causal LM built on the meta device, `model.model.layers` its decoder layers) in place
    with its weights from `reader`. `offload`: the shards (and, for training, their gradients and optimizer
    states) live on the host, and FSDP2 copies each unit to `device` when it is gathered."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    policy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
    home = torch.device("cpu") if offload else device
    for i, layer in enumerate(model.model.layers):
        fill_from_checkpoint(layer, f"model.layers.{i}.", reader, home, dtype)
        fully_shard(layer, offload_policy=policy)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if not tied:  # each vocabulary-sized matrix a unit of its own: only one is ever whole at a time
        for name in ("model.embed_tokens", "lm_head"):
            fill_from_checkpoint(model.get_submodule(name), name + ".", reader, home, dtype)
            fully_shard(model.get_submodule(name), offload_policy=policy)
    fill_from_checkpoint(model, "", reader, home, dtype,
          skip=("model.layers.", "lm_head.") + (() if tied else ("model.embed_tokens.",)))
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True replaced the tied parameter
    # Non-persistent buffers are not in the checkpoint: the rotary frequencies are built again for real.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config).to(device)
    fully_shard(model, offload_policy=policy)


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


@contextmanager
def gathered(*modules: nn.Module):
    """The modules' own FSDP2 units gathered (whole) for the duration; nothing for unsharded modules."""
    units = [m for m in modules if is_sharded(m)]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


def held_bytes(model: nn.Module) -> int:
    """Bytes of `model`'s parameters this rank holds (its shards, for a sharded model)."""
    from torch.distributed.tensor import DTensor

    held = (p.to_local() if isinstance(p, DTensor) else p for p in model.parameters())
    return sum(t.numel() * t.element_size() for t in held if t.device.type != "meta")


def full_tensors(model: nn.Module):
    """(name, whole tensor on the host) for every entry of a sharded model's state dict, in order; a
    collective: every rank iterates, and each tensor is gathered alone."""
    from torch.distributed.tensor import DTensor

    for name, value in model.state_dict().items():
        value = value.full_tensor() if isinstance(value, DTensor) else value
        yield name, value.detach().cpu()
