"""The child checkpoint format (docs/child-checkpoint.md, docs/design.md §8): what `realize`, `kd` and `fuse` write.

The Nemotron-NAS / DeciLM layout (`model_type: nemotron-nas`, per-layer `block_configs`) with the parent's
weight names (`model.layers.N.…`), the project's self-contained modeling file (`modeling_puzzle.py`,
torch and transformers only) through `auto_map`, and `puzzle_child.json`: the typed block of every layer,
the engine verdicts and what later stages add (`kd`, `fusion`).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import torch

import puzzle.blocks.modeling_puzzle as modeling
from puzzle.errors import PuzzleError
from puzzle.io import atomic_dir, read_json
from puzzle.blocks.specs import AttentionKind, BlockChoice, FfnKind, ParentShape
from puzzle.distill.library import Library
from puzzle.blocks.hybrid import HybridSubblock, hybrid_block_config, hybrid_child_config
from puzzle.blocks.modeling_hybrid import NemotronHPuzzleForCausalLM
from puzzle.families import family_for, parent_shapes
from puzzle.kv_fp8 import SCALES_FILE, KvCalibration, store_kv_scales, streamed_kv_scales


def ffn_mult(intermediate_size: int, hidden_size: int) -> float:
    """The DeciLM multiplier whose engine formula, round_up(int(2·m·hidden/3), 256), gives this size back."""
    return round(3 * intermediate_size / (2 * hidden_size), 6)


def block_config(choice: BlockChoice, shape: ParentShape) -> dict:
    """One layer's `block_configs` entry; `shape` is the parent layer the choice replaces."""
    a, f = choice.attention, choice.ffn
    num_attention_heads, hidden_size = shape.num_attention_heads, shape.hidden_size
    if a.kind is AttentionKind.attention:
        attention = {"no_op": False, "replace_with_linear": False,
                     "n_heads_in_group": num_attention_heads // a.num_key_value_heads, "window_length": a.window,
                     "num_key_value_heads": a.num_key_value_heads}
    else:
        attention = {"no_op": a.removed, "replace_with_linear": a.linear, "n_heads_in_group": None,
                     "window_length": None}
    if f.kind is FfnKind.dense:
        ffn = {"no_op": False, "replace_with_linear": False, "ffn_mult": ffn_mult(f.intermediate_size, hidden_size),
               "intermediate_size": f.intermediate_size}
        if f.intermediate_size % 256:  # no multiplier gives it; without one vLLM reads intermediate_size itself
            del ffn["ffn_mult"]
    elif f.kind is FfnKind.moe:
        ffn = {"no_op": False, "replace_with_linear": False, "ffn_mult": None, "moe": {
            "num_local_experts": f.num_experts, "num_experts_per_tok": f.experts_per_token,
            "intermediate_size": shape.intermediate_size, "norm_topk_prob": shape.normalize_expert_weights,
            "bias": shape.expert_bias, "swiglu_limit": shape.swiglu_limit, "swiglu_alpha": shape.swiglu_alpha,
        }}
    else:
        ffn = {"no_op": f.removed, "replace_with_linear": f.linear, "ffn_mult": None}
    return {"attention": attention, "ffn": ffn}


def per_layer_config(config: modeling.DeciLMConfig) -> dict[str, dict]:
    """transformers 5.x's sparse per-layer overrides of the model-wide config, from `block_configs`, for the
    readers that know that format: KV heads, FFN width, a sliding window, and removed subblocks (`skip`).
    A linear replacement and an MoE's expert count have no word there; they are in `block_configs` alone."""
    overrides = {}
    for i, block in enumerate(config.block_configs):
        a, f = block["attention"], block["ffn"]
        row, skip = {}, []
        if a["no_op"]:
            skip.append("attention")
        elif not a["replace_with_linear"]:
            if a["num_key_value_heads"] != config.num_key_value_heads:
                row["num_key_value_heads"] = a["num_key_value_heads"]
            if a["window_length"]:
                row["sliding_window"] = a["window_length"]
        if f["no_op"]:
            skip.append("mlp")
        elif f.get("intermediate_size") not in (None, config.intermediate_size):
            row["intermediate_size"] = f["intermediate_size"]
        if skip:
            row["skip"] = skip
        if row:
            overrides[str(i)] = row
    return overrides


