#!/usr/bin/env bash
# Quality and memory of the shipped SmolLM2 profile against the paper preset, with and without
# alignment, on held-out text; and the time of a 64 x 512-token calibration. Writes JSON and a log
# to benchmarks/results/calibration-cpu/ (overwrites). About 30 minutes on 2 CPU cores.
#
#   bash benchmarks/calibration_results.sh
#
# Held-out text: Apache-2.0 + GPL-2 + LGPL-2.1 (Debian's licence texts), never in the calibration
# data of profiles/smollm2-135m-instruct (GPL-3, GFDL, MPL, LGPL-3, CC0, Artistic, BSD).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN=.venv/bin
OUT=benchmarks/results/calibration-cpu
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
L=/usr/share/common-licenses
cat "$L/Apache-2.0" "$L/GPL-2" "$L/LGPL-2.1" >"$WORK/eval.txt"
CALIB=profiles/smollm2-135m-instruct/calibration-data.jsonl
exec > >(tee "$OUT/log.txt") 2>&1
echo "machine: $(nproc) CPU cores, $(uname -m); $(date -u +%F)"

evaluate() {  # name, then minicache-eval arguments
  local name=$1; shift
  echo "== minicache-eval $* --data eval.txt"
  "$BIN/minicache-eval" --data "$WORK/eval.txt" --json "$@" >"$OUT/$name.json"
  cat "$OUT/$name.json"; echo
}

# Profiles: shipped (search, aligned, groups up to 3), paper preset aligned, SLERP-only pair search.
"$BIN/minicache-calibrate" --data "$CALIB" --preset paper --align --out "$WORK/paper-aligned" --no-progress
"$BIN/minicache-calibrate" --data "$CALIB" --no-align --max-group-size 2 --out "$WORK/pairs-unaligned" \
  --no-progress
cp "$WORK/pairs-unaligned/minicache_config.yaml" "$OUT/pairs-unaligned.yaml"

for prefix in 512 2048; do
  windows=16; [[ $prefix -gt 512 ]] && windows=4
  common=(--prefix-length "$prefix" --continuation-length 256 --num-windows "$windows")
  evaluate "shipped-$prefix" --profile profiles/smollm2-135m-instruct "${common[@]}"
  evaluate "pairs-unaligned-$prefix" --profile "$WORK/pairs-unaligned" "${common[@]}"
  evaluate "paper-$prefix" --preset paper "${common[@]}"
  evaluate "paper-aligned-$prefix" --profile "$WORK/paper-aligned" "${common[@]}"
done

# Time: 64 calibration windows of 512 tokens (plus 8 held-out) from the licences not in eval.txt.
for name in GPL-1 GPL-3 LGPL-2 LGPL-3 GFDL-1.2 GFDL-1.3 MPL-1.1 MPL-2.0 Artistic BSD CC0-1.0; do
  "$BIN/python" -c 'import json, sys; print(json.dumps({"text": open(sys.argv[1]).read()}))' "$L/$name"
done >"$WORK/timing.jsonl"
start=$(date +%s)
"$BIN/minicache-calibrate" --data "$WORK/timing.jsonl" --num-samples 64 --max-length 512 \
  --out "$WORK/timing" --no-progress
echo "calibration of 64 x 512 tokens: $(( $(date +%s) - start )) s wall"
