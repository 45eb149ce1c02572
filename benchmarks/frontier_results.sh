#!/usr/bin/env bash
# Issue 20: minicache beside what a user would pick instead, on text no profile was calibrated on.
# Writes benchmarks/results/frontier-cpu/ (overwrites that dtype's files).
#
#   bash benchmarks/frontier_results.sh               # float32 and bfloat16 (about 2 hours on 2 CPU cores)
#   bash benchmarks/frontier_results.sh float32       # one dtype
#   TASKS=0 bash benchmarks/frontier_results.sh       # perplexity only
#   TASKS_1024=1 bash benchmarks/frontier_results.sh float32   # + five methods' tasks at 1,024 tokens
#
# Data: 64 windows x (512 prefix + 256 scored tokens) = 16,384 scored tokens, half Python source, half
# Python release notes (benchmarks/unseen_text.sh), one minicache-eval --compare run per dtype, so every
# method is scored on the same windows against the same full-cache run; the 95 % interval is a paired
# bootstrap over the 64 windows. Memory: bytes each cache really holds after the prefix.
# Methods: ours (paper preset, averaging, the shipped profile alone and + 4-bit KIVI, KIVI 4-bit and
# rotated 3-bit alone, the calibrated-width profile of benchmarks/results/lowbit-cpu), transformers'
# QuantizedCache (HQQ 4-bit), and kvpress presses at compression ratios 0.0625 (1.07x, the shipped
# profile's saving), 0.25, 0.5 and 0.75; bfloat16 (2.5x slower on CPU) runs a shorter list.
# Tasks: minicache-eval --task ruler at 512 tokens, 20 prompts per task (the default five tasks), for
# our methods and six kvpress settings (tasks-<dtype>.json/.md; not QuantizedCache HQQ, which refuses a
# context that is not a multiple of its group). About 35 minutes per dtype on 2 cores.
# Then frontier_table.py draws table-<dtype>.md and frontier-<dtype>.png.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
DTYPES=${1:-float32 bfloat16}
OUT=benchmarks/results/frontier-cpu
mkdir -p "$OUT"
exec > >(tee "$OUT/log-${DTYPES// /-}.txt") 2>&1
machine_line
"$PY" -c "from importlib.metadata import version as v; print('kvpress', v('kvpress'), 'transformers', v('transformers'))"

source benchmarks/unseen_text.sh && write_unseen_text "$WORK"
# 32 windows of each kind, back to back: the stream joins records with one EOS, so the second is one short
"$PY" - "$WORK/code.txt" "$WORK/notes.txt" "$WORK/unseen-16k.jsonl" <<'PYEOF'
import json, sys
from minicache.models import load_model
_, tokenizer = load_model("smollm2-135m")
window = 512 + 256
with open(sys.argv[3], "w") as out:
    for i, path in enumerate(sys.argv[1:3]):
        ids = tokenizer(open(path).read(), add_special_tokens=False).input_ids[: 32 * window - i]
        assert len(ids) == 32 * window - i, f"{path}: too short"
        out.write(json.dumps({"input_ids": ids}) + "\n")
PYEOF

SHIPPED=profiles/smollm2-135m-instruct
OURS="full,paper,average,$SHIPPED,$SHIPPED@kivi:4"
if "$PY" -c "import hqq" 2>/dev/null; then HQQ=",quantized-cache-hqq@4"; else
  HQQ=""; echo "hqq is not installed (pip install 'minicache[hqq]'): no QuantizedCache row"; fi
run_tasks() {  # dtype, context length, file suffix, methods (full is added first)
  echo "== $1 @$2: minicache-eval --task ruler --compare full,$4"
  local began=$SECONDS
  "$PY" -m minicache.evaluate.cli --task ruler --compare "full,$4" --context-lengths "$2" --samples-per-cell 20 \
    --dtype "$1" --json-out "$OUT/tasks-$1$3.json" --markdown-out "$OUT/tasks-$1$3.md" --force
  echo "   ($1 tasks @$2: $((SECONDS - began)) s)"
}

for dtype in $DTYPES; do
  if [[ $dtype == float32 ]]; then  # the broad list: float32 runs about 2.5x faster than bfloat16 on CPU
    methods="$OURS,none@kivi:4,benchmarks/results/lowbit-cpu/auto-rotated$HQQ"
    for r in 0.0625 0.25 0.5 0.75; do methods+=",kvpress:snapkv@$r"; done
    for r in 0.0625 0.5 0.75; do methods+=",kvpress:expected@$r"; done
    methods+=",kvpress:streaming@0.5,kvpress:knorm@0.5"
  else  # the acceptance list: our five, QuantizedCache and five kvpress settings
    methods="$OURS$HQQ,kvpress:snapkv@0.0625,kvpress:expected@0.0625,kvpress:snapkv@0.5,kvpress:expected@0.5"
    methods+=",kvpress:streaming@0.5"
  fi
  echo "== $dtype: minicache-eval --compare $methods"
  began=$SECONDS
  "$PY" -m minicache.evaluate.cli --compare "$methods" --data "$WORK/unseen-16k.jsonl" --dtype "$dtype" \
    --prefix-length 512 --continuation-length 256 --num-windows 64 \
    --json-out "$OUT/$dtype.json" --markdown-out "$OUT/$dtype.md" --force
  echo "   ($dtype: $((SECONDS - began)) s)"
  if [[ ${TASKS:-1} == 1 ]]; then
    # no QuantizedCache HQQ here: hqq refuses a prompt whose context is not a multiple of its group
    # (a 447-token context crashed the first run after 60 of 100 prompts)
    tasks="paper,average,$SHIPPED,$SHIPPED@kivi:4,kvpress:snapkv@0.0625,kvpress:expected@0.0625"
    tasks+=",kvpress:snapkv@0.5,kvpress:expected@0.5,kvpress:streaming@0.5,kvpress:knorm@0.5"
    run_tasks "$dtype" 512 "" "$tasks"
  fi
  if [[ ${TASKS_1024:-0} == 1 ]]; then
    # the longer length where the full cache still scores >= 60 % on four of the five tasks (~21 min)
    run_tasks "$dtype" 1024 -1024 "$SHIPPED,$SHIPPED@kivi:4,kvpress:snapkv@0.0625,kvpress:expected@0.0625"
  fi
done
"$PY" benchmarks/frontier_table.py "$OUT"
