"""Which serving engines can load a child, judged by how their Nemotron-NAS / DeciLM readers read it.

One set of rules serves three callers: the verdicts written beside every child (`servability`), the
search of a job with `target.engine` (only the blocks the engine serves are offered, `block_reasons`), and
`puzzle validate`, which stops a job whose parent the engine cannot take at all (`parent_reasons`).

vLLM (`nemotron_nas.py`; every rule run in vLLM's CPU build 0.32 by tests/test_vllm.py, which loads one
child per rule and per family and compares its log-probabilities with transformers): per-layer KV heads
(`n_heads_in_group`), `no_op` attention and FFN, FFN width from `ffn_mult` rounded up to a multiple of 256,
or `intermediate_size` itself where no `ffn_mult` is written (as a child writes an off-grid width), any
`head_dim` and RoPE scaling (Llama's attention and `get_rope`). Refused there: linear attention and a
linear FFN (`n_heads_in_group` / the width are absent), per-head q/k norms (Qwen3: no `k_norm` parameter), a removed attention under a kept FFN
in the first layer that computes (its layer has no residual yet). Wrong output: window attention (attends
over everything) and a q/k/v bias without an o bias (Qwen2: vLLM gives o a bias exactly when q, k and v
have one). vLLM's CPU build adds its own refusals (`cpu_reasons`), given as a verdict of their own.

llama.cpp (its DeciLM conversion and runtime, run on about 30 children through llama-cpp-python 0.3.36):
per-layer KV heads, removed attention, linear attention, FFN width from `ffn_mult` on the 256 grid. What
failed there: a linear FFN (the converter rejects it); off-grid widths (fail to load); an FFN removed under
a kept attention (the layer is skipped whole); window attention (not refused: llama.cpp silently attends
over everything, so the output differs from the window's length on); the first layer's attention removed
(the per-layer head counts no longer line up: `check_tensor_dims`); the last layer with both subblocks
removed (the process aborts while decoding); no softmax attention in any layer (no KV cache can be
allocated); a `head_dim` other than hidden / heads (`invalid n_rot`); per-head q/k norms (Qwen3: the
converter cannot map `k_norm`); linear RoPE scaling (the converter drops the factor); a byte-level BPE
tokenizer other than Llama 3's (the converter takes only that one or a byte-fallback BPE).

Neither reader has an MoE FFN in its DeciLM layout (the `moe` entry is this project's own), and neither
has attention sinks. TensorRT-LLM is not judged: its reader was not checked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from puzzle.blocks.hybrid import hybrid_block_config
from puzzle.blocks.specs import Engine

GRID = 256


# vLLM's CPU build (0.32): the head sizes its attention kernel takes (`CPUAttentionBackend`).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
VLLM_CPU = "vLLM (CPU build)"
# vLLM's DeciLM layer adds a removed attention's FFN to a residual only an earlier layer's attention makes.
VLLM_FIRST_LAYER = ("the first layer's attention removed under a kept FFN (vLLM's DeciLM layer has no residual to "
                    "add the FFN to yet)")


@dataclass(frozen=True)
class EngineVerdict:
    engine: str
    servable: bool
    reasons: list[str]


def _off_grid(ffn: dict) -> bool:
    size = ffn.get("intermediate_size")
    return size is not None and size % GRID != 0


def _softmax(attention: dict) -> bool:
    return not attention.get("no_op") and not attention.get("replace_with_linear")


def block_reasons(engine: Engine, layer: int, layers: int, attention: dict, ffn: dict) -> list[str]:
    """Why `engine` cannot serve this `block_configs` entry as layer `layer` of `layers` (none: it can)."""
    if engine is Engine.transformers:
        return []
    reasons = []
    vllm = engine is Engine.vllm
    if attention.get("replace_with_linear") and vllm:
        reasons.append("linear attention (vLLM ignores replace_with_linear)")
    if attention.get("window_length"):
        reasons.append("window attention (vLLM reads no per-layer window)" if vllm else
                       "window attention (llama.cpp attends over every token instead: wrong from the window's length on)")
    if ffn.get("replace_with_linear"):
        reasons.append(f"linear FFN ({'vLLM ignores replace_with_linear' if vllm else 'not in llama.cpp DeciLM reader'})")
    if ffn.get("moe"):
        reasons.append(f"MoE FFN with {ffn['moe']['num_local_experts']} experts (no MoE FFN in the DeciLM reader)")
    if _off_grid(ffn) and not vllm:  # vLLM reads the width itself where no ffn_mult is written
        reasons.append(f"FFN width {ffn['intermediate_size']} is off the {GRID} grid (ffn_mult cannot express it)")
    if vllm and layer == 0 and attention.get("no_op") and not ffn.get("no_op"):
        reasons.append(VLLM_FIRST_LAYER)
    if not vllm:
        if ffn.get("no_op") and not attention.get("no_op"):
            reasons.append("FFN removed under a kept attention (llama.cpp skips the whole layer)")
        if layer == 0 and not _softmax(attention):
            reasons.append("the first layer without softmax attention (llama.cpp's per-layer head counts no longer "
                           "line up, and a child needs one softmax layer for its KV cache)")
        if layer == layers - 1 and attention.get("no_op") and ffn.get("no_op"):
            reasons.append("the last layer removed whole (llama.cpp aborts while decoding)")
    return reasons


def model_reasons(engine: Engine, config) -> list[str]:
    """Why `engine` cannot serve any child with this model-wide config (a child's `DeciLMConfig`; a parent is
    judged as the child of its own blocks). An MoE FFN is a layer's (`block_reasons`)."""
    if engine is Engine.transformers:
        return []
    reasons = []
    if config.attention_sinks:
        reasons.append("attention sinks (GPT-OSS; no sinks in the DeciLM reader)")
    if engine is Engine.vllm:
        if config.qk_norm:
            reasons.append("per-head q/k norms (Qwen3; vLLM's DeciLM layer is Llama's attention, which has none)")
        if config.attention_bias != config.attention_output_bias:
            reasons.append("a bias on q, k and v but not on o (Qwen2; vLLM's DeciLM reader gives o a bias exactly "
                           "when q, k and v have one)")
    if engine is Engine.llama_cpp:
        heads, hidden = config.num_attention_heads, config.hidden_size
        if config.head_dim * heads != hidden:
            reasons.append(f"head_dim {config.head_dim} is not hidden_size / num_attention_heads = {hidden // heads} "
                           "(llama.cpp: invalid n_rot)")
        if config.qk_norm:
            reasons.append("per-head q/k norms (Qwen3; llama.cpp's DeciLM converter cannot map k_norm)")
        if (config.rope_parameters or {}).get("rope_type") == "linear":
            reasons.append("linear RoPE scaling (llama.cpp's DeciLM converter drops the factor)")
    return reasons


