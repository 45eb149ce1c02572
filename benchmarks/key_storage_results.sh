#!/usr/bin/env bash
# Issue 18: how unmerged layers store keys — exact sink tokens (--kv-sink-tokens) and keys packed before
# RoPE (--kv-pre-rope-keys) — and values whose groups pick their range by squared error (rotated-mse), on
# SmolLM2-135M-Instruct, bfloat16, 4,096-token prefixes, text no profile was
# calibrated on; the same windows and protocol as benchmarks/lowbit_results.sh, so its rows (KIVI and
# rotated without these options) compare directly. Writes benchmarks/results/keys-cpu/ (overwrites).
#
#   bash benchmarks/key_storage_results.sh            # everything (about 135 minutes on 2 CPU cores)
#   bash benchmarks/key_storage_results.sh sinks      # exact sinks alone (5 rows, about 55 minutes)
#   bash benchmarks/key_storage_results.sh values2    # keys 4 / values 2 bits with sinks, rotated-mse vs rotated (25 min)
#   bash benchmarks/key_storage_results.sh calibrate  # --kv-bits auto, rotated-mse, both options (about 12 minutes)
#   bash benchmarks/key_storage_results.sh frontier   # both options at 3/2 bits + the auto profile (45 min)
#   bash benchmarks/key_storage_results.sh decode     # decode-speed ratios against 4-bit KIVI
#   bash benchmarks/key_storage_results.sh calibrate4k  # --kv-bits auto calibrated at 4,096 tokens, rotated + sinks
#   bash benchmarks/key_storage_results.sh eval4k     # that profile on the unseen windows
#   bash benchmarks/key_storage_results.sh calibrate4k-half  # the same at --budget 0.005, then unseen windows
#   bash benchmarks/key_storage_results.sh timed      # merging + widths with sinks on 64 x 512 tokens, timed
#   bash benchmarks/key_storage_results.sh timed-5x   # the same with the 5x profiles' settings, timed
#   bash benchmarks/key_storage_results.sh groups64   # 3-bit rotated + 4 sinks with key groups of 64 tokens (15 min)
#   bash benchmarks/key_storage_results.sh groups64-prerope  # the same with keys packed pre-RoPE (8 min)
#   bash benchmarks/key_storage_results.sh groups64-s8  # the same with 8 exact sinks (8 min)
#   bash benchmarks/key_storage_results.sh merged     # both shipped merge profiles on 4-bit rotated + 4 sinks (25 min)
#   bash benchmarks/key_storage_results.sh lloyd      # rotated-lloyd (uneven levels) at 3 and 2 bits (35 min)
#   bash benchmarks/key_storage_results.sh lloyd-decode  # 2-bit uneven vs even levels, decode speed vs 4-bit KIVI
#   bash benchmarks/key_storage_results.sh calibrate-lloyd  # the `calibrate` block with rotated-lloyd, then unseen windows
#   bash benchmarks/key_storage_results.sh calibrate-rotated  # calibrate-lloyd with even levels (the default scheme)
#   bash benchmarks/key_storage_results.sh calibrate-rotated-g64  # the same with key groups of 64 tokens (25 min)
#   bash benchmarks/key_storage_results.sh groups32   # 3-bit rotated, 4 sinks, pre-RoPE, key and value groups of 32 (15 min)
#   bash benchmarks/key_storage_results.sh window     # 3-bit rotated + 4 sinks with 64 / 0 exact recent tokens (30 min)
#   KV_WINDOW=0 KV_GROUP=64 bash benchmarks/key_storage_results.sh calibrate-window  # calibrate-lloyd with that window
#   bash benchmarks/key_storage_results.sh window8    # calibrate-rotated's profile and 3-bit rotated with an 8-bit window (25 min)
#   bash benchmarks/key_storage_results.sh window8-decode  # decode speed with an 8-bit window vs 4-bit KIVI (after window8)
#   bash benchmarks/key_storage_results.sh calibrate-window8  # calibrate-rotated with --kv-window-bits 8 (25 min)
#   bash benchmarks/key_storage_results.sh calibrate-window8-half  # the same at --budget 0.005 (25 min)
#   bash benchmarks/key_storage_results.sh calibrate-scale8  # calibrate-window8 with 8-bit scales, groups of 64 (25 min)
#   bash benchmarks/key_storage_results.sh calibrate-scale8-half  # the same at --budget 0.005 (25 min)
#   bash benchmarks/key_storage_results.sh calibrate-scale8-g128  # calibrate-scale8 with key groups of 128 (25 min)
#   bash benchmarks/key_storage_results.sh calibrate-queries  # calibrate-scale8, keys rounded for the queries (25 min)
#   bash benchmarks/key_storage_results.sh calibrate-queries-g128  # calibrate-queries with key groups of 128 (25 min)
#   bash benchmarks/key_storage_results.sh queries    # uniform 3 and 2 bits with keys rounded for the queries (16 min)
#   bash benchmarks/key_storage_results.sh window6    # auto-rotated-queries with its 8-bit window, and at 6 bits (35 min)
#   bash benchmarks/key_storage_results.sh window6-decode  # decode speed with the 6-bit window vs 4-bit KIVI (10 min)
#   bash benchmarks/key_storage_results.sh calibrate-window6  # calibrate-queries with a 6-bit window (30 min)
#   bash benchmarks/key_storage_results.sh calibrate-window6-g128  # the same with key groups of 128 (30 min)
#   bash benchmarks/key_storage_results.sh queries-decode  # decode speed of the 5x profile; packing cost (8 min)
#   bash benchmarks/key_storage_results.sh decode-speed  # the 5x profile and its options vs 4-bit KIVI, two allocators (10 min)
#   bash benchmarks/key_storage_results.sh scale8     # 3-bit rotated, groups of 64, with 8-bit scales (15 min)
#   bash benchmarks/key_storage_results.sh scale8-decode  # decode speed with 8-bit scales vs 4-bit KIVI (15 min)
#   bash benchmarks/key_storage_results.sh overview   # every row above on one plot and table (seconds)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
WHAT=${1:-all}
OUT=benchmarks/results/keys-cpu
mkdir -p "$OUT"
exec > >(tee "$OUT/log-$WHAT.txt") 2>&1
machine_line

