#!/usr/bin/env bash
# Decode speed of vLLM (CPU build) with and without packed/merged profiles, on a quiet machine:
# 10 prompts of 600 unseen-text tokens, 64 greedy tokens each, bfloat16, block size 128, one engine
# at a time. Prints generated tokens / generate() seconds (prefill of the 10 prompts included).
#
#   bash benchmarks/vllm_decode.sh                       # about 5 minutes on 2 cores
#   bash benchmarks/vllm_decode.sh shipped shipped-restore # only those engines
#
# Engines: stock, shipped, shipped-4bit, auto-4k-half (the default: all four), with the plugin's
# default decode path (MINICACHE_VLLM_DECODE=auto: on CPU every store read a block at a time, as
# blockwise); a name ending in -restore or -blockwise uses that path for every store instead.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
source benchmarks/unseen_text.sh && write_unseen_text "$WORK"
"$PY" benchmarks/vllm_decode_inputs.py "$WORK"
machine_line
names=("$@"); [[ ${#names[@]} -gt 0 ]] || names=(stock shipped shipped-4bit auto-4k-half)
for name in "${names[@]}"; do
  decode=auto base=$name
  for path in restore blockwise; do
    [[ $name == *-$path ]] && decode=$path base=${name%-"$path"}
  done
  case $base in
    stock) profile=() ;; shipped) profile=(--profile profiles/smollm2-135m-instruct) ;;
    shipped-4bit) profile=(--profile "$WORK/profile-shipped-4bit") ;;
    auto-4k-half) profile=(--profile benchmarks/results/keys-cpu/auto-4k-half) ;;
    *) echo "vllm_decode.sh: unknown engine $name" >&2; exit 2 ;;
  esac
  "$PY" -m minicache.convert --model smollm2-135m --dtype bfloat16 --out "$WORK/$name" "${profile[@]}" > /dev/null 2>&1
  plugins=(); [[ $name == stock ]] && plugins=(env VLLM_PLUGINS=)
  MINICACHE_VLLM_DECODE=$decode VLLM_CPU_KVCACHE_SPACE=1 TOKENIZERS_PARALLELISM=false VLLM_ENABLE_V1_MULTIPROCESSING=0 "${plugins[@]}" \
    .venv-vllm/bin/python integrations/vllm/bench/vllm_generate.py "$WORK/$name" "$WORK/prompts.json" \
    "$WORK/$name.json" --max-tokens 64 --block-size 128 --max-num-batched-tokens 8192 > "$WORK/$name.log" 2>&1
  "$PY" -c "import json, sys; r = json.load(open(sys.argv[1]))
print(f'{sys.argv[2]:>14}: {r[\"generated_tokens\"] / r[\"generate_s\"]:6.1f} tokens/s ({r[\"generated_tokens\"]} tokens in {r[\"generate_s\"]:.1f} s), KV capacity {r[\"kv_cache_tokens\"]:,} tokens')" \
    "$WORK/$name.json" "$name"
done