def tokenizer_reasons(engine: Engine, directory: Path) -> list[str]:
    """Why `engine` cannot take the tokenizer saved in `directory` (llama.cpp: its DeciLM converter takes
    Llama 3's byte-level BPE or a byte-fallback BPE, not another byte-level one such as Qwen2's; its Nemotron-H
    converter takes only a BPE whose pre-tokenizer it recognizes by hash)."""
    path = Path(directory) / "tokenizer.json"
    if engine is not Engine.llama_cpp or not path.is_file():
        return []
    config = Path(directory) / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") in ("nemotron_h", "nemotron_h_puzzle"):
        # Run here: it refused the shipped hybrid parent's byte-level BPE and a byte-fallback BPE alike ("BPE
        # pre-tokenizer was not recognized"); a released Nemotron-H tokenizer it knows could not be tried offline.
        return ["a tokenizer llama.cpp's Nemotron-H converter does not recognize (it takes only BPE pre-tokenizers "
                "it knows by hash; none built here passed)"]
    tokenizer = json.loads(path.read_text())
    byte_level = "ByteLevel" in json.dumps(tokenizer.get("pre_tokenizer"))
    llama3 = any(t.get("content") == "<|begin_of_text|>" for t in tokenizer.get("added_tokens", []))
    if tokenizer.get("model", {}).get("type") == "BPE" and byte_level and not llama3:
        return ["a byte-level BPE tokenizer other than Llama 3's (llama.cpp's DeciLM converter: "
                "'Cannot find Llama BPE tokenizer')"]
    return []