cat minicache/calibrate/corpus/default.jsonl profiles/smollm2-135m-instruct/calibration-data.jsonl >"$WORK/calib.jsonl"
source benchmarks/unseen_text.sh && write_unseen_text "$WORK"
EVAL=("$PY" -m minicache.evaluate.cli --data "$WORK/unseen.txt" --dtype bfloat16 --prefix-length 4096
      --continuation-length 1024 --num-windows 16 --batch-size 2 --force)

# Widths calibrated by `--preset none --kv-bits auto --kv-sink-tokens 4` in bfloat16 on the calibration
# mix, into $OUT/NAME. auto_profile NAME MAX_LENGTH NUM_SAMPLES EVAL_WINDOWS [more calibrate options]
auto_profile() {
  local name=$1 length=$2 samples=$3 held=$4 began=$SECONDS
  shift 4
  echo "== $name: --preset none --kv-bits auto --kv-sink-tokens 4 --max-length $length $*"
  "$PY" -m minicache.calibrate.cli --data "$WORK/calib.jsonl" --preset none --kv-bits auto --kv-sink-tokens 4 \
    --max-length "$length" --num-samples "$samples" --eval-windows "$held" --dtype bfloat16 "$@" \
    --out "$WORK/$name" --no-progress
  echo "   (calibration: $((SECONDS - began)) s)"
  rm -rf "${OUT:?}/$name" && mkdir -p "$OUT/$name" && cp "$WORK/$name"/minicache_* "$OUT/$name/"
}
# The profile $OUT/NAME on the unseen windows: $OUT/NAME.json and .md
score_profile() {
  echo "== $1 on the unseen windows"
  "${EVAL[@]}" --compare "$OUT/$1" --json-out "$OUT/$1.json" --markdown-out "$OUT/$1.md"
}

