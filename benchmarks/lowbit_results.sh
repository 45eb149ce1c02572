#!/usr/bin/env bash
# Issue 18: low-bit storage on SmolLM2-135M-Instruct, bfloat16, 4,096-token prefixes, on text no profile
# was calibrated on. Writes benchmarks/results/lowbit-cpu/ (overwrites).
#
#   bash benchmarks/lowbit_results.sh             # everything (about 75 minutes on 2 CPU cores)
#   bash benchmarks/lowbit_results.sh calibrate   # only the calibrations
#   bash benchmarks/lowbit_results.sh frontier    # only the 4,096-token comparison (uses $OUT/auto-rotated)
#   bash benchmarks/lowbit_results.sh decode      # only the decode-speed ratios
#   bash benchmarks/lowbit_results.sh schemes     # rotated-mse at 4/3/2 and rotated-lloyd at 2 bits, same windows
#
# 1. minicache-calibrate --preset none --kv-bits auto --kv-scheme rotated at 2,048-token windows on the
#    built-in corpus + the shipped profile's data (the widths alone; budget +1 % ppl) -> $OUT/auto-rotated;
#    and the same with merging (--kv-bits auto, default search) on 64 x 512 tokens, timed.
# 2. minicache-eval --compare at 4,096-token prefixes: 16 windows x 1,024 scored tokens = 16,384 tokens over
#    the README's held-out licences, Python source and Python release notes: full (the noise floor),
#    KIVI and rotated at 4/3/2 bits, the auto profile, the shipped profile + 4-bit KIVI, and transformers'
#    QuantizedCache (HQQ 4/2-bit, where hqq is installed). table.md + frontier.png.
# 3. Decode tokens/s of the blockwise torch path (no Triton on CPU) at 2,048 tokens, batch 1: 4-bit KIVI,
#    3-bit KIVI, rotated 4/3-bit and the auto profile, ratios against 4-bit KIVI of the same run.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
WHAT=${1:-all}
OUT=benchmarks/results/lowbit-cpu
mkdir -p "$OUT"
exec > >(tee "$OUT/log-$WHAT.txt") 2>&1
machine_line

cat minicache/calibrate/corpus/default.jsonl profiles/smollm2-135m-instruct/calibration-data.jsonl >"$WORK/calib.jsonl"
source benchmarks/unseen_text.sh && write_unseen_text "$WORK"

if [[ $WHAT == all || $WHAT == calibrate ]]; then
  echo "== widths alone: --preset none --kv-bits auto --kv-scheme rotated, 2,048-token windows"
  began=$SECONDS
  "$PY" -m minicache.calibrate.cli --data "$WORK/calib.jsonl" --preset none --kv-bits auto --kv-scheme rotated --kv-sink-tokens 0 \
    --max-length 2048 --num-samples 16 --eval-windows 12 --dtype bfloat16 --out "$WORK/auto-rotated" --no-progress
  echo "   (calibration: $((SECONDS - began)) s)"
  rm -rf "$OUT/auto-rotated" && mkdir -p "$OUT/auto-rotated" && cp "$WORK/auto-rotated"/minicache_* "$OUT/auto-rotated/"
  echo "== merging and widths: --kv-bits auto --kv-scheme rotated on 64 x 512 tokens (timed)"
  began=$SECONDS
  "$PY" -m minicache.calibrate.cli --data "$WORK/calib.jsonl" --kv-bits auto --kv-scheme rotated --kv-sink-tokens 0 \
    --max-length 512 --num-samples 64 --dtype bfloat16 --out "$WORK/auto-512" --no-progress
  echo "   (calibration of 64 x 512 tokens with --kv-bits auto: $((SECONDS - began)) s wall)"
  rm -rf "$OUT/auto-rotated-512" && mkdir -p "$OUT/auto-rotated-512" && cp "$WORK/auto-512"/minicache_* "$OUT/auto-rotated-512/"
fi

if [[ $WHAT == all || $WHAT == frontier ]]; then
  methods=full,none@kivi:4,none@kivi:3,none@kivi:2,none@rotated:4,none@rotated:3,none@rotated:2
  methods+=,$OUT/auto-rotated,profiles/smollm2-135m-instruct@kivi:4
  if "$PY" -c "import hqq" 2>/dev/null; then
    methods+=,quantized-cache-hqq@4,quantized-cache-hqq@2
  else
    echo "hqq is not installed (pip install 'minicache[hqq]'): no HQQ rows"
  fi
  echo "== 4,096-token prefixes, 16 windows x 1,024 scored tokens: $methods"
  "$PY" -m minicache.evaluate.cli --data "$WORK/unseen.txt" --dtype bfloat16 --prefix-length 4096 \
    --continuation-length 1024 --num-windows 16 --batch-size 2 --compare "$methods" \
    --json-out "$OUT/frontier.json" --markdown-out "$OUT/frontier.md" --force
  "$PY" benchmarks/lowbit_table.py "$OUT/frontier.json" "$OUT"
fi

if [[ $WHAT == all || $WHAT == schemes ]]; then
  # The other registered quantizers at each width, on the frontier's windows (no sinks, as its rows):
  # rotated-mse (value ranges by squared error) at 4/3/2 bits, rotated-lloyd (uneven levels) at 2 bits;
  # rotated-lloyd's 3- and 4-bit codes are rotated's, bit for bit (minicache/quant/lloyd.py)
  methods=none@rotated-mse:4,none@rotated-mse:3,none@rotated-mse:2,none@rotated-lloyd:2
  echo "== 4,096-token prefixes, 16 windows x 1,024 scored tokens: $methods"
  "$PY" -m minicache.evaluate.cli --data "$WORK/unseen.txt" --dtype bfloat16 --prefix-length 4096 \
    --continuation-length 1024 --num-windows 16 --batch-size 2 --compare "$methods" \
    --json-out "$OUT/schemes.json" --markdown-out "$OUT/schemes.md" --force
fi

if [[ $WHAT == all || $WHAT == decode ]]; then
  echo "== decode speed, blockwise torch path, 2,048 tokens, batch 1"
  "$PY" benchmarks/lowbit_decode.py --profile "$OUT/auto-rotated" --json-out "$OUT/decode.json" \
    --markdown-out "$OUT/decode.md"
fi
