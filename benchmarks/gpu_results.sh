#!/usr/bin/env bash
# Everything issue 8 measures on a GPU, in one run that fits a short device lease (~9 minutes on an
# H100/H200; each step has its own time limit and a failed step does not stop the others):
#
#   1. the kernel tests, compiled for the GPU (tests/test_kernels.py, not slow), and the vLLM plugin's decode
#      batch read by the fused kernel (tests/test_vllm_paged.py -k fused_kernel: its stores on the GPU, no vLLM);
#   2. benchmarks/kernel_bench.py: fused decode attention vs no-magnitude kernel, restore-then-SDPA and
#      SDPA on the full cache, Llama-2-7B and Llama-3-8B shapes, bf16; then the same with the store
#      packed to 4 bits (--kv-bits 4); benchmarks/lowbit_kernel_bench.py: the kernel over issue 18's
#      packings of an unmerged layer (3-bit, rotated, sinks, mixed widths, pre-RoPE keys) vs 4-bit KIVI;
#   3. minicache-bench on a random-weight Llama-2-7B (bf16): full cache (SDPA) vs paper preset vs
#      paper preset + 4-bit, fused kernels on, 1,024 and 4,064 tokens (4,064 + 32 decoded tokens fit
#      Llama-2's 4,096 positions), and the largest batch whose KV fits a 40 GiB budget.
#
# Writes JSON, logs and a versions file under $OUT (default benchmarks/results/gpu/). The device
# machine has no internet: carry .device-wheels (bash scripts/device_wheels.sh, here) for a device
# whose transformers is older than we require.
#
#   bash benchmarks/gpu_results.sh                   # on the GPU machine
#   SMOKE=1 bash benchmarks/gpu_results.sh           # tiny shapes on CPU: checks this script's logic
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
[[ -x $PY ]] || PY=python
export PYTHONPATH=.
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
SMOKE=${SMOKE:-0}

step() {  # name, time limit (s), command...
  local name=$1 limit=$2; shift 2
  echo "== [$name] $* (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0))s; last lines:"
  tail -n 25 "$OUT/$name.log" | sed 's/^/   /'
}

# The device's Python may carry an older transformers than we require (the H200 had 5.17, which
# ignores `cache=`): install ours from wheels carried along (scripts/device_wheels.sh) into a venv over
# the device's packages, so torch and triton stay the device's. Without the wheels, say so and go on.
if ! "$PY" -c "import sys, transformers as t; v = tuple(int(x) for x in t.__version__.split('.')[:2]); sys.exit(v < (5, 24))"; then
  if [[ -d .device-wheels ]]; then
    echo "== transformers older than 5.24: installing .device-wheels into a venv over the device's packages"
    "$PY" -m venv --system-site-packages /tmp/minicache-device-venv \
      && /tmp/minicache-device-venv/bin/pip install -q --no-index --find-links .device-wheels transformers \
      && /tmp/minicache-device-venv/bin/python -c "import transformers, torch; print('now transformers', transformers.__version__)" \
      && PY=/tmp/minicache-device-venv/bin/python
  else
    echo "!! transformers older than 5.24 and no .device-wheels (bash scripts/device_wheels.sh, then carry it)"
  fi
fi

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton missing"
  git rev-parse HEAD 2>/dev/null || true
} >"$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"

if [[ $SMOKE == 1 ]]; then
  export TRITON_INTERPRET=1
  step kernel-tests 600 "$PY" -m pytest -q -x tests/test_kernels.py -k "packed and float32"
  step vllm-fused 300 "$PY" -m pytest -q tests/test_vllm_paged.py -k fused_kernel
  step kernels-bf16 300 "$PY" benchmarks/kernel_bench.py --reduced --out "$OUT/kernels.json"
  step kernels-4bit 300 "$PY" benchmarks/kernel_bench.py --reduced --kv-bits 4 --out "$OUT/kernels-4bit.json"
  step lowbit-kernels 300 "$PY" benchmarks/lowbit_kernel_bench.py --reduced --out "$OUT/lowbit-kernels.json"
  bench=(--model-shape tiny --context-lengths 64 --batch-sizes 1,2 --decode-tokens 4 --repeats 1 --warmup 0
         --kv-budget-mib 1 --kv-group-size 16 --kv-residual-length 16)
else
  step kernel-tests 240 "$PY" -m pytest -q -x tests/test_kernels.py -m "not slow"
  step vllm-fused 90 "$PY" -m pytest -q tests/test_vllm_paged.py -k fused_kernel
  step kernels-bf16 150 "$PY" benchmarks/kernel_bench.py --out "$OUT/kernels.json"
  step kernels-4bit 150 "$PY" benchmarks/kernel_bench.py --kv-bits 4 --out "$OUT/kernels-4bit.json"
  step lowbit-kernels 150 "$PY" benchmarks/lowbit_kernel_bench.py --out "$OUT/lowbit-kernels.json"
  bench=(--model-shape llama2-7b --dtype bfloat16 --context-lengths 1024,4064 --batch-sizes 1,16
         --decode-tokens 32 --repeats 3 --warmup 1 --kv-budget-mib 40960)
fi
step serving 240 "$PY" -m minicache.evaluate.bench_cli "${bench[@]}" --preset paper --kv-bits 4 --kernels auto \
  --json-out "$OUT/bench.json" --force
echo "results in $OUT"