if [[ $WHAT == all || $WHAT == sinks ]]; then
  echo "== exact sinks alone: 4,096-token prefixes, 16 windows x 1,024 scored tokens"
  "${EVAL[@]}" --compare none@rotated:3+s4,none@rotated:4+s4,none@rotated:2+s4,none@kivi:3+s4,none@rotated:k4v3+s4 \
    --json-out "$OUT/sinks.json" --markdown-out "$OUT/sinks.md"
  "$PY" benchmarks/lowbit_table.py "$OUT/sinks.json" "$OUT/sinks"
fi

if [[ $WHAT == all || $WHAT == values2 ]]; then
  echo "== keys 4 bits, values 2 bits, 4 exact sinks: value ranges by squared error or min-max"
  "${EVAL[@]}" --compare none@rotated-mse:k4v2+s4,none@rotated:k4v2+s4 --json-out "$OUT/values2.json" \
    --markdown-out "$OUT/values2.md"
fi

if [[ $WHAT == all || $WHAT == calibrate ]]; then
  auto_profile auto-rotated-keys 2048 16 12 --kv-scheme rotated-mse --kv-pre-rope-keys
fi

if [[ $WHAT == all || $WHAT == calibrate4k ]]; then
  # The 2,048-token auto profile above lost +1.66 % at 4,096 tokens where it promised +0.66 %: a longer
  # context packs a larger share of its tokens. So calibrate at the length the profile is judged at.
  auto_profile auto-4k 4096 8 8 --kv-scheme rotated
fi

if [[ $WHAT == all || $WHAT == eval4k ]]; then
  score_profile auto-4k
fi

if [[ $WHAT == all || $WHAT == calibrate4k-half ]]; then
  # The 1 % profile above kept +0.53 % on held-out calibration text but lost +1.50 % on the unseen mix
  # (3-bit storage costs about three times more there). Does a 0.5 % budget keep the 1 % line unseen?
  auto_profile auto-4k-half 4096 8 8 --kv-scheme rotated --budget 0.005
  score_profile auto-4k-half
fi

# 3-bit rotated with key groups of 64 tokens (value groups stay 64 channels); benchmarks/results/transform-cpu/
# groups-probe.md predicted about a fifth less KL than groups of 128. groups32: key and value groups of 32, the
# issue's "rotated 3-bit alone within 1 %", paid for in scales. One row each: name, method.
for row in "groups64 none@rotated:3/64+s4" "groups64-prerope none@rotated:3/64+s4+prerope" \
           "groups64-s8 none@rotated:3/64+s8+prerope" "groups32 none@rotated:3/32+s4+prerope"; do
  read -r name method <<<"$row"
  if [[ $WHAT == all || $WHAT == "$name" ]]; then
    echo "== $method"
    "${EVAL[@]}" --compare "$method" --json-out "$OUT/$name.json" --markdown-out "$OUT/$name.md"
  fi
done

if [[ $WHAT == all || $WHAT == lloyd ]]; then
  # The same rows as sinks/groups64/groups64-prerope with uneven levels (same bytes): compare across files
  echo "== rotated-lloyd: 3 bits (key groups of 128 and 64, pre-RoPE) and 2 bits, 4 sinks"
  "${EVAL[@]}" --compare none@rotated-lloyd:3+s4,none@rotated-lloyd:3/64+s4,none@rotated-lloyd:3/64+s4+prerope,none@rotated-lloyd:2+s4 \
    --json-out "$OUT/lloyd.json" --markdown-out "$OUT/lloyd.md"
fi

if [[ $WHAT == all || $WHAT == lloyd-decode ]]; then
  echo "== decode speed of uneven 2-bit levels (and 3-bit groups of 64), blockwise torch path, 2,048 tokens, batch 1"
  "$PY" benchmarks/lowbit_decode.py --baselines \
    "3-bit rotated + 4 sinks,3-bit rotated + 4 sinks + key groups 64,2-bit rotated + 4 sinks,2-bit rotated-lloyd + 4 sinks" \
    --json-out "$OUT/lloyd-decode.json" --markdown-out "$OUT/lloyd-decode.md"
fi

