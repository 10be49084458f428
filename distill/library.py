"""The replacement library on disk: one safetensors file and one JSON row per trained candidate.

    library/
      space.json                   the candidates of every layer (trained or not), and the BLD fingerprint
      entries/L03.attention.kv1.safetensors
      entries/L03.attention.kv1.json    spec, init, steps, tokens, initial/final loss, sha256 of the weights

The weights are written (atomically) before their row, and a row names the checksum of its weights and
the fingerprint of the settings that trained it. An entry counts as finished only if both files exist,
the checksum matches and the fingerprint is current; anything else is retrained, never used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from puzzle.errors import PuzzleError
from puzzle.blocks.init import ParentLayer, shaped_module
from puzzle.io import atomic_path, atomic_write_json, read_json, sha256_file
from puzzle.blocks.space import SpaceOptions, attention_candidates, check_not_empty, ffn_candidates
from puzzle.blocks.specs import (
    AttentionKind, AttentionSpec, BlockChoice, FfnKind, FfnSpec, ParentShape, SubblockSpec, needs_training, spec_from_id,
)
from puzzle.distill.bld import Candidate, CandidateResult


# Bumped whenever the code changes what a trained entry holds (module layout, weight names), so that
# entries of an older format are retrained by `puzzle distill` and refused by every reader.
ENTRY_FORMAT = 3


def entry_paths(directory: Path, candidate: Candidate) -> tuple[Path, Path]:
    base = directory / "entries" / candidate.key
    return base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".json")


def write_entry(directory: Path, result: CandidateResult, *, init: str, steps: int, tokens: int, fingerprint: str,
                dtype: torch.dtype = torch.float32) -> dict:
    """`dtype`: what the weights are saved in (the parent's: a bf16 parent's library is bf16)."""
    weights, row_file = entry_paths(directory, result.candidate)
    with atomic_path(weights) as tmp:
        save_file({k: v.detach().to(dtype).contiguous() for k, v in result.module.state_dict().items()}, tmp)
    c = result.candidate
    row = {
        "key": c.key,
        "layer": c.layer,
        "attention": c.attention.id if c.attention else None,
        "ffn": c.ffn.id if c.ffn else None,
        "init": init,
        "steps": steps,
        "tokens": tokens,
        "initial_nmse": result.initial_nmse,
        "final_nmse": result.final_nmse,
        "train_loss_first": result.train_loss_first,
        "train_loss_last": result.train_loss_last,
        "kept_initialization": result.kept_initialization,
        "file": weights.name,
        "sha256": sha256_file(weights),
        "fingerprint": fingerprint,
    }
    atomic_write_json(row_file, row)
    return row


def read_entry(directory: Path, candidate: Candidate, fingerprint: str) -> dict | None:
    """The entry's row if the entry is complete, intact and trained with the current settings."""
    weights, row_file = entry_paths(directory, candidate)
    if not (weights.is_file() and row_file.is_file()):
        return None
    try:
        row = json.loads(row_file.read_text())
    except json.JSONDecodeError:
        return None
    if row.get("fingerprint") != fingerprint or row.get("sha256") != sha256_file(weights):
        return None
    return row


def init_name(spec: SubblockSpec, parent_spec: SubblockSpec) -> str:
    if isinstance(spec, AttentionSpec):
        if spec.linear:
            return "least squares on calibration"
        if spec.kind is AttentionKind.mamba:
            return "heads by contribution"
        if spec.num_key_value_heads != parent_spec.num_key_value_heads:
            return "mean-pooled KV heads"
        return "parent weights, window mask"
    if spec.linear:
        return "least squares on calibration"
    if spec.kind is FfnKind.moe:
        return "most important experts"
    return "channel contribution"


@dataclass(frozen=True)
class LayerSpace:
    """A layer's candidates: attention and FFN apart, and the pairs also trained together."""

    attention: list[AttentionSpec]
    ffn: list[FfnSpec]
    coupled: list[BlockChoice]

    def blocks(self) -> list[BlockChoice]:
        """Every block the layer offers: each attention with each FFN (decoupled), then the coupled pairs."""
        return [BlockChoice(a, f) for a in self.attention for f in self.ffn] + list(self.coupled)


def layer_spaces(shapes: list[ParentShape], options: SpaceOptions, pairs: list[BlockChoice],
                 every_pair: bool) -> list[LayerSpace]:
    """Each layer's space; `pairs` are trained together in every layer, or every pair when `every_pair`
    (bld.mode coupled)."""
    for key in ("experts", "experts_per_token"):
        if getattr(options, key) and not any(s.is_moe for s in shapes):
            raise PuzzleError(f"library.{key}: the parent has no MoE layers; leave it empty for a dense parent")
    spaces = []
    for shape in shapes:
        attention, ffn = attention_candidates(shape, options), ffn_candidates(shape, options)
        check_not_empty(attention, ffn)
        if every_pair:
            coupled = [BlockChoice(a, f, coupled=True) for a in attention for f in ffn]
        else:
            for pair in pairs:
                if pair.attention not in attention or pair.ffn not in ffn:
                    raise PuzzleError(f"bld.coupled_pairs: {pair.id!r} names a candidate that is not in the library")
            coupled = list(pairs)
        spaces.append(LayerSpace(attention, ffn, coupled))
    return spaces