def child_config(parent_config, choices: list[BlockChoice]):
    """The child's config: DeciLM's `block_configs`, or the Nemotron-H Puzzle layout's for a hybrid parent."""
    p = parent_config
    shapes = parent_shapes(p)
    if family_for(p.model_type).hybrid:
        return hybrid_child_config(p, choices, shapes)
    first = shapes[0]  # what a family adds to attention is the same in every layer
    config = modeling.DeciLMConfig(
        vocab_size=p.vocab_size, hidden_size=p.hidden_size, num_hidden_layers=len(choices),
        num_attention_heads=p.num_attention_heads, num_key_value_heads=p.num_key_value_heads,
        head_dim=getattr(p, "head_dim", None) or p.hidden_size // p.num_attention_heads,
        intermediate_size=p.intermediate_size, hidden_act=p.hidden_act,
        max_position_embeddings=p.max_position_embeddings, rms_norm_eps=p.rms_norm_eps,
        rope_parameters=dict(p.rope_parameters), tie_word_embeddings=p.tie_word_embeddings,
        attention_bias=first.attention_bias, attention_output_bias=first.attention_output_bias,
        qk_norm=first.qk_norm, attention_sinks=first.attention_sinks,
        block_configs=[block_config(c, shape) for c, shape in zip(choices, shapes)],
        bos_token_id=p.bos_token_id, eos_token_id=p.eos_token_id, pad_token_id=p.pad_token_id,
    )
    config.per_layer_config = per_layer_config(config)
    config.architectures = ["DeciLMForCausalLM"]
    config.auto_map = {
        "AutoConfig": "modeling_puzzle.DeciLMConfig",
        "AutoModelForCausalLM": "modeling_puzzle.DeciLMForCausalLM",
    }
    return config


def layer_state(library: Library, i: int, c: BlockChoice) -> dict[str, torch.Tensor]:
    """Layer i's weights for block `c`, from the library, under the parent's names."""
    attention, ffn = library.block(i, c)
    state = {}
    for name, value in attention.state_dict().items():
        key = f"model.layers.{i}.input_layernorm.weight" if name == "input_layernorm.weight" else f"model.layers.{i}.self_attn.{name}"
        state[key] = value
    for name, value in ffn.state_dict().items():
        key = (f"model.layers.{i}.post_attention_layernorm.weight" if name == "post_attention_layernorm.weight"
               else f"model.layers.{i}.mlp.{name}")
        state[key] = value
    return state


def child_state_dict(parent, library: Library, choices: list[BlockChoice]) -> dict[str, torch.Tensor]:
    """Parent's embeddings, final norm and head; each layer's subblocks from the library, under the parent's names."""
    state = {
        "model.embed_tokens.weight": parent.model.model.embed_tokens.weight,
        "model.norm.weight": parent.model.model.norm.weight,
        "lm_head.weight": parent.model.lm_head.weight,
    }
    for i, c in enumerate(choices):
        state.update(layer_state(library, i, c))
    return state


def build_child(parent, library: Library, choices: list[BlockChoice]):
    """The child model in memory: a DeciLM child, or a Nemotron-H Puzzle one for a hybrid parent."""
    if family_for(parent.model.config.model_type).hybrid:
        return _build_hybrid_child(parent, library, choices)
    config = child_config(parent.model.config, choices)
    config._attn_implementation = parent.model.config._attn_implementation
    child = modeling.DeciLMForCausalLM(config)
    state = child_state_dict(parent, library, choices)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    missing, unexpected = child.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"child weights do not match its config (missing {missing}, unexpected {unexpected})")
    return child.to(next(parent.model.parameters()).dtype).eval()