if [[ $WHAT == all || $WHAT == window ]]; then
  # The exact recent window is 128 tokens x 16 bits: at 4,096 tokens, 0.5 bit of every value's ~3.7.
  # Compression is read at the prefix end, where every row's window is at its smallest (R tokens, since
  # 4,096 - R is a whole number of key groups here); while decoding it holds R to R + group - 1 tokens.
  echo "== the exact recent window: 3-bit rotated + 4 sinks, keys pre-RoPE, 64 or 0 recent tokens exact"
  "${EVAL[@]}" --compare none@rotated:3/64+s4+r64+prerope,none@rotated:3/64+s4+r0+prerope,none@rotated:3+s4+r0+prerope \
    --json-out "$OUT/window.json" --markdown-out "$OUT/window.md"
fi

if [[ $WHAT == all || $WHAT == calibrate-window ]]; then
  R=${KV_WINDOW:-0} G=${KV_GROUP:-64}
  auto_profile "auto-lloyd-r$R-g$G" 2048 16 12 --kv-scheme rotated-lloyd --kv-pre-rope-keys --kv-group-size "$G" \
    --residual-length "$R"
  score_profile "auto-lloyd-r$R-g$G"
fi

if [[ $WHAT == all || $WHAT == calibrate-lloyd ]]; then
  # The `calibrate` block (auto-rotated-keys: rotated-mse) with the other 2-bit remedy, uneven 2-bit levels
  auto_profile auto-lloyd 2048 16 12 --kv-scheme rotated-lloyd --kv-pre-rope-keys
  score_profile auto-lloyd
fi

if [[ $WHAT == all || $WHAT == calibrate-rotated ]]; then
  # calibrate-lloyd's settings with the default scheme (even levels): which one should the calibrator default to?
  auto_profile auto-rotated-prerope 2048 16 12 --kv-scheme rotated --kv-pre-rope-keys
  score_profile auto-rotated-prerope
fi

if [[ $WHAT == all || $WHAT == calibrate-rotated-g64 ]]; then
  # the same with key groups of 64 tokens (3-bit keys: +1.23 % -> +1.03 % fixed): does the search go lower?
  auto_profile auto-rotated-prerope-g64 2048 16 12 --kv-scheme rotated --kv-pre-rope-keys --kv-group-size 64
  score_profile auto-rotated-prerope-g64
fi

if [[ $WHAT == all || $WHAT == window8 ]]; then
  # The recent window (128 tokens + those waiting for a key group) is an eighth of the bytes of calibrate-rotated's
  # profile at 4,096 tokens. The same profile and widths with that window stored at 8 bits (window_bits: 8), and
  # the frontier block's 3-bit rotated row (exact window: +1.42 % at 4.225x, frontier.md) with it too.
  rm -rf "${OUT:?}/auto-rotated-prerope-w8" && mkdir -p "$OUT/auto-rotated-prerope-w8"
  "$PY" - "$OUT/auto-rotated-prerope" "$OUT/auto-rotated-prerope-w8" <<'PYTHON'
import dataclasses
import sys

from minicache import MergeProfile

profile = MergeProfile.load(sys.argv[1])
profile.with_quantization(dataclasses.replace(profile.quantization, window_bits=8)).save(sys.argv[2])
PYTHON
  echo "== 8-bit recent windows on the unseen windows"
  "${EVAL[@]}" --compare "$OUT/auto-rotated-prerope-w8,none@rotated:3+s4+prerope+w8" --json-out "$OUT/window8.json" \
    --markdown-out "$OUT/window8.md"
fi

if [[ $WHAT == all || $WHAT == window8-decode ]]; then
  # what reading an 8-bit window costs a decode step (it is dequantized whole, every step, before attention)
  echo "== decode speed with an 8-bit window, blockwise torch path, 2,048 tokens, batch 1"
  "$PY" benchmarks/lowbit_decode.py --profile "$OUT/auto-rotated-prerope-w8" --baselines \
    "3-bit rotated + 4 sinks + keys pre-RoPE,3-bit rotated + 4 sinks + keys pre-RoPE + 8-bit window" \
    --json-out "$OUT/window8-decode.json" --markdown-out "$OUT/window8-decode.md"
