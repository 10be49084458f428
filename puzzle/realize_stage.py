"""`puzzle realize`: assemble a chosen architecture from the library and save it as a Hugging Face checkpoint.

The checkpoint follows the Nemotron-NAS / DeciLM layout (`model_type: nemotron-nas`, per-layer
`block_configs`) with weight names of the parent (`model.layers.N.…`), and ships the project's own
self-contained modeling file (`modeling_puzzle.py`, torch and transformers only) through `auto_map`.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import puzzle.blocks.modeling_puzzle as modeling
from puzzle.blocks.errors import PuzzleError
from puzzle.blocks.io import atomic_dir
from puzzle.blocks.specs import AttentionKind, AttentionSpec, FfnKind, FfnSpec, ParentShape, spec_from_id
from puzzle.distill.library import Library
from puzzle.config import PuzzleConfig
from puzzle.engines import EngineVerdict, servability
from puzzle.families import parent_shapes
from puzzle.parents import load_parent
from puzzle.rundir import RunDir, Stage, fingerprint

@dataclass(frozen=True)
class LayerChoice:
    attention: AttentionSpec
    ffn: FfnSpec
    coupled: bool


def parse_block(name: str) -> LayerChoice:
    coupled = name.endswith(" (coupled)")
    attention, ffn = name.removesuffix(" (coupled)").split("+")
    return LayerChoice(spec_from_id(attention), spec_from_id(ffn), coupled)


def ffn_mult(intermediate_size: int, hidden_size: int) -> float:
    """The DeciLM multiplier whose engine formula, round_up(int(2·m·hidden/3), 256), gives this size back."""
    return round(3 * intermediate_size / (2 * hidden_size), 6)


def block_config(choice: LayerChoice, shape: ParentShape) -> dict:
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
    elif f.kind is FfnKind.moe:
        ffn = {"no_op": False, "replace_with_linear": False, "ffn_mult": None, "moe": {
            "num_local_experts": f.num_experts, "num_experts_per_tok": f.experts_per_token,
            "intermediate_size": shape.intermediate_size, "norm_topk_prob": shape.normalize_expert_weights,
            "bias": shape.expert_bias, "swiglu_limit": shape.swiglu_limit, "swiglu_alpha": shape.swiglu_alpha,
        }}
    else:
        ffn = {"no_op": f.removed, "replace_with_linear": f.linear, "ffn_mult": None}
    return {"attention": attention, "ffn": ffn}


def child_config(parent_config, choices: list[LayerChoice]) -> modeling.DeciLMConfig:
    p = parent_config
    shapes = parent_shapes(p)
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
    config.architectures = ["DeciLMForCausalLM"]
    config.auto_map = {
        "AutoConfig": "modeling_puzzle.DeciLMConfig",
        "AutoModelForCausalLM": "modeling_puzzle.DeciLMForCausalLM",
    }
    return config


def child_state_dict(parent, library: Library, choices: list[LayerChoice]) -> dict[str, torch.Tensor]:
    """Parent's embeddings, final norm and head; each layer's subblocks from the library, under the parent's names."""
    state = {
        "model.embed_tokens.weight": parent.model.model.embed_tokens.weight,
        "model.norm.weight": parent.model.model.norm.weight,
        "lm_head.weight": parent.model.lm_head.weight,
    }
    for i, c in enumerate(choices):
        if c.coupled:
            attention, ffn = library.pair(i, c.attention, c.ffn)
        else:
            attention, ffn = library.module(i, c.attention), library.module(i, c.ffn)
        for name, value in attention.state_dict().items():
            key = f"model.layers.{i}.input_layernorm.weight" if name == "input_layernorm.weight" else f"model.layers.{i}.self_attn.{name}"
            state[key] = value
        for name, value in ffn.state_dict().items():
            key = (f"model.layers.{i}.post_attention_layernorm.weight" if name == "post_attention_layernorm.weight"
                   else f"model.layers.{i}.mlp.{name}")
            state[key] = value
    return state


def build_child(parent, library: Library, choices: list[LayerChoice]) -> modeling.DeciLMForCausalLM:
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


