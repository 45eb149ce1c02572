#!/usr/bin/env bash
# vLLM with a minicache profile against minicache's transformers runtime (issue 19's acceptance):
# KV capacity with and without the profile, greedy tokens on 10 prompts of 600 tokens, perplexity of
# 64 windows x 256 continuation tokens (16,384 scored tokens) of code, release notes and licences.
# Needs .venv-vllm (bash scripts/setup_vllm.sh).
#
#   bash benchmarks/vllm_results.sh             # the shipped profile, float32 greedy + bfloat16 (about 30 min)
#   bash benchmarks/vllm_results.sh quantized   # packed profiles, bfloat16 (about 40 min):
#       the shipped groups + 4-bit KIVI (sinks, keys pre-RoPE), and issue 18's auto-4k-half (2/3/4 bits)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
OUT=benchmarks/results/vllm-cpu
mkdir -p "$OUT"
source benchmarks/unseen_text.sh && write_unseen_text "$WORK"
TEXT=("$WORK/code.txt" "$WORK/notes.txt" "$WORK/licences.txt")
case "${1:-merged}" in
  merged)
    {
      machine_line
      "$PY" benchmarks/vllm_agreement.py --text "${TEXT[@]}" --out "$OUT" --dtype float32 --greedy-only
      "$PY" benchmarks/vllm_agreement.py --text "${TEXT[@]}" --out "$OUT"
    } 2>&1 | grep --line-buffered -v "Loading weights" | tee "$OUT/log.txt" ;;
  quantized)
    # KIVI's key groups of 128 tokens make a page unit of 128 tokens: vLLM's block size must be 128.
    "$PY" -c "import sys
from minicache import MergeProfile
from minicache.profile import Quantization
q = Quantization(bits=4, group_size=128, residual_length=128, sink_tokens=4, pre_rope_keys=True)
MergeProfile.load('profiles/smollm2-135m-instruct').with_quantization(q).save(sys.argv[1])" "$WORK/shipped-4bit"
    {
      machine_line
      "$PY" benchmarks/vllm_agreement.py --text "${TEXT[@]}" --out "$OUT" --profile "$WORK/shipped-4bit" \
        --block-size 128 --tag=-shipped-4bit
      "$PY" benchmarks/vllm_agreement.py --text "${TEXT[@]}" --out "$OUT" \
        --profile benchmarks/results/keys-cpu/auto-4k-half --block-size 128 --tag=-auto-4k-half
    } 2>&1 | grep --line-buffered -v "Loading weights" | tee "$OUT/log-quantized.txt" ;;
  *) echo "usage: $0 [merged|quantized]" >&2; exit 2 ;;
esac