fi

if [[ $WHAT == all || $WHAT == calibrate-window8 ]]; then
  # calibrate-rotated with the window at 8 bits: the search measures (and counts) the stored window
  auto_profile auto-rotated-window8 2048 16 12 --kv-scheme rotated --kv-pre-rope-keys --kv-window-bits 8
  score_profile auto-rotated-window8
fi

if [[ $WHAT == all || $WHAT == calibrate-window8-half ]]; then
  # calibrate-window8 over-spent on the unseen windows (+1.24 % for a +0.60 % promise): the same at half the budget
  auto_profile auto-rotated-window8-half 2048 16 12 --kv-scheme rotated --kv-pre-rope-keys --kv-window-bits 8 \
    --budget 0.005
  score_profile auto-rotated-window8-half
fi

if [[ $WHAT == all || $WHAT == calibrate-scale8 ]]; then
  # Scales and zero points at 8 bits halve their bytes; key groups of 64 tokens spend that on precision (same
  # bytes of scales as fp16 groups of 128 for keys, half for values; benchmarks/scale_bits_probe.py)
  auto_profile auto-rotated-scale8 2048 16 12 --kv-scheme rotated --kv-pre-rope-keys --kv-window-bits 8 \
    --kv-scale-bits 8 --kv-group-size 64
  score_profile auto-rotated-scale8
fi

if [[ $WHAT == all || $WHAT == calibrate-scale8-half ]]; then
  auto_profile auto-rotated-scale8-half 2048 16 12 --kv-scheme rotated --kv-pre-rope-keys --kv-window-bits 8 \
    --kv-scale-bits 8 --kv-group-size 64 --budget 0.005
  score_profile auto-rotated-scale8-half
fi

if [[ $WHAT == all || $WHAT == calibrate-scale8-g128 ]]; then
  # fewer scale bytes (0.18 bits per value against 0.24), coarser key groups: where does the search stop?
  auto_profile auto-rotated-scale8-g128 2048 16 12 --kv-scheme rotated --kv-pre-rope-keys --kv-window-bits 8 \
    --kv-scale-bits 8
  score_profile auto-rotated-scale8-g128
fi

if [[ $WHAT == all || $WHAT == calibrate-queries ]]; then
  # calibrate-scale8 with keys rounded for the queries (error feedback, same bytes;
  # benchmarks/adaptive_rounding_probe.py): how far do the widths go down now?
  auto_profile auto-rotated-queries 2048 16 12 --kv-scheme rotated --kv-pre-rope-keys --kv-window-bits 8 \
    --kv-scale-bits 8 --kv-group-size 64 --kv-key-rounding queries
  score_profile auto-rotated-queries
fi

if [[ $WHAT == all || $WHAT == calibrate-queries-g128 ]]; then
  # calibrate-queries with key groups of 128 tokens (half the keys' scale bytes): do rounded keys hold there?
  auto_profile auto-rotated-queries-g128 2048 16 12 --kv-scheme rotated --kv-pre-rope-keys --kv-window-bits 8 \
    --kv-scale-bits 8 --kv-key-rounding queries
  score_profile auto-rotated-queries-g128
fi

if [[ $WHAT == all || $WHAT == queries ]]; then
  # uniform widths with keys rounded for the queries (auto-rotated-queries' weights) beside the same storage
  # rounded to the nearest level (scale8.md: 3 bits, 4.66x at +1.14 %)
  P=$OUT/auto-rotated-queries
  "${EVAL[@]}" --compare "$P@rotated:3/64+s4+prerope+w8+z8+qk,$P@rotated:2/64+s4+prerope+w8+z8+qk" \
    --json-out "$OUT/queries.json" --markdown-out "$OUT/queries.md"
fi