def _build_hybrid_child(parent, library: Library, choices: list[BlockChoice]) -> NemotronHPuzzleForCausalLM:
    """Each kept layer's weights are its library module's: the norm and mixer of a `HybridSubblock`."""
    shapes, backbone = parent.adapter.shapes, parent.model.model
    config = child_config(parent.model.config, choices)
    config._attn_implementation = parent.model.config._attn_implementation
    state = {"model.embeddings.weight": backbone.embeddings.weight, "model.norm_f.weight": backbone.norm_f.weight}
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = parent.model.lm_head.weight
    kept = 0
    for i, (choice, shape) in enumerate(zip(choices, shapes)):
        if hybrid_block_config(choice, shape, i) is None:
            continue
        subblock = next(m for m in library.block(i, choice) if isinstance(m, HybridSubblock))
        state.update({f"model.layers.{kept}.{name}": value for name, value in subblock.state_dict().items()})
        kept += 1
    with torch.device("meta"):
        child = NemotronHPuzzleForCausalLM(config)
    child.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        child.tie_weights()
    return child.to(next(parent.model.parameters()).dtype).eval()


# Weights are written in files of at most this many bytes, as save_pretrained does (its default is 50 GB,
# but smaller files stream and resume better: what the engines' loaders expect either way).
FILE_BYTES = 4 * 2**30


class WeightFiles:
    """Tensors written as they come into safetensors files of at most `limit` bytes, then named and indexed
    as save_pretrained names them (`model.safetensors`, or `model-0000k-of-0000n.safetensors` and
    `model.safetensors.index.json`): only one file's tensors are held at a time."""

    def __init__(self, directory: Path, limit: int):
        self.directory, self.limit = Path(directory), limit
        self.pending: dict[str, torch.Tensor] = {}
        self.files: list[list[str]] = []  # names in each written file

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and sum(t.numel() * t.element_size() for t in self.pending.values()) + size > self.limit:
            self._flush()
        self.pending[name] = tensor.detach().contiguous()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.pending, self.directory / f"part-{len(self.files)}.safetensors", metadata={"format": "pt"})
        self.files.append(list(self.pending))
        self.pending = {}

    def close(self) -> None:
        if self.pending or not self.files:
            self._flush()
        n = len(self.files)
        names = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        for k, name in enumerate(names):
            (self.directory / f"part-{k}.safetensors").rename(self.directory / name)
        if n > 1:
            total = sum((self.directory / name).stat().st_size for name in names)
            index = {"metadata": {"total_size": total},
                     "weight_map": {t: name for name, file in zip(names, self.files) for t in file}}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def saved_dtype(config) -> torch.dtype:
    """The dtype a child is written in: `realize.dtype`, or by default the narrower of the parent checkpoint's
    own dtype and the dtype the parent computes in (a quantized checkpoint's is its compute dtype's)."""
    from puzzle.parents import parent_config

    if config.realize.dtype != "auto":
        return getattr(torch, config.realize.dtype)
    stored = str(getattr(parent_config(config.parent), "dtype", None) or "float32").removeprefix("torch.")
    computed = stored if config.parent.dtype == "auto" else config.parent.dtype
    stored = stored if stored in ("float32", "bfloat16", "float16") else computed
    return getattr(torch, stored if computed == "float32" else computed)


def write_child(directory: Path, config: modeling.DeciLMConfig, tensors, *, dtype: torch.dtype, tokenizer,
                generation_config, info: dict, kv_calibration: KvCalibration | None = None) -> None:
    """A child checkpoint in `dtype`, whole or not at all, from `tensors` ((name, tensor) pairs, taken one at a
    time): weights, config, tokenizer, generation config, modeling file and puzzle_child.json; with
    `kv_calibration`, the FP8 KV scales calibrated on the written weights (`puzzle.kv_fp8`)."""
    with atomic_dir(directory) as tmp:
        files = WeightFiles(tmp, FILE_BYTES)
        for name, value in tensors:
            if config.tie_word_embeddings and name == "lm_head.weight":
                continue
            files.add(name, value.to(dtype))
        files.close()
        config.dtype = dtype
        config.save_pretrained(tmp)
        if kv_calibration is not None:
            store_kv_scales(tmp, streamed_kv_scales(tmp, kv_calibration, dtype))
        tokenizer.save_pretrained(tmp)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        # The modeling file its config's auto_map names: modeling_puzzle.py, or modeling_hybrid.py.
        source = Path(sys.modules[type(config).__module__].__file__)
        shutil.copyfile(source, tmp / source.name)
        (tmp / "puzzle_child.json").write_text(json.dumps(info, indent=2) + "\n")


