#!/usr/bin/env bash
# Issue 18, item 0: the predictive_residual method on SmolLM2-135M-Instruct, bfloat16, 4,096-token
# prefixes, on text no profile was calibrated on (the protocol of lowbit_results.sh, same windows).
# Writes benchmarks/results/predictive-cpu/ (overwrites).
#
#   bash benchmarks/predictive_results.sh          # everything (about 65 minutes on 2 CPU cores)
#   bash benchmarks/predictive_results.sh decode   # only the decode-speed ratios (uses $OUT/k10-3bit)
#   bash benchmarks/predictive_results.sh rope-keys  # only re-score the two RoPE-commuting profiles and the full
#                                                  # cache on the windows of 2. (compare-rope-keys.md)
#   bash benchmarks/predictive_results.sh sinks    # k10-3bit with 4 exact sink tokens instead of 1, 4 windows
#                                                  # (about 7 minutes; sinks-probe.md, whose run named the copy
#                                                  # /tmp/pr/k10-3bit-s4)
#
# 1. benchmarks/predictive_profile.py fits the layer-to-layer prediction maps (joint over KV heads,
#    float16) on 32 x 1,024 tokens of the built-in corpus + the shipped profile's data and writes
#    profiles with groups of 10 layers (3 groups cover the 30 layers): 3-bit keys and values, and
#    4-bit keys with 3-bit values; KIVI packing, per-token residual groups of 64 channels. Keys use
#    maps that commute with RoPE; the *-free-keys profiles use free maps on post-RoPE keys (which
#    fail past the 1,024 positions they were fitted on).
# 2. minicache-eval --compare: 16 windows x 1,024 scored tokens = 16,384 tokens over the README's
#    held-out licences, Python source and Python release notes (unseen.txt): full (the noise floor),
#    KIVI 3/4-bit in groups of 64 (the same group size), and the two profiles.
# 3. Decode seconds per step at 2,048 tokens, batch 1 (benchmarks/lowbit_decode.py: 4-bit KIVI is the
#    same-run baseline), default path (whole-layer restore, members restored in layer order).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
WHAT=${1:-all}
OUT=benchmarks/results/predictive-cpu
mkdir -p "$OUT"
exec > >(tee "$OUT/log-$WHAT.txt") 2>&1
machine_line

cat minicache/calibrate/corpus/default.jsonl profiles/smollm2-135m-instruct/calibration-data.jsonl >"$WORK/calib.jsonl"
source benchmarks/unseen_text.sh && write_unseen_text "$WORK"

if [[ $WHAT == all ]]; then
echo "== fitting prediction maps, groups of 10 layers"
label="minicache/calibrate/corpus/default.jsonl + profiles/smollm2-135m-instruct/calibration-data.jsonl"
"$PY" benchmarks/predictive_profile.py --data "$WORK/calib.jsonl" --data-label "$label" --members 10 --bits 3 \
  --out "$OUT/k10-3bit"
"$PY" benchmarks/predictive_profile.py --data "$WORK/calib.jsonl" --data-label "$label" --members 10 --bits 4 \
  --value-bits 3 --out "$OUT/k10-keys4-values3"
"$PY" benchmarks/predictive_profile.py --data "$WORK/calib.jsonl" --data-label "$label" --members 10 --bits 3 \
  --free-keys --out "$OUT/k10-3bit-free-keys"
"$PY" benchmarks/predictive_profile.py --data "$WORK/calib.jsonl" --data-label "$label" --members 10 --bits 4 \
  --value-bits 3 --free-keys --out "$OUT/k10-keys4-values3-free-keys"

methods=full,none@kivi:3/64,none@kivi:4/64,$OUT/k10-3bit,$OUT/k10-keys4-values3
methods+=,$OUT/k10-3bit-free-keys,$OUT/k10-keys4-values3-free-keys
echo "== 4,096-token prefixes, 16 windows x 1,024 scored tokens: $methods"
"$PY" -m minicache.evaluate.cli --data "$WORK/unseen.txt" --dtype bfloat16 --prefix-length 4096 \
  --continuation-length 1024 --num-windows 16 --batch-size 2 --compare "$methods" \
  --json-out "$OUT/compare.json" --markdown-out "$OUT/compare.md" --force
fi

if [[ $WHAT == rope-keys ]]; then
  echo "== 4,096-token prefixes, 16 windows x 1,024 scored tokens: full and the RoPE-commuting profiles"
  "$PY" -m minicache.evaluate.cli --data "$WORK/unseen.txt" --dtype bfloat16 --prefix-length 4096 \
    --continuation-length 1024 --num-windows 16 --batch-size 2 \
    --compare "full,$OUT/k10-3bit,$OUT/k10-keys4-values3" \
    --json-out "$OUT/compare-rope-keys.json" --markdown-out "$OUT/compare-rope-keys.md" --force
fi

if [[ $WHAT == sinks ]]; then
  echo "== k10-3bit with sink_tokens 4 (the groups' exact first tokens), beside 3-bit rotated with 4 sinks"
  cp -r "$OUT/k10-3bit" "$WORK/k10-3bit-s4"
  sed -i 's/sink_tokens: 1}/sink_tokens: 4}/' "$WORK/k10-3bit-s4/minicache_config.yaml"
  "$PY" -m minicache.evaluate.cli --data "$WORK/unseen.txt" --dtype bfloat16 --prefix-length 4096 \
    --continuation-length 1024 --num-windows 4 --batch-size 2 \
    --compare "full,none@rotated:3+s4,$OUT/k10-3bit,$WORK/k10-3bit-s4" \
    --json-out "$OUT/sinks-probe.json" --markdown-out "$OUT/sinks-probe.md" --force
fi

if [[ $WHAT == all || $WHAT == decode ]]; then
  echo "== decode speed, default path, 2,048 tokens, batch 1"
  "$PY" benchmarks/lowbit_decode.py --profile "$OUT/k10-3bit" --path default --baselines "3-bit kivi" \
    --json-out "$OUT/decode.json" --markdown-out "$OUT/decode.md"
fi
