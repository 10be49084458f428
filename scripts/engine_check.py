"""Every verdict rule of an engine against the engine itself: one child per rule and per family, realized with
random weights (seeded), run by the engine, its output compared with this project's modeling code on the same
token ids. Prints verdict against reality, one row per child.

    python scripts/engine_check.py --engine vllm
    python scripts/engine_check.py --engine llama.cpp --converter PATH/convert_hf_to_gguf.py

The test suite runs the same children (tests/test_vllm.py, tests/test_llama_cpp.py); this prints the table.

vLLM (its CPU build, installed by the test extra): a child "works" when vLLM's log-probabilities of the text
are within 1e-4 of transformers' and its argmax agrees everywhere; the verdict compared is "vLLM (CPU build)".

llama.cpp: llama-cpp-python with a libllama and llama.cpp's converter of the same source, as
scripts/build_llama_cpp.sh (run by `make test`) leaves them in .venv: --converter
.venv/llama.cpp/src/convert_hf_to_gguf.py.

A child "works" when its logits agree with transformers to a relative error of 1e-2 (random weights make
near-ties, so an argmax may flip at an error of 1e-4; the agreement is printed beside it); the runtime runs in a process of its own, so a child that aborts llama.cpp is a row too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from puzzle.blocks.modeling_puzzle import DeciLMForCausalLM  # noqa: E402
from puzzle.blocks.specs import BlockChoice  # noqa: E402
from puzzle.checkpoint import child_config, write_child  # noqa: E402
from puzzle.engines import Engine, child_reasons, tokenizer_reasons  # noqa: E402
from puzzle.tokenizer import build_tokenizer  # noqa: E402

TEXT = (ROOT / "examples/data/shakespeare/sonnets.txt").read_text()
KEPT, LINEAR, REMOVED = "attention.kv2", "attention.linear", "attention.noop"
WIDE, NARROW = "ffn.i512", "ffn.i256"
# One child per rule (a llama parent of 4 layers, hidden 128, FFN 512: every width below is on the grid).
CASES = {
    "parent's own blocks": [f"{KEPT}+{WIDE}"] * 4,
    "KV heads and widths pruned": [f"{KEPT}+{WIDE}", f"attention.kv1+{NARROW}", f"{KEPT}+{NARROW}", f"attention.kv1+{WIDE}"],
    "attention removed (middle)": [f"{KEPT}+{WIDE}", f"{REMOVED}+{WIDE}", f"{KEPT}+{WIDE}", f"{KEPT}+{WIDE}"],
    "linear attention (middle)": [f"{KEPT}+{WIDE}", f"{LINEAR}+{WIDE}", f"{KEPT}+{WIDE}", f"{KEPT}+{WIDE}"],
    "layer removed whole (middle)": [f"{KEPT}+{WIDE}", f"{REMOVED}+ffn.noop", f"{KEPT}+{WIDE}", f"{KEPT}+{WIDE}"],
    "window attention": [f"{KEPT}+{WIDE}", f"{KEPT}.window8+{WIDE}", f"{KEPT}+{WIDE}", f"{KEPT}+{WIDE}"],
    "linear FFN": [f"{KEPT}+{WIDE}", f"{KEPT}+ffn.linear", f"{KEPT}+{WIDE}", f"{KEPT}+{WIDE}"],
    "FFN off the grid": [f"{KEPT}+{WIDE}", f"{KEPT}+ffn.i200", f"{KEPT}+{WIDE}", f"{KEPT}+{WIDE}"],
    "FFN removed under kept attention": [f"{KEPT}+{WIDE}", f"{KEPT}+ffn.noop", f"{KEPT}+{WIDE}", f"{KEPT}+{WIDE}"],
    "first layer's attention removed": [f"{REMOVED}+{WIDE}", f"{KEPT}+{WIDE}", f"{KEPT}+{WIDE}", f"{KEPT}+{WIDE}"],
    "last layer removed whole": [f"{KEPT}+{WIDE}", f"{KEPT}+{WIDE}", f"{KEPT}+{WIDE}", f"{REMOVED}+ffn.noop"],
    "no softmax layer": [f"{LINEAR}+{WIDE}", f"{LINEAR}+{WIDE}", f"{REMOVED}+{WIDE}", f"{LINEAR}+{WIDE}"],
}
# Families and parent settings that the rules judge model-wide (each with the parent's own blocks).
FAMILIES = {
    "qwen2 (byte-level BPE)": ("qwen2", {}, "byte-level"),
    "qwen3 (q/k norms)": ("qwen3", {"head_dim": 32}, "byte-fallback"),
    "llama, head_dim 64 ≠ 128/4": ("llama", {"head_dim": 64}, "byte-fallback"),
    "llama, linear RoPE scaling": ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
                                   "byte-fallback"),
}



def children(cases: dict = CASES, families: dict = FAMILIES) -> list[tuple]:
    """(name, family, parent settings, tokenizer kind, blocks) of every child: each case on a Llama parent, then
    each family with its parent's own blocks."""
    return ([(name, "llama", {}, "byte-fallback", blocks) for name, blocks in cases.items()]
            + [(name, family, extra, kind, CASES["parent's own blocks"]) for name, (family, extra, kind) in families.items()])


