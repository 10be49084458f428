"""The CUDA paths on one GPU, in one table (run by scripts/gpu_check.sh; not part of the test suite).

A random-initialized bf16 parent of the Llama-3.2-1B shape (hidden 2,048, 16 layers, vocabulary 128,256)
goes through:
  1. `puzzle distill` (bf16 BLD) under a run.memory_limit that needs at least two candidate groups: the
     plan's peak and groups against the CUDA allocator's peak;
  2. `puzzle score`: planned against measured peak;
  3. `puzzle profile` measured on this GPU against the roofline of the same GPU: per subblock, measured
     time over roofline time (medians over the subblocks, prefill and decode apart);
  4. one BLD step (a layer's candidates): FLOPs counted by torch's FlopCounterMode (matrix products), time
     by CUDA events, achieved TFLOP/s against the GPU's dense bf16 peak.

    python bench/gpu_check.py                      # about 5 minutes on one H100/H200
    python bench/gpu_check.py --device cpu --layers 1 --vocab-size 2048 --sequence-length 128   # dry run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

import scale  # bench/scale.py: parents from a config, stage processes with their peak memory

from puzzle.config import load_config
from puzzle.memory import GIB
from puzzle.preflight import job_plan
from puzzle.rundir import Stage

ONE_B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
    "tie_word_embeddings": True, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001,
}


def write_job(work: Path, device: str, length: int) -> Path:
    raw = {
        "run": {"dir": str(work / "run"), "memory_limit": "20GiB"},
        "parent": {"path": str(work / "parent"), "dtype": "bfloat16", "device": device},
        "data": {"files": [str(scale.ROOT / "examples/data/shakespeare/*.txt")], "sequence_length": length},
        "library": {"kv_heads": "divisors", "windows": [length // 2], "linear_attention": True, "noop_attention": True,
                    "ffn_fractions": [0.75, 0.5, 0.25], "linear_ffn": True, "noop_ffn": True},
        "bld": {"tokens_per_candidate": 8 * 4 * length, "batch_size": 4, "sequence_length": length, "eval_blocks": 4},
        "scoring": {"validation_blocks": 2, "batch_size": 1},
        "profile": {"device": "local", "weight_dtype": "bfloat16", "prefill_length": 512, "decode_length": 64,
                    "warmup": 2, "repeats": 10},
        "search": {"budgets": {"params": "0.8x"}},
    }
    path = work / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def gpu_name(device: torch.device) -> str | None:
    """This GPU's entry in the sheet (search/hardware.py), if it has one."""
    from puzzle.search.hardware import GPUS

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((key for key in GPUS if key in name.replace(" ", "")), None)


def profile_ratios(config, sheet: str | None) -> tuple[float, float]:
    """Median measured/roofline time over the subblocks, for prefill and decode (nan without a sheet entry)."""
    from puzzle.families import parent_shapes
    from puzzle.parents import parent_config
    from puzzle.search.hardware import gpu
    from puzzle.search.profile import analytic_times, read_profile
    from puzzle.blocks.specs import spec_from_id

    if sheet is None:
        return float("nan"), float("nan")
    shapes = parent_shapes(parent_config(config.parent))
    prefill, decode = [], []
    for row in read_profile(config.run.dir / "profile/profile.csv"):
        if row.layer < 0 or spec_from_id(row.candidate).removed:
            continue
        p, d = analytic_times(spec_from_id(row.candidate), shapes[row.layer], config.profile.scenario, gpu(sheet))
        prefill.append(row.prefill_seconds / p)
        decode.append(row.decode_seconds / d)
    return statistics.median(prefill), statistics.median(decode)


