#!/usr/bin/env bash
# Speed and KV memory of MiniCache (paper preset, shipped profile, each also packed to 4 bits)
# against the full cache on
# SmolLM2-135M-Instruct, CPU, float32: prefill and decode tokens/s at contexts 512 and 2048, batch
# 1 and 4, 16 decode tokens, medians of 3 repeats, ratios against the full cache of the same run;
# largest batch within 256 MiB of KV. Writes benchmarks/results/bench-cpu/bench.{json,png} and a
# log (overwrites). About 20 minutes on 2 CPU cores.
#
#   bash benchmarks/bench_results.sh            # uses .venv/bin/python
#   PY=/path/to/python bash benchmarks/bench_results.sh
#   THREADS=2 NOTE="dedicated machine" bash benchmarks/bench_results.sh
#
# One torch thread by default: the machine the committed numbers come from was shared with other
# jobs, and two OpenMP threads competing for busy cores make timings swing by 10x; one thread
# gives stable ratios. Prompts are Debian's licence texts not used to calibrate the shipped profile.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PY:-.venv/bin/python}"
THREADS="${THREADS:-1}"
NOTE="${NOTE:-say what else ran on the machine (NOTE=...); compare ratios, not absolute tokens/s}"
OUT=benchmarks/results/bench-cpu
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
L=/usr/share/common-licenses
cat "$L/Apache-2.0" "$L/GPL-2" "$L/LGPL-2.1" >"$WORK/prompts.txt"
exec > >(tee "$OUT/log.txt") 2>&1
echo "machine: $(nproc) CPU cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs); $(date -u +%F)"

PYTHONPATH=. "$PY" -m minicache.evaluate.bench_cli --model smollm2-135m --dtype float32 --device cpu \
  --preset paper --profile profiles/smollm2-135m-instruct --kv-bits 4 \
  --context-lengths 512,2048 --batch-sizes 1,4 --decode-tokens 16 --repeats 3 --warmup 1 \
  --kv-budget-mib 256 --threads "$THREADS" --data "$WORK/prompts.txt" --note "$NOTE" \
  --json-out "$OUT/bench.json" --plot-out "$OUT/bench.png" --force
