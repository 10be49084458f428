"""Which serving engines can load a child, judged by how their Nemotron-NAS / DeciLM readers read it.

The rules follow each reader's handling of `block_configs` (read in their sources, not run here):
- vLLM (`nemotron_nas.py`): per-layer KV heads (`n_heads_in_group`), `no_op` attention and FFN, FFN
  width from `ffn_mult` rounded up to a multiple of 256. It ignores `replace_with_linear` and
  `window_length`, so it would build the wrong layer for either.
- llama.cpp (DeciLM conversion): per-layer KV heads, removed attention (`n_heads_in_group: null`),
  linear attention (`n_heads_in_group: null, replace_with_linear: true`), FFN width from `ffn_mult`
  on the 256 grid; a layer whose `ffn_mult` is null is skipped whole, attention included; no linear
  FFN and no window attention.
Neither reader has an MoE FFN in its DeciLM layout (the `moe` entry is this project's own), so no
child of an MoE parent, with the same experts in every layer or not, is servable by them as DeciLM.
TensorRT-LLM is not judged: its reader was not checked.
"""

from __future__ import annotations

from dataclasses import dataclass

GRID = 256


@dataclass(frozen=True)
class EngineVerdict:
    engine: str
    servable: bool
    reasons: list[str]


def _off_grid(ffn: dict) -> bool:
    size = ffn.get("intermediate_size")
    return size is not None and size % GRID != 0


def servability(config) -> list[EngineVerdict]:
    vllm, llama_cpp = [], []
    if getattr(config, "attention_sinks", False):
        reason = "attention sinks (GPT-OSS; no sinks in the DeciLM reader)"
        vllm.append(reason)
        llama_cpp.append(reason)
    for i, block in enumerate(config.block_configs):
        a, f = block["attention"], block["ffn"]
        if a.get("replace_with_linear"):
            vllm.append(f"layer {i}: linear attention (vLLM ignores replace_with_linear)")
        if a.get("window_length"):
            vllm.append(f"layer {i}: window attention (vLLM reads no per-layer window)")
            llama_cpp.append(f"layer {i}: window attention (not in llama.cpp's DeciLM reader)")
        if f.get("replace_with_linear"):
            vllm.append(f"layer {i}: linear FFN (vLLM ignores replace_with_linear)")
            llama_cpp.append(f"layer {i}: linear FFN (not in llama.cpp's DeciLM reader)")
        if f.get("no_op") and not a.get("no_op"):
            llama_cpp.append(f"layer {i}: FFN removed under a kept attention (llama.cpp skips the whole layer)")
        if f.get("moe"):
            reason = (f"layer {i}: MoE FFN with {f['moe']['num_local_experts']} experts (no MoE FFN in the "
                      "DeciLM reader)")
            vllm.append(reason)
            llama_cpp.append(reason)
        if _off_grid(f):
            size = f["intermediate_size"]
            reason = f"layer {i}: FFN width {size} is off the {GRID} grid (ffn_mult cannot express it)"
            vllm.append(reason)
            llama_cpp.append(reason)
    return [
        EngineVerdict("transformers (trust_remote_code)", True, []),
        EngineVerdict("vLLM", not vllm, vllm),
        EngineVerdict("llama.cpp", not llama_cpp, llama_cpp),
    ]
