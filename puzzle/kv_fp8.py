"""FP8 (E4M3) KV cache: per-layer scales calibrated on text, the KL such a cache adds to a model, and the
scales stored in a child checkpoint where vLLM reads them.

A layer's K scale is max |K| over the calibration tokens / 448 (the E4M3 maximum), K taken after the
rotary embedding, as a KV cache stores it; likewise for V. The cache itself is simulated: the child's
attention quantizes and dequantizes K and V (`DeciLMForCausalLM.set_kv_fp8_scales`).

In a checkpoint (docs/child-checkpoint.md): `model.layers.N.self_attn.k_scale` and `v_scale` (float32, shape
[1], as llm-compressor writes them) in `kv_cache_scales.safetensors`, listed in the weights index, and a
compressed-tensors scheme with no weight groups and only a `kv_cache_scheme`, under `compression_config`:
vLLM reads that key when `quantization_config` is absent, and transformers ignores it, whereas a
`quantization_config` would make a plain transformers load require the compressed-tensors package.
"""

from __future__ import annotations

from dataclasses import dataclass

import json
from pathlib import Path

import torch

from puzzle.config import PuzzleConfig
from puzzle.data import job_blocks
from puzzle.errors import PuzzleError
from puzzle.blocks.specs import Engine
from puzzle.blocks.modeling_puzzle import FP8_E4M3_MAX, Attention, DeciLMConfig, DeciLMForCausalLM
from puzzle.distill.metrics import hf_logits, quality
from puzzle.families import family_for
from puzzle.parents import parent_config
from puzzle.rundir import fingerprint
from puzzle.sharding import CheckpointReader, fill_from_checkpoint

# A layer whose K or V is zero on every calibration token would get a zero scale; any positive one is exact.
_SMALLEST_MAX = 1e-12


@dataclass(frozen=True)
class KvScales:
    layers: tuple[int, ...]  # the layers with softmax attention (one cache slot each), in order
    k: tuple[float, ...]
    v: tuple[float, ...]

    def pairs(self) -> list[tuple[float, float]]:
        return list(zip(self.k, self.v))


@dataclass(frozen=True)
class Fp8Effect:
    kl: float  # mean KL(reference ‖ model) per token with the model's own KV
    kl_fp8: float  # the same with the simulated FP8 KV cache
    scales: KvScales

    @property
    def added_kl(self) -> float:
        return self.kl_fp8 - self.kl


class _AbsMaxCache:
    """Stands in for the KV cache of a whole-sequence forward: records max |K| and max |V| per cache slot
    and hands K and V back unchanged, so the attention is the uncached one."""

    def __init__(self, slots: int):
        self.k = [0.0] * slots
        self.v = [0.0] * slots

    def get_seq_length(self) -> int:
        return 0

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int):
        self.k[layer_idx] = max(self.k[layer_idx], k.abs().max().item())
        self.v[layer_idx] = max(self.v[layer_idx], v.abs().max().item())
        return k, v


@dataclass(frozen=True)
class KvCalibration:
    """What a child writer needs to calibrate and store the FP8 KV scales of the child it writes."""

    blocks: torch.Tensor  # [n, sequence] token ids
    batch_size: int
    device: torch.device


def stores_kv_scales(config: PuzzleConfig) -> bool:
    """A child checkpoint carries FP8 KV scales when the deployment's KV cache is FP8 (`profile.kv_dtype`)
    and its engine reads them: llama.cpp quantizes its cache its own way, and its converter takes only
    tensors it can map. Hybrid children (Nemotron-H Puzzle) carry none: their calibration is not built."""
    if config.profile.kv_dtype != "fp8" or config.target.engine is Engine.llama_cpp:
        return False
    return not family_for(parent_config(config.parent).model_type).hybrid


def calibration_key(config: PuzzleConfig) -> str:
    """What the stored scales depend on, for the keys of the stages that write children."""
    return f"kv-fp8-{fingerprint(config, ('data',))}" if stores_kv_scales(config) else "no-kv-scales"


def job_kv_calibration(config: PuzzleConfig, tokenizer, device: torch.device) -> KvCalibration | None:
    """The calibration a child writer of this job runs (None when the child carries no scales): the job's
    calibration blocks, in eval's batch size."""
    if not stores_kv_scales(config):
        return None
    blocks = job_blocks(config, tokenizer).calibration(config.data.calibration_blocks)
    return KvCalibration(blocks, config.eval.batch_size, device)


SCALES_FILE = "kv_cache_scales.safetensors"
INDEX_FILE = "model.safetensors.index.json"
KV_CACHE_SCHEME = {
    "quant_method": "compressed-tensors", "format": "dense", "quantization_status": "compressed",
    "config_groups": {}, "ignore": [],
    "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True},
}


def _check_blocks(blocks: torch.Tensor, batch_size: int) -> None:
    if blocks.ndim != 2 or len(blocks) == 0:
        raise PuzzleError(f"blocks: expected a non-empty [n, sequence] tensor of token ids, got shape {tuple(blocks.shape)}")
    if batch_size < 1:
        raise PuzzleError(f"batch_size: got {batch_size}; expected at least 1")


@torch.no_grad()
def calibrate_kv_scales(model: DeciLMForCausalLM, *, blocks: torch.Tensor, batch_size: int) -> KvScales:
    """Per-layer FP8 scales of K and V on these token blocks. Switches the model's FP8 simulation off, so
    that the scales measure its own K and V, not already rounded ones."""
    _check_blocks(blocks, batch_size)
    model.set_kv_fp8_scales(None)
    recorder = _AbsMaxCache(len(model.model.cache_windows))
    device = next(model.parameters()).device
    for start in range(0, len(blocks), batch_size):
        model(blocks[start : start + batch_size].to(device), cache=recorder, use_cache=True, logits_to_keep=1)
    layers = tuple(i for i, layer in enumerate(model.model.layers) if isinstance(layer.self_attn, Attention))
    return KvScales(layers, tuple(max(m, _SMALLEST_MAX) / FP8_E4M3_MAX for m in recorder.k),
                    tuple(max(m, _SMALLEST_MAX) / FP8_E4M3_MAX for m in recorder.v))


