#!/usr/bin/env bash
# Does the calibrator keep its promise on text it never saw? (issue 21's acceptance)
#
# Calibrates SmolLM2-135M-Instruct at budgets 0.5 %, 1 % and 2 % on the shipped profile's
# calibration data (licence texts) in full and cut to 16 samples of 512 tokens, plus the README's
# main job (no --data: the built-in corpus, default settings); then scores every profile on two
# kinds of unseen text, 64 windows x (512 prefix + 256 scored tokens) = 16,384 scored tokens each:
#   code:  Python source, /usr/lib/python3.11/{argparse,dataclasses,...}.py (in no calibration data)
#   notes: release notes, the first 400 kB of Python 3.11's NEWS (/usr/share/doc/python3.11/NEWS.gz)
# and writes the promise table (benchmarks/promise_table.py): a profile keeps its promise on a text
# when its perplexity increase there is at most its budget + the half-width of the 95 % interval it
# states. Results, profiles and logs go to benchmarks/results/promise-cpu/ (overwritten).
# About 75 minutes on 2 CPU cores.
#
#   bash benchmarks/promise_results.sh            # everything
#   bash benchmarks/promise_results.sh evaluate   # only re-score the profiles already there
#   bash benchmarks/promise_results.sh kl         # KL budgets (0.003, 0.004 nats) on the full data, into kl/ (25 min)
#   bash benchmarks/promise_results.sh guard      # the same six calibrations and the main job with --kl-guard 4,
#                                                 # into guard/, scored on code, notes and a manual (coreutils)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
WHAT=${1:-all}
OUT=benchmarks/results/promise-cpu
DATA=profiles/smollm2-135m-instruct/calibration-data.jsonl
mkdir -p "$OUT"
LOG="$OUT/log-$WHAT.txt"

source benchmarks/unseen_text.sh && write_unseen_text "$WORK"

calibrate() {  # name, then minicache-calibrate arguments
  local name=$1
  shift
  echo "== minicache-calibrate $* --out $OUT/$name"
  mkdir -p "$(dirname "$WORK/$name")"
  local began=$SECONDS
  "$PY" -m minicache.calibrate.cli "$@" --out "$WORK/$name" --no-progress --force
  echo "   ($name: $((SECONDS - began)) s)"
  rm -rf "${OUT:?}/$name"
  mkdir -p "$OUT/$name"
  cp "$WORK/$name"/minicache_config.* "$WORK/$name"/minicache_report.md "$OUT/$name/"
}

{
  machine_line
  if [[ $WHAT == all || $WHAT == guard ]]; then
    # 16 samples of 512 tokens cut from the shipped profile's data (its first 8,192 tokens, in order)
    "$PY" - "$DATA" "$WORK/cut-16x512.jsonl" <<'EOF'
import json, sys
from minicache.data import read_samples
from minicache.models import load_model
_, tokenizer = load_model("smollm2-135m")
stream = []
for sample in read_samples(sys.argv[1]):
    stream += sample.tokenize(tokenizer) + [tokenizer.eos_token_id]
with open(sys.argv[2], "w") as out:
    for i in range(16):
        out.write(json.dumps({"input_ids": stream[i * 512 : (i + 1) * 512]}) + "\n")
EOF
  fi
  if [[ $WHAT == guard ]]; then
    # R = 4: on kinds of text the calibration data lacked, the loss rose up to 3.7x the held-out KL's upper end
    calibrate guard/main-job --kl-guard 4  # the main job today (no --data: --kl-guard auto is 4)
    for budget in 0.005 0.01 0.02; do
      calibrate "guard/full-$budget" --data "$DATA" --budget "$budget" --kl-guard 4
      calibrate "guard/cut-$budget" --data "$WORK/cut-16x512.jsonl" --max-length 512 --num-samples 16 \
        --budget "$budget" --kl-guard 4
    done
    PROMISE_TEXTS="code notes manual" score_promises "$WORK" "$OUT/guard" $(for p in main-job full-0.005 full-0.01 full-0.02 cut-0.005 cut-0.01 \
      cut-0.02; do echo "$OUT/guard/$p"; done)
    exit 0
  fi
  if [[ $WHAT == all ]]; then
    # the README's main job (no --data) as it was before --kl-guard auto guarded it: guard/main-job is today's
    calibrate main-job --kl-guard 0
    for budget in 0.005 0.01 0.02; do
      calibrate "full-$budget" --data "$DATA" --budget "$budget"
      calibrate "cut-$budget" --data "$WORK/cut-16x512.jsonl" --max-length 512 --num-samples 16 --budget "$budget"
    done
  fi
  if [[ $WHAT == kl ]]; then
    # the same unseen windows, profiles calibrated with --budget-metric kl_mean; promises checked in KL
    for budget in 0.003 0.004; do
      calibrate "kl/full-kl-$budget" --data "$DATA" --budget-metric kl_mean --budget "$budget"
    done
    score_promises "$WORK" "$OUT/kl" "$OUT/kl/full-kl-0.003" "$OUT/kl/full-kl-0.004"
    exit 0
  fi
  score_promises "$WORK" "$OUT" $(for p in main-job full-0.005 full-0.01 full-0.02 cut-0.005 cut-0.01 cut-0.02; do echo "$OUT/$p"; done)
} 2>&1 | grep --line-buffered -v "Loading weights" | tee "$LOG"
