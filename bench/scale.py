"""Real shapes, random weights: the memory plan's peak per stage against the peak each stage measures.

Two parents are built from a config (nothing is downloaded) and saved in bf16: the Qwen2.5-0.5B shape
(hidden 896, vocab 151,936, tied embeddings) cut to 4 layers, and the Llama-3.1-8B shape (hidden 4,096,
vocab 128,256) cut to 2 layers. Each goes through `puzzle distill`, `score`, `profile` (analytic, h100)
and `search`, each stage its own process, on the shipped sonnets with small token counts. The 8B shape
runs under run.memory_limit 6GiB, so that its BLD needs several candidate groups. Then the 8B shape's BLD
and scoring run again over 2 processes as a pipeline of layer shares (run.parent_placement: layers), each
rank's plan against its own peak; then its child is realized (streamed a layer at a time) and evaluated
over 2 processes with the parent and the child sharded by FSDP2.

Measured: each stage process's peak resident set (VmHWM) here; on a GPU (--device cuda) the CUDA allocator's peak,
against the plan without its runtime term (the CUDA context is outside the allocator).

    python bench/scale.py                 # both shapes, one and two processes: about 10 minutes on 2 CPU cores
    python bench/scale.py --shapes qwen2.5-0.5b
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from puzzle.config import load_config  # noqa: E402
from puzzle.memory import GIB  # noqa: E402
from puzzle.preflight import job_plan  # noqa: E402
from puzzle.rundir import Stage  # noqa: E402

SONNETS = ROOT / "examples/data/shakespeare/sonnets.txt"
QWEN = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "use_sliding_window": False,
    "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151643,
}
SHAPES = {
    "qwen2.5-0.5b": {
        "config": QWEN, "layers": 4, "memory_limit": None,
        "library": {"kv_heads": "divisors", "windows": [32], "ffn_fractions": [0.5, 0.25]},
    },
    "llama-3.1-8b": {
        "config": json.loads((ROOT / "examples/shapes/llama-3.1-8b/config.json").read_text()), "layers": 2,
        "memory_limit": "6GiB",
        "library": {"kv_heads": [1], "windows": [], "ffn_fractions": [0.5]},
    },
}
STAGES = [(Stage.library, "distill"), (Stage.scores, "score"), (Stage.profile, "profile"), (Stage.search, "search")]


def build_parent(shape: dict, directory: Path) -> None:
    """A random-initialized bf16 parent of the shape, with a small tokenizer (its ids sit inside the vocabulary)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from puzzle.tokenizer import build_tokenizer

    if (directory / "config.json").is_file():
        return
    raw = {k: v for k, v in shape["config"].items() if k not in ("architectures", "torch_dtype")}
    config = AutoConfig.for_model(**{**raw, "num_hidden_layers": shape["layers"]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tokenizer = build_tokenizer([SONNETS.read_text()], vocab_size=512)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def write_job(name: str, shape: dict, work: Path, device: str, placement: str = "replicated") -> Path:
    run: dict = {"dir": str(work / name / "run"), "parent_placement": placement}
    if shape["memory_limit"]:
        run["memory_limit"] = shape["memory_limit"]
    raw = {
        "run": run,
        "parent": {"path": str(work / name / "parent"), "dtype": "bfloat16", "device": device},
        "data": {"files": [str(SONNETS)], "sequence_length": 64, "calibration_blocks": 2},
        "library": {**shape["library"], "linear_attention": True, "noop_attention": True, "linear_ffn": True,
                    "noop_ffn": True},
        "bld": {"tokens_per_candidate": 128, "batch_size": 1, "sequence_length": 64, "eval_blocks": 1},
        "scoring": {"validation_blocks": 1, "batch_size": 1},
        "profile": {"device": "h100", "weight_dtype": "bfloat16", "prefill_length": 512, "decode_length": 128},
        "search": {"budgets": {"params": "0.8x"}},
        "eval": {"validation_blocks": 1, "batch_size": 1},
    }
    path = work / name / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def measure(command: str, job: Path, device: str, processes: int = 1) -> tuple[list[float], float]:
    """(peak bytes of each rank, seconds) of `puzzle COMMAND JOB` in its own process(es)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "peak"
        env = {**os.environ, "PUZZLE_PEAK_MEMORY_FILE": str(report), "PUZZLE_LOG_SECONDS": "30"}
        started = time.time()
        spread = ["--num-processes", str(processes)] if processes > 1 else []
        done = subprocess.run([sys.executable, "-m", "puzzle", command, str(job), *spread], env=env, cwd=ROOT,
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"puzzle {command} failed:\n{done.stderr[-3000:]}")
        names = ["main"] if processes == 1 else [f"rank{r}" for r in range(processes)]
        peaks = [json.loads(Path(f"{report}.{name}").read_text()) for name in names]
    return [float(p["cuda"] if device.startswith("cuda") else p["rss"]) for p in peaks], time.time() - started


def sharded_rows(work: Path, device: str, processes: int = 2) -> list[tuple]:
    """The Llama-3.1-8B shape's BLD and scoring as a pipeline of layer shares over `processes` processes: each
    rank's planned peak against its own measured peak."""
    from puzzle.distill.library import bld_candidates
    from puzzle.distributed import layer_shares
    from puzzle.memory import bld_groups, model_shape, scores_plan, target
    from puzzle.parents import parent_config
    from puzzle.stages.library import job_spaces

    shape = {**SHAPES["llama-3.1-8b"], "memory_limit": None}
    name = "llama-3.1-8b"
    shutil.rmtree(work / name / "run", ignore_errors=True)
    job = write_job(name, shape, work, device, placement="layers")
    config = load_config(job)
    model = model_shape(config, parent_config(config.parent))
    tgt = target(config, processes=processes)
    shapes = list(model.shapes)
    candidates = bld_candidates(job_spaces(config, shapes), shapes)
    shares = layer_shares(len(shapes), processes)
    planned = {
        Stage.library: [bld_groups(config, model, [c for c in candidates if c.layer in s], tgt, 1, s)[1] for s in shares],
        Stage.scores: [scores_plan(config, model, tgt, s) for s in shares],
    }
    rows = []
    print(f"{name}, {processes} processes, parent_placement layers:", flush=True)
    for stage, command in STAGES[:2]:
        measured, seconds = measure(command, job, device, processes)
        for rank, (plan, peak) in enumerate(zip(planned[stage], measured)):
            expected = plan.peak(tgt) - (tgt.runtime.bytes if device.startswith("cuda") else 0)
            rows.append((f"{name} rank {rank}/{processes}", stage.value, expected, peak, seconds, plan.groups))
            print(f"  {stage.value:8s} rank {rank} planned {expected / GIB:6.2f} GiB  measured {peak / GIB:6.2f} GiB  "
                  f"ratio {peak / expected:5.2f}  ({seconds:.0f} s)", flush=True)
    return rows + child_rows(job, name, device, processes)


def child_rows(job: Path, name: str, device: str, processes: int) -> list[tuple]:
    """Realize (streamed a layer at a time, one process) and eval with the parent and the child sharded by FSDP2
    over `processes` processes, each rank against its plan (for the child the search chose)."""
    for command in ("profile", "search"):
        measure(command, job, device)
    rows = []
    for stage, command, n in ((Stage.child, "realize", 1), (Stage.eval, "eval", processes)):
        plan = job_plan(load_config(job), processes=n)
        expected = plan.stage(stage).peak(plan.target) - (plan.target.runtime.bytes if device.startswith("cuda") else 0)
        measured, seconds = measure(command, job, device, n)
        for rank, peak in enumerate(measured):
            rows.append((f"{name} rank {rank}/{n}", stage.value, expected, peak, seconds, None))
            print(f"  {stage.value:8s} rank {rank} planned {expected / GIB:6.2f} GiB  measured {peak / GIB:6.2f} GiB  "
                  f"ratio {peak / expected:5.2f}  ({seconds:.0f} s)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--work", type=Path, default=None, help="where parents and runs go (default: a temporary folder)")
    parser.add_argument("--device", default="cpu", help="parent.device: cpu, or cuda on a GPU machine")
    parser.add_argument("--sharded-only", action="store_true",
                        help="only the 2-process cases: the BLD and scoring pipeline, realize, the sharded eval")
    parser.add_argument("--build", nargs=2, metavar=("SHAPE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        build_parent(SHAPES[args.build[0]], Path(args.build[1]))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="puzzle-scale-"))
    rows = []
    for name in [] if args.sharded_only else args.shapes:
        shape = SHAPES[name]
        started = time.time()
        # In a process of its own: the parent's memory must not stay in this one, whose children the bench times.
        subprocess.run([sys.executable, __file__, "--build", name, str(work / name / "parent")], check=True)
        shutil.rmtree(work / name / "run", ignore_errors=True)  # every stage measured as it runs, none reused
        job = write_job(name, shape, work, args.device)
        print(f"{name}: parent built in {time.time() - started:.0f} s at {work / name}", flush=True)
        plan = job_plan(load_config(job))
        on_gpu = args.device.startswith("cuda")
        for stage, command in STAGES:
            planned = plan.stage(stage).peak(plan.target) - (plan.target.runtime.bytes if on_gpu else 0)
            [measured], seconds = measure(command, job, args.device)
            groups = plan.stage(stage).groups
            rows.append((name, stage.value, planned, measured, seconds, groups))
            print(f"  {stage.value:8s} planned {planned / GIB:6.2f} GiB  measured {measured / GIB:6.2f} GiB  "
                  f"ratio {measured / planned:5.2f}  ({seconds:.0f} s)", flush=True)
    if "llama-3.1-8b" in args.shapes:
        subprocess.run([sys.executable, __file__, "--build", "llama-3.1-8b", str(work / "llama-3.1-8b" / "parent")],
                       check=True)
        rows += sharded_rows(work, args.device)
    what = "CUDA allocator peak" if args.device.startswith("cuda") else "peak resident set"
    print(f"\n| shape | stage | planned GiB | measured GiB ({what}) | measured / planned | BLD groups | seconds |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, stage, planned, measured, seconds, groups in rows:
        print(f"| {name} | {stage} | {planned / GIB:.2f} | {measured / GIB:.2f} | {measured / planned:.2f} | "
              f"{groups or ''} | {seconds:.0f} |")
    worst = max(abs(measured / planned - 1) for _, _, planned, measured, _, _ in rows)
    print(f"\nlargest miss: {worst:.0%} (target: within 20%)")


if __name__ == "__main__":
    main()