def bld_step_rate(config, steps: int = 5) -> tuple[float, float]:
    """(achieved FLOP/s, seconds per step) of a BLD step over layer 0's candidates."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from puzzle.distill.bld import train_step
    from puzzle.distill.library import bld_candidates
    from puzzle.families import parent_shapes
    from puzzle.parents import load_parent, parent_config
    from puzzle.memory import linear_fit_slots, model_shape, target
    from puzzle.stages.library import group_modules, job_spaces, prepare_bld

    parent = load_parent(config.parent)
    shapes = parent_shapes(parent_config(config.parent))
    candidates = [c for c in bld_candidates(job_spaces(config, shapes), shapes) if c.layer == 0]
    fit_slots = linear_fit_slots(config, model_shape(config, parent_config(config.parent)), candidates, target(config))
    job = prepare_bld(config, parent, candidates, fit_slots)
    modules = group_modules(config, parent, job, candidates)
    optimizer = torch.optim.AdamW([p for p in modules.parameters() if p.requires_grad], lr=1e-5, fused=True)
    x = job.train[: config.bld.batch_size].to(parent.model.device)
    # Counted through the math attention, whose matrix products the counter sees (its formula for the fused
    # kernels rejects grouped-query shapes); the same products the fused kernels compute, timed below.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        train_step(candidates, modules, parent.adapter, x, optimizer)
    device = parent.model.device
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            train_step(candidates, modules, parent.adapter, x, optimizer)
        end.record()
        torch.cuda.synchronize(device)
        seconds = start.elapsed_time(end) / 1000 / steps
    else:
        began = time.perf_counter()
        for _ in range(steps):
            train_step(candidates, modules, parent.adapter, x, optimizer)
        seconds = (time.perf_counter() - began) / steps
    return counter.get_total_flops() / seconds, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--sequence-length", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=ONE_B["vocab_size"])
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="puzzle-gpu-check-"))
    started = time.time()
    scale.build_parent({"config": {**ONE_B, "vocab_size": args.vocab_size}, "layers": args.layers}, work / "parent")
    job = write_job(work, args.device, args.sequence_length)
    config = load_config(job)
    plan = job_plan(config)
    on_gpu = args.device.startswith("cuda")
    rows = []

    def add(name: str, planned: float, measured: float) -> None:  # printed at once: a later check may fail
        rows.append((name, planned, measured))
        print(f"{name}: {planned:.3g} planned or reference, {measured:.3g} measured", flush=True)

    for stage, command in ((Stage.library, "distill"), (Stage.scores, "score"), (Stage.profile, "profile")):
        [measured], seconds = scale.measure(command, job, args.device)
        planned = plan.stage(stage).peak(plan.target) - (plan.target.runtime.bytes if on_gpu else 0)
        add(f"{stage.value}: peak memory, GiB ({seconds:.0f} s)", planned / GIB, measured / GIB)
    from puzzle.rundir import RunDir

    trained = RunDir.of(config).manifest(Stage.library)["outputs"]["groups"]
    add("library: BLD groups, planned and trained (memory_limit 20GiB)", float(plan.stage(Stage.library).groups), float(trained))
    sheet = gpu_name(torch.device(args.device))
    prefill, decode = profile_ratios(config, sheet)
    add(f"profile: measured / roofline ({sheet}), prefill median", 1.0, prefill)
    add(f"profile: measured / roofline ({sheet}), decode median", 1.0, decode)
    from puzzle.search.hardware import gpu

    rate, seconds = bld_step_rate(config)
    peak = gpu(sheet).bf16_tflops * 1e12 if sheet else float("nan")
    add(f"BLD step: TFLOP/s achieved / bf16 peak ({seconds * 1000:.0f} ms a step)", peak / 1e12, rate / 1e12)
    print(f"\n{torch.cuda.get_device_name() if on_gpu else 'cpu'}, torch {torch.__version__}, "
          f"{time.time() - started:.0f} s in all\n")
    print("| check | planned / reference | measured | measured / planned |")
    print("|---|---:|---:|---:|")
    for name, planned, measured in rows:
        print(f"| {name} | {planned:.3g} | {measured:.3g} | {measured / planned:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