# A hybrid child's per-layer words each engine's Nemotron-H Puzzle reader does not take (read in their sources,
# not run): vLLM builds each layer from `get_nemotron_h_config_for_layer` (an attention layer's KV heads and
# `sliding_window` included) but sizes every Mamba layer and its state from the global config, and builds
# every MLP layer as an MLP; llama.cpp's converter reads per-layer expert width and top-k only.
HYBRID_UNREAD = {
    Engine.vllm: {
        "mamba_num_heads": "fewer Mamba heads in one layer (vLLM sizes every Mamba layer and its state from the "
                           "global mamba_num_heads)",
        "replace_with_linear": "a linear MLP layer (vLLM builds every MLP layer as an MLP)",
    },
    Engine.llama_cpp: {
        "sliding_window": "window attention in one layer (llama.cpp attends over every token instead: wrong from "
                          "the window's length on)",
        "replace_with_linear": "a linear MLP layer (llama.cpp builds every MLP layer as an MLP)",
        "mamba_num_heads": "fewer Mamba heads in one layer (llama.cpp's SSM sizes are global)",
        "num_key_value_heads": "fewer KV heads in one layer (llama.cpp's Nemotron-H Puzzle converter reads none)",
        "intermediate_size": "a pruned MLP layer (llama.cpp's Nemotron-H Puzzle converter reads per-layer widths of "
                             "experts only)",
        "n_routed_experts": "fewer experts in one layer (llama.cpp's expert count is global)",
    },
}


# Run here: llama.cpp's Nemotron-H converter leaves the experts of a child's MoE layer unprocessed, as they are
# saved in transformers 5's fused layout (experts.gate_up_proj and experts.down_proj, not one tensor per expert).
HYBRID_MOE_LLAMA_CPP = ("an MoE layer (its experts are saved fused, as transformers 5 holds them; llama.cpp's "
                        "Nemotron-H converter: 'Unprocessed experts')")


def hybrid_reasons(engine: Engine, config, parent_layers: list[int] | None = None) -> list[str]:
    """Why `engine` cannot serve a hybrid (Nemotron-H Puzzle) child of this config. A hybrid child keeps
    only its non-empty layers, so the reasons name the checkpoint's own entries, and with `parent_layers`
    (the parent layer of each entry) the parent's layer that the search's tables show too."""
    unread = HYBRID_UNREAD.get(engine, {})
    where = [f" (parent layer {p})" for p in parent_layers] if parent_layers else [""] * len(config.block_configs)
    reasons = []
    for i, block in enumerate(config.block_configs):
        if engine is Engine.llama_cpp and block["block_type"] == "moe":
            reasons.append(f"block_configs[{i}]{where[i]}: {HYBRID_MOE_LLAMA_CPP}")
        reasons += [f"block_configs[{i}]{where[i]}: {unread[word]}" for word in block if word in unread]
    return reasons


def child_reasons(engine: Engine, config, parent_layers: list[int] | None = None) -> list[str]:
    """Every reason `engine` cannot serve the child of this config; `parent_layers`: see `hybrid_reasons`."""
    if config.model_type == "nemotron_h_puzzle":
        return hybrid_reasons(engine, config, parent_layers)
    blocks = config.block_configs
    reasons = model_reasons(engine, config)
    for i, block in enumerate(blocks):
        reasons += [f"layer {i}: {r}" for r in block_reasons(engine, i, len(blocks), block["attention"], block["ffn"])]
    if engine is Engine.vllm:  # layers removed whole before it: vLLM's first computing layer is a later one
        first = next((i for i, b in enumerate(blocks) if not (b["attention"].get("no_op") and b["ffn"].get("no_op"))), 0)
        if first > 0 and blocks[first]["attention"].get("no_op"):
            reasons.append(f"layer {first}: {VLLM_FIRST_LAYER}")
    if engine is Engine.llama_cpp and not any(_softmax(b["attention"]) for b in blocks):
        reasons.append("no layer keeps softmax attention (llama.cpp cannot allocate a KV cache)")
    return reasons