RUNTIME = """
import json, sys
import numpy as np
from llama_cpp import Llama
path, tokens, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
llm = Llama(model_path=path, n_ctx=len(tokens) + 16, logits_all=True, verbose=False, n_threads=2)
llm.eval(tokens)
np.save(out, np.array(llm.scores[: len(tokens)], dtype=np.float32))
llm.reset()
for t in tokens[:8]:
    llm.eval([t])  # decoding a token at a time: where a removed last layer aborts
"""


def tokenizer(kind: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "byte-fallback":
        return build_tokenizer([TEXT], vocab_size=512)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def parent_config(family: str, extra: dict, vocab: int):
    from transformers import AutoConfig

    fields = dict(vocab_size=vocab, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
    return AutoConfig.for_model(family, **{**fields, **extra})


def realize(directory: Path, hf_config, blocks: list[str], tok) -> tuple:
    config = child_config(hf_config, [BlockChoice.from_id(b) for b in blocks])
    torch.manual_seed(0)
    model = DeciLMForCausalLM(config).eval()
    for p in model.parameters():  # weights large enough that a wrong layer shows in the logits
        torch.nn.init.normal_(p, std=0.05) if p.dim() > 1 else None
    write_child(directory, config, model.state_dict().items(), dtype=torch.float32, tokenizer=tok,
                generation_config=None, info={"layers": []})
    return config, model


def reality(directory: Path, model, converter: Path, tokens: list[int]) -> str:
    import numpy as np

    gguf = directory.with_suffix(".gguf")
    done = subprocess.run([sys.executable, str(converter), str(directory), "--outfile", str(gguf), "--outtype", "f32"],
                          capture_output=True, text=True)
    if done.returncode:
        return "converter refused: " + (done.stderr.strip().splitlines() or ["?"])[-1][:90]
    out = directory.with_suffix(".npy")
    run = subprocess.run([sys.executable, "-c", RUNTIME, str(gguf), json.dumps(tokens), str(out)],
                         capture_output=True, text=True)
    if run.returncode:
        last = (run.stderr.strip().splitlines() or ["?"])[-1][:90]
        return f"runtime failed (exit {run.returncode}): {last}"
    with torch.no_grad():
        reference = model(torch.tensor([tokens])).logits[0].float()
    logits = torch.from_numpy(np.load(out))
    error = ((logits - reference).norm() / reference.norm()).item()
    agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    verdict = "works" if error <= 1e-2 else "wrong output"
    return f"{verdict} (rel. error {error:.1e}, argmax agreement {agreement:.2f})"


def vllm_reality(children: list[tuple], tokens: list[int], work: Path) -> list[str]:
    """What vLLM does with each (name, directory, model): works, wrong output, or its refusal."""
    from puzzle.vllm_engine import VllmModel, agreement, run_in_vllm

    results = run_in_vllm([VllmModel(name, directory, trust_remote_code=True) for name, directory, _ in children], tokens, work=work)
    seen = []
    for (_, _, model), result in zip(children, results):
        if result.error:
            seen.append(f"refused: {result.error[:90]}")
            continue
        with torch.no_grad():
            check = agreement(result, model(torch.tensor([tokens])).logits[0].float(), tokens)
        verdict = "works" if check.matches else "wrong output"
        seen.append(f"{verdict} (max |Δ log p| {check.max_logprob_error:.1e}, argmax agreement {check.argmax_agreement:.2f})")
    return seen


def main() -> None:
    from puzzle.engines import VLLM_CPU, servability

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["vllm", "llama.cpp"], default="llama.cpp")
    parser.add_argument("--converter", type=Path, default=None, help="llama.cpp's convert_hf_to_gguf.py")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    if args.engine == "llama.cpp" and args.converter is None:
        parser.error("--engine llama.cpp needs --converter")
    work = args.work or Path(tempfile.mkdtemp(prefix="puzzle-engine-check-"))
    rows, built = [], []
    runs = children()
    tokens_by_kind = {}
    for i, (name, family, extra, kind, blocks) in enumerate(runs):
        tok = tokenizer(kind)
        tokens_by_kind.setdefault(kind, tok(TEXT[:2000])["input_ids"][:96])
        directory = work / f"child{i}"
        config, model = realize(directory, parent_config(family, extra, len(tok)), blocks, tok)
        if args.engine == "vllm":
            [cpu] = [v for v in servability(config) if v.engine == VLLM_CPU]
            reasons = cpu.reasons
        else:
            reasons = child_reasons(Engine.llama_cpp, config) + tokenizer_reasons(Engine.llama_cpp, directory)
        built.append((name, kind, directory, model, reasons))
    seen = {}
    if args.engine == "vllm":
        for kind, tokens in tokens_by_kind.items():
            mine = [(n, d, m) for n, k, d, m, _ in built if k == kind]
            seen.update(zip([n for n, _, _ in mine], vllm_reality(mine, tokens, work / f"vllm-{kind}")))
    for name, kind, directory, model, reasons in built:
        more = f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else ""
        verdict = "servable" if not reasons else f"not servable: {reasons[-1][:80]}{more}"
        if name not in seen:
            seen[name] = reality(directory, model, args.converter, tokens_by_kind[kind])
        match = (not reasons) == seen[name].startswith("works")
        rows.append((name, verdict, seen[name], "yes" if match else "NO"))
        print(f"{name}: {verdict} | {seen[name]}", flush=True)
    print(f"\n| child | verdict | {args.engine} | verdict right |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n{sum(r[3] == 'yes' for r in rows)} of {len(rows)} verdicts right")


if __name__ == "__main__":
    main()