def write_checkpoint(directory: Path, model: modeling.DeciLMForCausalLM, parent, info: dict, dtype: torch.dtype,
                     kv_calibration: KvCalibration | None = None) -> None:
    """A whole child model in memory as a child checkpoint (see `write_child`)."""
    write_child(directory, model.config, model.state_dict().items(), dtype=dtype, tokenizer=parent.tokenizer,
                generation_config=parent.model.generation_config, info=info, kv_calibration=kv_calibration)


def streamed_child_tensors(parent, reader, library: Library, choices: list[BlockChoice], dtype: torch.dtype):
    """The child's weights in order, one layer at a time: `parent` is built on the meta device and holds one
    decoder layer's weights (read by key through `reader`) while that layer's blocks are taken from the
    library; the embeddings, final norm and head come straight from the parent's files."""
    layers = parent.model.model.layers
    yield "model.embed_tokens.weight", reader.read(["model.embed_tokens.weight"])["model.embed_tokens.weight"].to(dtype)
    for i, choice in enumerate(choices):
        prefix = f"model.layers.{i}."
        weights = reader.read([k for k in reader.files if k.startswith(prefix)])
        layers[i].load_state_dict({k.removeprefix(prefix): v.to(dtype) for k, v in weights.items()}, assign=True)
        for name, value in layer_state(library, i, choice).items():
            yield name, value.to(dtype)
        layers[i].to("meta")  # the layer's weights are freed before the next is read
    names = ["model.norm.weight"] + ([] if parent.model.config.tie_word_embeddings else ["lm_head.weight"])
    yield from ((k, v.to(dtype)) for k, v in reader.read(names).items())


def child_class(directory: Path):
    """The project's model class of the child checkpoint in `directory`: DeciLM, or Nemotron-H Puzzle (hybrid)."""
    model_type = read_json(Path(directory) / "config.json").get("model_type")
    return NemotronHPuzzleForCausalLM if model_type == "nemotron_h_puzzle" else modeling.DeciLMForCausalLM


def load_child_sharded(directory: Path, dtype: torch.dtype, device: torch.device,
                       offload: bool = False) -> modeling.DeciLMForCausalLM:
    """A child checkpoint sharded by FSDP2 over the default process group, read a layer at a time
    (`puzzle.sharding`); `offload`: the shards live on the host."""
    from puzzle.sharding import CheckpointReader, shard_from_checkpoint

    model_class = child_class(directory)
    config = model_class.config_class.from_pretrained(directory)
    with torch.device("meta"):
        model = model_class(config)
    shard_from_checkpoint(model, CheckpointReader(directory), device=torch.device(device), dtype=dtype, offload=offload)
    return model.eval()


def load_child(directory: Path, dtype: torch.dtype | None = None, device="cpu") -> modeling.DeciLMForCausalLM:
    """A child checkpoint through the project's own modeling code (no remote code is run)."""
    if not (directory / "config.json").is_file():
        raise PuzzleError(f"{directory} is not a child checkpoint (no config.json)")
    # Weights from safetensors only, as for the parent: a pickled .bin is never loaded.
    model = child_class(directory).from_pretrained(directory, dtype=dtype, use_safetensors=True)
    return model.to(device).eval()


def child_info(directory: Path) -> dict:
    return read_json(directory / "puzzle_child.json")


def child_choices(directory: Path) -> list[BlockChoice]:
    """The typed block of every layer, as realize recorded it."""
    return [BlockChoice.from_json(layer) for layer in child_info(directory)["layers"]]


def checkpoint_parameters(directory: Path) -> int:
    """Parameter count from the safetensors headers, without loading the weights."""
    from safetensors import safe_open

    total = 0
    for file in sorted(f for f in directory.glob("*.safetensors") if f.name != SCALES_FILE):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                total += math.prod(f.get_slice(name).get_shape())
    return total