def cpu_reasons(config) -> list[str]:
    """What vLLM's CPU build refuses beyond vLLM's own rules (run here; vLLM on a GPU was not run)."""
    if config.model_type == "nemotron_h_puzzle":
        reasons = [f"block_configs[{i}]: an MoE layer (vLLM's CPU build runs Nemotron-H's non-gated experts on "
                   "CUDA, XPU and ROCm only)" for i, block in enumerate(config.block_configs)
                   if block["block_type"] == "moe"]
        if not any(block["block_type"] == "attention" for block in config.block_configs):
            reasons.append("no attention layer left (vLLM's CPU build: IndexError while planning the cache)")
        # Measured on the shipped hybrid parent's children without MoE layers, in fp32: |Δ log p| up to 0.026
        # (mean 0.0017, argmax agreement 1.0), against 2e-6 for every dense child; the cause was not isolated.
        return reasons + ["Nemotron-H in vLLM's CPU build computes apart from transformers (log-probabilities up to "
                          "0.03 apart in fp32)"]
    if config.head_dim not in VLLM_CPU_HEAD_SIZES:
        return [f"head_dim {config.head_dim} (vLLM's CPU attention takes head sizes {', '.join(map(str, VLLM_CPU_HEAD_SIZES))})"]
    return []


def servability(config, parent_layers: list[int] | None = None, tokenizer: Path | None = None) -> list[EngineVerdict]:
    """Every engine's verdict on the child of this config; `tokenizer`: the directory of the tokenizer it is
    saved with (the parent's), which llama.cpp's converter judges too."""
    vllm, llama_cpp = (child_reasons(Engine.vllm, config, parent_layers),
                       child_reasons(Engine.llama_cpp, config, parent_layers))
    llama_cpp += tokenizer_reasons(Engine.llama_cpp, tokenizer) if tokenizer is not None else []
    vllm_cpu = vllm + cpu_reasons(config)
    return [
        EngineVerdict("transformers (trust_remote_code)", True, []),
        EngineVerdict("vLLM", not vllm, vllm),
        EngineVerdict(VLLM_CPU, not vllm_cpu, vllm_cpu),
        EngineVerdict("llama.cpp", not llama_cpp, llama_cpp),
    ]


def choice_reasons(engine: Engine, layer: int, layers: int, choice, shape) -> list[str]:
    """`block_reasons` of a typed block (`BlockChoice`) replacing parent layer `shape`."""
    from puzzle.checkpoint import block_config

    if shape.hybrid:
        hybrid = hybrid_block_config(choice, shape, layer)
        unread = HYBRID_UNREAD.get(engine, {})
        return [] if hybrid is None else [unread[word] for word in hybrid if word in unread]
    block = block_config(choice, shape)
    return block_reasons(engine, layer, layers, block["attention"], block["ffn"])


def servable_spaces(engine: Engine, spaces: list, shapes: list) -> tuple[list, list[str]]:
    """The library's layer spaces without the subblocks `engine` serves in no layer, and what was removed
    (the parent's own subblocks always stay). An attention is judged beside the parent's FFN, an FFN beside a
    removed attention (their most lenient partners); what depends on the pair or the layer's place is the
    search's to refuse (`servable_scores`)."""
    from puzzle.blocks.specs import AttentionKind, AttentionSpec, BlockChoice, is_parent

    removed, kept = [], []
    for space, shape in zip(spaces, shapes):
        def fits(spec, partner) -> bool:
            pair = BlockChoice(spec, partner) if isinstance(spec, AttentionSpec) else BlockChoice(partner, spec)
            reasons = choice_reasons(engine, 1, 3, pair, shape)  # a middle layer: no rule of place applies
            if reasons and not is_parent(spec, shape):
                removed.append(f"{spec.id} ({reasons[0]})")
                return False
            return True

        attention = [a for a in space.attention if fits(a, shape.ffn)]
        ffn = [f for f in space.ffn if fits(f, AttentionSpec(AttentionKind.noop))]
        coupled = [c for c in space.coupled if c.attention in attention and c.ffn in ffn]
        kept.append(type(space)(attention, ffn, coupled))
    return kept, list(dict.fromkeys(removed))


def servable_scores(engine: Engine, scores, shapes: list):
    """The scores table's blocks that `engine` serves in their layer; the parent's own block always stays,
    so the parent remains a solution of the search."""
    from puzzle.blocks.specs import BlockChoice, spec_from_id, is_parent

    def keep(row) -> bool:
        shape = shapes[int(row.layer)]
        a, f = spec_from_id(row.attention), spec_from_id(row.ffn)
        if is_parent(a, shape) and is_parent(f, shape):
            return True
        return not choice_reasons(engine, int(row.layer), len(shapes), BlockChoice(a, f, bool(row.coupled)), shape)

    return scores[[keep(r) for r in scores.itertuples()]].reset_index(drop=True)