def fp8_kv_effect(
    reference_logits_of, models: dict[str, DeciLMForCausalLM], *, calibration: torch.Tensor, blocks: torch.Tensor,
    batch_size: int, stored: dict[str, KvScales] | None = None,
) -> dict[str, Fp8Effect]:
    """Each model's KL to the reference on `blocks` with its own KV and with an FP8 KV cache: the `stored`
    scales of a model whose checkpoint carries them (what an engine will use), else scales calibrated on
    `calibration`. The models are left with the simulation off."""
    _check_blocks(blocks, batch_size)
    stored = stored or {}
    scales = {name: stored.get(name) or calibrate_kv_scales(m, blocks=calibration, batch_size=batch_size)
              for name, m in models.items()}
    # quality() names the reference "reference"; numbered keys keep a model of that name apart from it.
    numbered = {str(i): hf_logits(m) for i, m in enumerate(models.values())}
    own, _ = quality(reference_logits_of, numbered, blocks, batch_size)
    try:
        for name, model in models.items():
            model.set_kv_fp8_scales(scales[name].pairs())
        fp8, _ = quality(reference_logits_of, numbered, blocks, batch_size)
    finally:
        for model in models.values():
            model.set_kv_fp8_scales(None)
    return {name: Fp8Effect(own[str(i)]["kl"], fp8[str(i)]["kl"], scales[name]) for i, name in enumerate(models)}


def _scale_names(layer: int) -> tuple[str, str]:
    return f"model.layers.{layer}.self_attn.k_scale", f"model.layers.{layer}.self_attn.v_scale"


@torch.no_grad()
def streamed_kv_scales(directory: Path, calibration: KvCalibration, dtype: torch.dtype) -> KvScales:
    """`calibrate_kv_scales` of the checkpoint in `directory`, computed in `dtype` a layer at a time: only the
    embeddings, one decoder layer and the calibration's residual stream (on the host) are held, so a child
    larger than the device is calibrated as it is written."""
    _check_blocks(calibration.blocks, calibration.batch_size)
    config = DeciLMConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = DeciLMForCausalLM(config).model
    reader, device = CheckpointReader(directory), calibration.device
    fill_from_checkpoint(model.embed_tokens, "model.embed_tokens.", reader, device, dtype)
    rotary = type(model.rotary_emb)(config=config).to(device)
    batches = calibration.blocks.split(calibration.batch_size)
    stream = [model.embed_tokens(b.to(device)).cpu() for b in batches]
    recorder = _AbsMaxCache(len(model.cache_windows))
    for i, layer in enumerate(model.layers):
        fill_from_checkpoint(layer, f"model.layers.{i}.", reader, device, dtype)
        for j, hidden in enumerate(stream):
            hidden = hidden.to(device)
            position_embeddings = rotary(hidden, torch.arange(hidden.shape[1], device=device).unsqueeze(0))
            stream[j] = layer(hidden, position_embeddings, recorder).cpu()
        layer.to("meta")
    layers = tuple(i for i, layer in enumerate(model.layers) if isinstance(layer.self_attn, Attention))
    return KvScales(layers, tuple(max(m, _SMALLEST_MAX) / FP8_E4M3_MAX for m in recorder.k),
                    tuple(max(m, _SMALLEST_MAX) / FP8_E4M3_MAX for m in recorder.v))


def store_kv_scales(directory: Path, scales: KvScales) -> None:
    """Add the scales to the checkpoint being written in `directory` (the writer's temporary directory: the
    caller makes the whole checkpoint appear at once): their file, their entries in the weights index (made
    for a single weights file too, so that vLLM's loader, which keeps only indexed files, reads them), and the
    scheme in config.json."""
    from safetensors.torch import save_file

    tensors = {}
    for layer, k, v in zip(scales.layers, scales.k, scales.v):
        k_name, v_name = _scale_names(layer)
        tensors[k_name], tensors[v_name] = torch.tensor([k]), torch.tensor([v])
    save_file(tensors, directory / SCALES_FILE, metadata={"format": "pt"})
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        index = json.loads(index_path.read_text())
    else:
        from safetensors import safe_open

        with safe_open(directory / "model.safetensors", "pt") as f:
            index = {"metadata": {"total_size": (directory / "model.safetensors").stat().st_size},
                     "weight_map": dict.fromkeys(f.keys(), "model.safetensors")}
    index["weight_map"].update(dict.fromkeys(tensors, SCALES_FILE))
    index["metadata"]["total_size"] += sum(t.numel() * t.element_size() for t in tensors.values())
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["compression_config"] = KV_CACHE_SCHEME
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_kv_scales(directory: Path) -> KvScales | None:
    """The FP8 KV scales a child checkpoint carries (None when it carries none), in `KvScales`' layer order."""
    from safetensors import safe_open

    file = Path(directory) / SCALES_FILE
    if not file.is_file():
        return None
    with safe_open(file, "pt") as f:
        names = set(f.keys())
        layers = sorted({int(n.split(".")[2]) for n in names})
        pairs = [tuple(f.get_tensor(n).item() for n in _scale_names(layer)) for layer in layers]
    return KvScales(tuple(layers), tuple(k for k, _ in pairs), tuple(v for _, v in pairs))
