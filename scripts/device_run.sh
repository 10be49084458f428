#!/bin/bash
# The prepared CUDA check for a lent GPU machine with no network (run from the repository root there):
# installs the wheels carried in .whl/ (the GPU image lacks pulp, pydantic and transformers>=5.24; PuLP 4 needs
# orloge, which is not there either), then runs,
# each bounded in time: the demo job on CUDA, bench/gpu_check.py (bf16 BLD, planned vs measured memory,
# profile vs roofline, TFLOP/s) and bench/cuda_sharding.py (FSDP2 with NCCL and pinned offload). Logs go to
# $OUT. Prepare the wheels here first (Python 3.12, manylinux x86_64):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl \
#       PuLP==3.3.2 pydantic pydantic_core annotated-types typing-inspection transformers==5.24.0
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
for d in blocks distill search; do ln -sfn ../$d puzzle/$d; done   # the package layout an install would give
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" || exit 1
step() {  # step SECONDS NAME COMMAND...: one bounded check, its log under $OUT, its tail printed
  local limit=$1 name=$2 began=$(date +%s); shift 2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$? $(( $(date +%s) - began )) s"; grep -v "━\|it/s" "$OUT/$name.log" | tail -14
}
step 150 demo python3 -m puzzle run examples/default.yaml --set parent.device=cuda --set run.dir=/tmp/demo --set kd.tokens=131072
step 200 gpu_check python3 bench/gpu_check.py --layers 8 --work /tmp/gc
step 60 cuda_sharding python3 bench/cuda_sharding.py --layers 8 --parent /tmp/gc/parent
