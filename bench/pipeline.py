"""The pipeline's own speed on the embedded default, in one run.

Runs every stage of `puzzle run` from scratch in a fresh run directory and prints the wall time of each,
then runs bench/bld.py (BLD step vs. its FLOP floor and vs. a naive loop) and bench/score.py (prefix
caching vs. the full model per candidate) on that run's library and prints their ratios.

    python bench/pipeline.py [--config examples/default.yaml] [--run-dir runs/bench-pipeline]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from puzzle.config import load_config, read_yaml
from puzzle.pipeline import RUN_ORDER, SPECS, run_stage
from puzzle.preflight import check_inputs

BENCHES = {"bench/bld.py": ("BLD step", "naive/ours"), "bench/score.py": ("speedup",)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("examples/default.yaml"))
    parser.add_argument("--run-dir", type=Path, default=Path("runs/bench-pipeline"))
    args = parser.parse_args()
    started = time.time()
    shutil.rmtree(args.run_dir, ignore_errors=True)
    raw = read_yaml(args.config)
    raw.setdefault("run", {})["dir"] = str(args.run_dir)
    args.run_dir.mkdir(parents=True)
    job_file = args.run_dir / "job.yaml"
    job_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    config = load_config(job_file)
    check_inputs([config])

    times = []
    for stage in RUN_ORDER:
        t0 = time.perf_counter()
        run_stage(stage, config)
        times.append((SPECS[stage].title, time.perf_counter() - t0))
    ratios = []
    for script, keys in BENCHES.items():
        result = subprocess.run([sys.executable, script, "--config", str(job_file)], capture_output=True, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)
        ratios += [f"{script}: {line}" for line in result.stdout.splitlines() if line.startswith(keys)]

    total = sum(t for _, t in times)
    print(f"machine: {os.cpu_count()} CPUs; config {args.config}; run directory {args.run_dir}")
    print(f"{'stage':<34}{'seconds':>10}{'share':>8}")
    for name, seconds in times:
        print(f"{name:<34}{seconds:>10.1f}{seconds / total:>8.0%}")
    print(f"{'all stages':<34}{total:>10.1f}")
    for line in ratios:
        print(line)
    print(f"bench time: {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