def bld_candidates(spaces: list[LayerSpace], shapes: list[ParentShape]) -> list[Candidate]:
    """What BLD trains: every candidate but the parent's own and removed subblocks, and every coupled pair."""
    out = []
    for i, (space, shape) in enumerate(zip(spaces, shapes)):
        out += [Candidate(i, attention=a) for a in space.attention if needs_training(a, shape)]
        out += [Candidate(i, ffn=f) for f in space.ffn if needs_training(f, shape)]
        out += [
            Candidate(i, attention=c.attention, ffn=c.ffn)
            for c in space.coupled
            if needs_training(c.attention, shape) or needs_training(c.ffn, shape)
        ]
    return list(dict.fromkeys(out))


def write_space(directory: Path, space: list[LayerSpace], fingerprint: str) -> None:
    atomic_write_json(
        directory / "space.json",
        {
            "fingerprint": fingerprint,
            "layers": [
                {
                    "attention": [s.id for s in layer.attention],
                    "ffn": [s.id for s in layer.ffn],
                    "coupled": [c.id for c in layer.coupled],
                }
                for layer in space
            ],
        },
    )


def _beside(module: nn.Module, parent: ParentLayer) -> nn.Module:
    """The module on its parent layer's device: built on the host (the default device), it is used beside
    that layer (on a GPU, or on the host where realize streams the parent a layer at a time)."""
    return module.to(parent.device)


class Library:
    """Read access to a finished library: a module with trained weights for any (layer, spec)."""

    def __init__(self, directory: Path, adapter):
        self.directory = Path(directory)
        space_file = self.directory / "space.json"
        if not space_file.is_file():
            raise PuzzleError(f"no library at {self.directory}; run `puzzle distill` first")
        data = read_json(space_file)
        self.fingerprint = data["fingerprint"]
        if not self.fingerprint.endswith(f"-v{ENTRY_FORMAT}"):
            raise PuzzleError(
                f"the library in {self.directory} was built by an older puzzle (entry format "
                f"{self.fingerprint.rpartition('-v')[2]}, now {ENTRY_FORMAT}); run `puzzle distill` again"
            )
        self.adapter = adapter
        self.layers = [
            LayerSpace(
                attention=[spec_from_id(s) for s in layer["attention"]],
                ffn=[spec_from_id(s) for s in layer["ffn"]],
                coupled=[BlockChoice.from_id(pair, coupled=True) for pair in layer["coupled"]],
            )
            for layer in data["layers"]
        ]

    def _trained(self, candidate: Candidate) -> dict:
        row = read_entry(self.directory, candidate, self.fingerprint)
        if row is None:
            raise PuzzleError(
                f"library entry {candidate.key} is missing or damaged in {self.directory}; "
                "run `puzzle distill` again to retrain it"
            )
        return load_file(entry_paths(self.directory, candidate)[0])

    def pair(self, layer: int, attention: AttentionSpec, ffn: FfnSpec) -> tuple[nn.Module, nn.Module]:
        """The (attention, FFN) modules of a coupled pair, trained together."""
        parent = self.adapter.parent_layer(layer)
        state = self._trained(Candidate(layer, attention=attention, ffn=ffn))
        a, f = shaped_module(attention, parent), shaped_module(ffn, parent)
        a.load_state_dict({k.removeprefix("attention."): v for k, v in state.items() if k.startswith("attention.")})
        f.load_state_dict({k.removeprefix("ffn."): v for k, v in state.items() if k.startswith("ffn.")})
        return _beside(a, parent), _beside(f, parent)

    def block(self, layer: int, choice: BlockChoice) -> tuple[nn.Module, nn.Module]:
        """The (attention, FFN) modules of a block: a coupled pair trained together, or two subblocks."""
        if choice.coupled:
            return self.pair(layer, choice.attention, choice.ffn)
        return self.module(layer, choice.attention), self.module(layer, choice.ffn)

    def module(self, layer: int, spec: SubblockSpec) -> nn.Module:
        parent = self.adapter.parent_layer(layer)
        attention = isinstance(spec, AttentionSpec)
        parent_spec = parent.shape.attention if attention else parent.shape.ffn
        if spec == parent_spec or spec.removed:
            return _beside(shaped_module(spec, parent), parent)  # the parent's own subblock, or nothing
        candidate = Candidate(layer, attention=spec) if attention else Candidate(layer, ffn=spec)
        state = self._trained(candidate)
        prefix = "attention." if attention else "ffn."
        module = shaped_module(spec, parent)
        module.load_state_dict({k.removeprefix(prefix): v for k, v in state.items()})
        return _beside(module, parent)