if [[ $WHAT == all || $WHAT == window6 ]]; then
  # The 8-bit window is 0.27 of the ~3.2 bits a value costs at 4,096 tokens (window8-probe.md). 6-bit codes of the
  # rotated head vector take 6.5 bits a value (fp16 scale and zero point per token and head) instead of 8.5, and
  # round a token packed later to 2-4 bits a second time by at most 1/63 of its range. At fixed widths (those of
  # auto-rotated-queries, the 4.92x profile), both windows in one run: what the 6-bit window costs and saves.
  P=$OUT/auto-rotated-queries
  "$PY" - "$P" "$OUT/auto-rotated-queries-widths-w6" <<'PYEOF'
import dataclasses, sys
from minicache import MergeProfile
profile = MergeProfile.load(sys.argv[1])
profile.with_quantization(dataclasses.replace(profile.quantization, window_bits=6)).save(sys.argv[2], overwrite=True)
PYEOF
  echo "== auto-rotated-queries with its 8-bit window and with a 6-bit one"
  "${EVAL[@]}" --compare "$P,$OUT/auto-rotated-queries-widths-w6" --json-out "$OUT/window6.json" --markdown-out "$OUT/window6.md"
  # the 6-bit window's own cost, paired over the same windows
  "$PY" benchmarks/paired_difference.py "$OUT/window6.json" --baseline "$P" --markdown-out "$OUT/window6-paired.md"
fi

if [[ $WHAT == all || $WHAT == window6-decode ]]; then
  # What the 6-bit window costs a decode step (its tokens are coded and restored through the rotation): the 4.92x
  # profile with its 8-bit window, the same widths calibrated with a 6-bit one, and the 5.03x profile
  echo "== decode speed with a 6-bit window, blockwise torch path, 2,048 tokens, batch 1"
  "$PY" benchmarks/lowbit_decode.py --profile "$OUT/auto-rotated-queries" --profile "$OUT/auto-rotated-queries-w6" \
    --profile "$OUT/auto-rotated-queries-g128" --baselines "3-bit rotated" --repeats 5 \
    --json-out "$OUT/window6-decode.json" --markdown-out "$OUT/window6-decode.md"
fi

if [[ $WHAT == all || $WHAT == calibrate-window6 ]]; then
  # calibrate-queries with a 6-bit window: the search chooses the widths with the window it will have
  auto_profile auto-rotated-queries-w6 2048 16 12 --kv-scheme rotated --kv-pre-rope-keys --kv-window-bits 6 \
    --kv-scale-bits 8 --kv-group-size 64 --kv-key-rounding queries
  score_profile auto-rotated-queries-w6
fi

if [[ $WHAT == all || $WHAT == calibrate-window6-g128 ]]; then
  auto_profile auto-rotated-queries-w6-g128 2048 16 12 --kv-scheme rotated --kv-pre-rope-keys --kv-window-bits 6 \
    --kv-scale-bits 8 --kv-key-rounding queries
  score_profile auto-rotated-queries-w6-g128
fi

if [[ $WHAT == all || $WHAT == queries-decode ]]; then
  # keys rounded for the queries change only the codes, so decoding reads them as before: the 5x profile beside
  # 3-bit rotated and 4-bit KIVI (blockwise torch path, storages alternated run by run), and the packing's cost
  echo "== decode speed of the 5x profile, blockwise torch path, 2,048 tokens, batch 1"
  "$PY" benchmarks/lowbit_decode.py --profile "$OUT/auto-rotated-queries-g128" \
    --baselines "3-bit rotated,3-bit rotated + 4 sinks + key groups 64 + 8-bit scales" \
    --json-out "$OUT/queries-decode.json" --markdown-out "$OUT/queries-decode.md"
  "$PY" benchmarks/key_rounding_speed.py --out "$OUT/key-rounding-speed.md"
fi

