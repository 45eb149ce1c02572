#!/usr/bin/env bash
# Quantized MiniCache (issue 6) on SmolLM2-135M-Instruct, bfloat16, 4,096-token context: quality and
# compression of {full, 4-bit, 2-bit, MiniCache (paper preset), MiniCache + 4-bit, MiniCache + 2-bit,
# transformers' QuantizedCache (fp8; quanto / HQQ 4/2-bit where installed)}, all measured by
# minicache-eval on the same windows. Writes one JSON per row, table.md and log.txt to
# benchmarks/results/quantized-cpu/ (overwrites). About 45 minutes on 2 idle CPU cores.
#
#   bash benchmarks/quantized_results.sh            # PYTHON=... to use another interpreter
#
# Held-out text: Apache-2.0 + GPL-2 + LGPL-2.1 (Debian's licence texts): nothing here was tuned on it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=${PYTHONPATH:-.}
OUT=benchmarks/results/quantized-cpu
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
L=/usr/share/common-licenses
cat "$L/Apache-2.0" "$L/GPL-2" "$L/LGPL-2.1" >"$WORK/eval.txt"
exec > >(tee "$OUT/log.txt") 2>&1
echo "machine: $(nproc) CPU cores, $(uname -m); $(date -u +%F)"
common=(--dtype bfloat16 --prefix-length 4096 --continuation-length 128 --num-windows 2 --batch-size 2)

evaluate() {  # name, then minicache-eval arguments
  local name=$1; shift
  echo "== minicache-eval $* ${common[*]} --data eval.txt"
  "$PY" -m minicache.evaluate.cli --data "$WORK/eval.txt" --json "${common[@]}" "$@" >"$OUT/$name.json"
  cat "$OUT/$name.json"; echo
}

evaluate full --baseline full
evaluate 4bit --preset none --kv-bits 4
evaluate 2bit --preset none --kv-bits 2
# Quantization alone at 2 bits with key groups of 64 tokens: more scales, better quality, still >= 5x.
evaluate 2bit-g64 --preset none --kv-bits 2 --kv-group-size 64
evaluate minicache --preset paper
evaluate minicache-4bit --preset paper --kv-bits 4
evaluate minicache-2bit --preset paper --kv-bits 2
# The calibrated profile this repository ships (within 1 % ppl at 512 tokens), alone and packed.
evaluate shipped --profile profiles/smollm2-135m-instruct
evaluate shipped-4bit --profile profiles/smollm2-135m-instruct --kv-bits 4
evaluate quantized-cache-fp8 --baseline quantized-cache-fp8
if "$PY" -c "import optimum.quanto" 2>/dev/null; then
  evaluate quantized-cache-quanto-4bit --baseline quantized-cache-quanto --kv-bits 4
  evaluate quantized-cache-quanto-2bit --baseline quantized-cache-quanto --kv-bits 2
else
  echo "optimum-quanto is not installed: no quanto rows"
fi
if "$PY" -c "import hqq" 2>/dev/null; then
  evaluate quantized-cache-hqq-4bit --baseline quantized-cache-hqq --kv-bits 4
  evaluate quantized-cache-hqq-2bit --baseline quantized-cache-hqq --kv-bits 2
else
  echo "hqq is not installed (pip install 'minicache[hqq]'): no HQQ rows"
fi
"$PY" benchmarks/quantized_table.py "$OUT" | tee "$OUT/table.md"
