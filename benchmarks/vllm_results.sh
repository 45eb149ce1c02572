#!/usr/bin/env bash
# vLLM with the shipped SmolLM2 profile against minicache's transformers runtime (issue 19's acceptance):
# KV capacity with and without the profile, greedy tokens on 10 prompts of 600 tokens, perplexity of
# 64 windows x 256 continuation tokens (16,384 scored tokens) of code, release notes and licences.
# Needs .venv-vllm (bash scripts/setup_vllm.sh). About 30 minutes on 2 CPU cores.
#
#   bash benchmarks/vllm_results.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
OUT=benchmarks/results/vllm-cpu
mkdir -p "$OUT"
source benchmarks/unseen_text.sh && write_unseen_text "$WORK"
{
  machine_line
  TEXT=("$WORK/code.txt" "$WORK/notes.txt" "$WORK/licences.txt")
  "$PY" benchmarks/vllm_agreement.py --text "${TEXT[@]}" --out "$OUT" --dtype float32 --greedy-only
  "$PY" benchmarks/vllm_agreement.py --text "${TEXT[@]}" --out "$OUT"
} 2>&1 | grep --line-buffered -v "Loading weights" | tee "$OUT/log.txt"