if [[ $WHAT == all || $WHAT == decode-speed ]]; then
  # After 3-bit codes were read as int32 words, packed blocks restored straight to float32, RoPE angles tabled and
  # blocks grown to 2,048 tokens: the 5x profile and what its options cost, against 4-bit KIVI of the same run.
  # Twice: glibc's default allocator, then with its mmap and trim thresholds raised, because on this machine
  # large temporaries page-fault in some processes and not others (one RoPE turn of a 1,024-token block took
  # 0.15 or 1.0 ms from one process to the next), which moved the ratios by about 15 % between runs.
  speed=(benchmarks/lowbit_decode.py --profile "$OUT/auto-rotated-queries-g128" --repeats 7 --baselines
         "3-bit rotated,3-bit rotated + 4 sinks,3-bit rotated + keys pre-RoPE,3-bit rotated + 4 sinks + key groups 64 + 8-bit scales")
  echo "== decode speed, blockwise torch path, 2,048 tokens, batch 1, default allocator"
  "$PY" "${speed[@]}" --json-out "$OUT/decode-speed.json" --markdown-out "$OUT/decode-speed.md"
  echo "== the same with glibc's mmap and trim thresholds raised"
  MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=268435456 "$PY" "${speed[@]}" \
    --json-out "$OUT/decode-speed-malloc.json" --markdown-out "$OUT/decode-speed-malloc.md"
fi

if [[ $WHAT == all || $WHAT == scale8 ]]; then
  # the window8 block's fixed 3-bit row (+1.47 % at 4.504x) with 8-bit scales and key groups of 64
  echo "== 3-bit rotated, 4 sinks, pre-RoPE keys, 8-bit window, 8-bit scales, groups of 64"
  "${EVAL[@]}" --compare none@rotated:3/64+s4+prerope+w8+z8 --json-out "$OUT/scale8.json" \
    --markdown-out "$OUT/scale8.md"
fi

if [[ $WHAT == all || $WHAT == scale8-decode ]]; then
  # what decoding 8-bit scales (a table lookup per group, every block) costs a decode step
  echo "== decode speed with 8-bit scales, blockwise torch path, 2,048 tokens, batch 1"
  "$PY" benchmarks/lowbit_decode.py --profile "$OUT/auto-rotated-scale8" --baselines \
    "3-bit rotated,3-bit rotated + 8-bit scales,3-bit rotated + 4 sinks + key groups 64,3-bit rotated + 4 sinks + key groups 64 + 8-bit scales" \
    --json-out "$OUT/scale8-decode.json" --markdown-out "$OUT/scale8-decode.md"
fi

if [[ $WHAT == all || $WHAT == merged ]]; then
  # What minicache-calibrate --kv-bits 4 now packs by default (rotated, 4 exact sinks) under the shipped merge
  # profiles; with KIVI 4-bit on the same windows: benchmarks/results/lowrank-cpu/quantized-4bit-shipped-4096.md
  echo "== shipped SLERP and low-rank profiles on 4-bit rotated storage with 4 exact sinks"
  "${EVAL[@]}" --compare "profiles/smollm2-135m-instruct@rotated:4+s4,profiles/smollm2-135m-instruct-lowrank@rotated:4+s4" \
    --json-out "$OUT/merged-rotated.json" --markdown-out "$OUT/merged-rotated.md"
fi

if [[ $WHAT == all || $WHAT == timed ]]; then
  # Issue 18: "the calibration with --kv-bits auto on 64 x 512 tokens stays under 10 minutes on 2 cores".
  echo "== merging and widths: --kv-bits auto --kv-scheme rotated --kv-sink-tokens 4 on 64 x 512 tokens (timed)"
  began=$SECONDS
  "$PY" -m minicache.calibrate.cli --data "$WORK/calib.jsonl" --kv-bits auto --kv-scheme rotated --kv-sink-tokens 4 \
    --max-length 512 --num-samples 64 --dtype bfloat16 --out "$WORK/auto-512" --no-progress
  echo "   (calibration of 64 x 512 tokens with --kv-bits auto and sinks: $((SECONDS - began)) s wall)"
fi