def write_checkpoint(directory: Path, model: modeling.DeciLMForCausalLM, parent, info: dict) -> None:
    """A child checkpoint, whole or not at all: weights, config, tokenizer, generation config, modeling file."""
    with atomic_dir(directory) as tmp:
        model.save_pretrained(tmp)
        parent.tokenizer.save_pretrained(tmp)
        if parent.model.generation_config is not None:
            parent.model.generation_config.save_pretrained(tmp)
        shutil.copyfile(modeling.__file__, tmp / "modeling_puzzle.py")
        (tmp / "puzzle_child.json").write_text(json.dumps(info, indent=2) + "\n")


def load_child(directory: Path, dtype: torch.dtype | None = None, device="cpu") -> modeling.DeciLMForCausalLM:
    """A child checkpoint through the project's own modeling code (no remote code is run)."""
    if not (directory / "config.json").is_file():
        raise PuzzleError(f"{directory} is not a child checkpoint (no config.json)")
    model = modeling.DeciLMForCausalLM.from_pretrained(directory, dtype=dtype)
    return model.to(device).eval()


def checkpoint_parameters(directory: Path) -> int:
    """Parameter count from the safetensors headers, without loading the weights."""
    from safetensors import safe_open

    total = 0
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                total += math.prod(f.get_slice(name).get_shape())
    return total


def parent_parameters(config: PuzzleConfig) -> int:
    local = Path(config.parent.path)
    if local.is_dir():
        return checkpoint_parameters(local)
    return sum(p.numel() for p in load_parent(config.parent).model.parameters())


@dataclass(frozen=True)
class RealizeSummary:
    directory: Path
    choices: list[LayerChoice]
    parameters: int
    parent_parameters: int
    engines: list[EngineVerdict]
    seconds: float


def _summary(directory: Path, parent_parameters: int, seconds: float) -> RealizeSummary:
    info = json.loads((directory / "puzzle_child.json").read_text())
    choices = [LayerChoice(spec_from_id(x["attention"]), spec_from_id(x["ffn"]), x["coupled"]) for x in info["layers"]]
    engines = [EngineVerdict(**e) for e in info["engines"]]
    return RealizeSummary(directory, choices, checkpoint_parameters(directory), parent_parameters, engines, seconds)


def realize_stage(config: PuzzleConfig, solution: int | None = None) -> RealizeSummary:
    started = time.time()
    run = RunDir.of(config)
    index = config.realize.solution if solution is None else solution
    solutions_file = run.stage_dir(Stage.search) / "solutions.json"
    if not solutions_file.is_file():
        raise PuzzleError(f"{solutions_file} does not exist; run `puzzle search --budget …` first")
    found = json.loads(solutions_file.read_text())["solutions"]
    if not 0 <= index < len(found):
        raise PuzzleError(f"solution {index} does not exist: the search found {len(found)} (indices 0..{len(found) - 1})")
    choices = [parse_block(layer["block"]) for layer in found[index]["layers"]]
    # The solution's content, not the file's time: an identical re-search leaves the child (and KD) valid.
    key = fingerprint(config, ("parent", "library")) + f"-{run.done_fingerprint(Stage.library)}-" + hashlib.sha256(
        json.dumps(found[index]["layers"]).encode()).hexdigest()[:16]
    directory = run.stage_dir(Stage.child) / "checkpoint"
    if run.is_done(Stage.child, key) and directory.is_dir():
        return _summary(directory, parent_parameters(config), time.time() - started)
    with run.stage(Stage.child, key) as record:
        parent = load_parent(config.parent)
        library = Library(run.stage_dir(Stage.library), parent.adapter)
        child = build_child(parent, library, choices)
        engines = servability(child.config)
        write_checkpoint(directory, child, parent, {
            "solution": index,
            "layers": [{"attention": c.attention.id, "ffn": c.ffn.id, "coupled": c.coupled} for c in choices],
            "engines": [e.__dict__ for e in engines],
        })
        record.outputs = {"checkpoint": "checkpoint", "solution": index}
    return _summary(directory, sum(p.numel() for p in parent.model.parameters()), time.time() - started)