if [[ $WHAT == all || $WHAT == timed-5x ]]; then
  # The same clock with the settings of the 5x profiles (keys pre-RoPE, rounded for the queries, which adds a
  # pass for the query energies; 8-bit window and scales; key groups of 64)
  echo "== merging and widths: the 5x settings on 64 x 512 tokens (timed)"
  began=$SECONDS
  "$PY" -m minicache.calibrate.cli --data "$WORK/calib.jsonl" --kv-bits auto --kv-scheme rotated --kv-sink-tokens 4 \
    --kv-pre-rope-keys --kv-window-bits 8 --kv-scale-bits 8 --kv-group-size 64 --kv-key-rounding queries \
    --max-length 512 --num-samples 64 --dtype bfloat16 --out "$WORK/auto-512-5x" --no-progress
  echo "   (calibration of 64 x 512 tokens with the 5x settings: $((SECONDS - began)) s wall)"
  rm -rf "$OUT/auto-512-5x" && mkdir -p "$OUT/auto-512-5x" && cp "$WORK/auto-512-5x"/minicache_* "$OUT/auto-512-5x/"
fi

if [[ $WHAT == all || $WHAT == frontier ]]; then
  # No `full` row: the noise floor of these windows is lowbit_results.sh's (-0.01 %, same windows).
  methods=none@rotated:3+s4+prerope,none@rotated-mse:3+s4+prerope,none@rotated-mse:2+s4+prerope
  methods+=,$OUT/auto-rotated-keys
  echo "== both options: $methods"
  "${EVAL[@]}" --compare "$methods" --json-out "$OUT/frontier.json" --markdown-out "$OUT/frontier.md"
  "$PY" benchmarks/lowbit_table.py "$OUT/frontier.json" "$OUT"
  # One frontier with lowbit_results.sh's rows (same windows): without the options, sinks alone, both.
  "$PY" benchmarks/lowbit_table.py benchmarks/results/lowbit-cpu/frontier.json "$OUT/combined" "$OUT/sinks.json" \
    "$OUT/frontier.json" "$OUT/values2.json"
fi

if [[ $WHAT == all || $WHAT == overview ]]; then
  # Every quality row of this directory on one plot and table (same windows; nothing is rerun)
  rows=()
  for name in sinks frontier values2 groups64 groups64-prerope groups64-s8 groups32 lloyd window merged-rotated \
              auto-lloyd auto-rotated-prerope auto-rotated-prerope-g64 auto-4k auto-4k-half window8 auto-rotated-window8 \
              auto-rotated-window8-half auto-rotated-scale8 auto-rotated-scale8-half auto-rotated-scale8-g128 scale8 \
              auto-rotated-queries auto-rotated-queries-g128 queries; do
    rows+=("$OUT/$name.json")
  done
  "$PY" benchmarks/lowbit_table.py benchmarks/results/lowbit-cpu/frontier.json "$OUT/overview" "${rows[@]}"
  # the same rows near the 1 % line, labelled (the overview plot is too crowded to read there)
  "$PY" benchmarks/frontier_zoom.py "$OUT/overview/near-1-percent.png" benchmarks/results/lowbit-cpu/frontier.json \
    "${rows[@]}"
fi

if [[ $WHAT == all || $WHAT == decode ]]; then
  echo "== decode speed, blockwise torch path, 2,048 tokens, batch 1"
  "$PY" benchmarks/lowbit_decode.py --profile "$OUT/auto-rotated-keys" --json-out "$OUT/decode.json" \
    --markdown-out "$OUT/decode.md"
  echo "== what each option costs: 3-bit rotated with sinks, with pre-RoPE keys, with both"
  "$PY" benchmarks/lowbit_decode.py --baselines \
    "3-bit rotated,3-bit rotated + 4 sinks,3-bit rotated + keys pre-RoPE,3-bit rotated + 4 sinks + keys pre-RoPE" \
    --json-out "$OUT/decode-parts.json" --markdown-out "$OUT/decode-parts.md"
  echo "== the same parts and the profile calibrated at 4,096 tokens (after RoPE was sped up)"
  "$PY" benchmarks/lowbit_decode.py --profile "$OUT/auto-4k" --baselines \
    "3-bit rotated,3-bit rotated + 4 sinks,3-bit rotated + keys pre-RoPE,3-bit rotated + 4 sinks + keys pre-RoPE" \
    --json-out "$OUT/decode-4k.json" --markdown-out "$OUT/decode-4k.md"
fi
