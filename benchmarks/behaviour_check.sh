#!/usr/bin/env bash
# Does this checkout reproduce the README's figures? For refactorings that must not change behaviour.
#
#   OUT=/tmp/before bash benchmarks/behaviour_check.sh           # on the code before a change (~25 min)
#   REF=/tmp/before OUT=/tmp/after bash benchmarks/behaviour_check.sh   # after it: compare with that run
#   QUICK=1 ...                                                  # calibration + 512-token evaluations only
#
# 1. Re-calibrates the shipped profile (same data, seed and defaults as
#    profiles/smollm2-135m-instruct/) with minicache-calibrate.
# 2. Re-runs minicache-eval on the README's held-out text (Apache-2.0 + GPL-2 + LGPL-2.1) with the
#    settings of the committed results: benchmarks/results/calibration-cpu (shipped profile, paper
#    preset, paper + alignment at 512 and 2,048 tokens), compare-cpu (the comparison table) and
#    quantized-cpu (bf16, 4,096 tokens).
# With REF (the OUT of an earlier run, e.g. of the code before a refactoring, on the same machine):
# the calibrated profile must have the same content, bit-identical tensors and byte-identical report
# (benchmarks/compare_profiles.py: profiles of older formats are read by this code), and every number
# must agree within relative 1e-6 (benchmarks/compare_results.py). Without REF, the numbers are
# compared with the committed results, which were measured on other machines: expect float
# differences around 1e-5 there (the calibration decisions and README figures are the same).
# Exit status 1 if anything differs. Outputs go to $OUT (default: a temporary directory, kept).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=${PYTHONPATH:-.}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
OUT=${OUT:-$(mktemp -d /tmp/behaviour-check.XXXXXX)}
mkdir -p "$OUT"
L=/usr/share/common-licenses
cat "$L/Apache-2.0" "$L/GPL-2" "$L/LGPL-2.1" >"$OUT/eval.txt"
SHIPPED=profiles/smollm2-135m-instruct
R=benchmarks/results
failed=0
check() {  # committed reference, new, [compare_results.py options]: REF's own file of the same name when REF is set
  local ref=$1 new=$2
  shift 2
  [[ -n ${REF:-} ]] && ref="$REF/$(basename "$new")"
  "$PY" benchmarks/compare_results.py "$ref" "$new" "$@" || failed=1
}
echo "code: $("$PY" -c 'import minicache, os; print(os.path.dirname(minicache.__file__))'); out: $OUT"

echo "== minicache-calibrate --data $SHIPPED/calibration-data.jsonl (the shipped profile's calibration)"
"$PY" -m minicache.calibrate.cli --data "$SHIPPED/calibration-data.jsonl" --out "$OUT/calibrated" \
  --no-progress --force >"$OUT/calibrate.log" 2>&1 || { cat "$OUT/calibrate.log"; exit 1; }
tail -n 1 "$OUT/calibrate.log"
if [[ -n ${REF:-} ]]; then PROFILE_REF=$REF/calibrated; else PROFILE_REF=$SHIPPED; fi
"$PY" benchmarks/compare_profiles.py "$PROFILE_REF" "$OUT/calibrated" || failed=1

evaluate() {  # reference json, then minicache-eval arguments
  local ref=$1; shift
  local name
  name=$(basename "$(dirname "$ref")")-$(basename "$ref")
  "$PY" -m minicache.evaluate.cli --data "$OUT/eval.txt" --json "$@" >"$OUT/$name" 2>"$OUT/$name.log" \
    || { cat "$OUT/$name.log"; failed=1; return; }
  check "$ref" "$OUT/$name"
}
C=(--prefix-length 512 --continuation-length 256 --num-windows 16)
evaluate "$R/calibration-cpu/shipped-512.json" --profile "$SHIPPED" "${C[@]}"
evaluate "$R/calibration-cpu/paper-512.json" --preset paper "${C[@]}"
"$PY" -m minicache.evaluate.cli --compare "full,paper,average,$SHIPPED,$R/compare-cpu/paper-aligned" \
  --data "$OUT/eval.txt" --prefix-length 512 --continuation-length 256 --num-windows 8 \
  --json-out "$OUT/compare-512.json" --force >/dev/null 2>"$OUT/compare-512.log" || { cat "$OUT/compare-512.log"; failed=1; }
# A profile's one-line description says "per-group settings" since the plug-in redesign (it said
# "per-group t/gamma"): text, not a figure.
check "$R/compare-cpu/compare-512.json" "$OUT/compare-512.json" --ignore describe
if [[ -z ${QUICK:-} ]]; then
  C=(--prefix-length 2048 --continuation-length 256 --num-windows 4)
  evaluate "$R/calibration-cpu/shipped-2048.json" --profile "$SHIPPED" "${C[@]}"
  evaluate "$R/calibration-cpu/paper-aligned-2048.json" --profile "$R/compare-cpu/paper-aligned" "${C[@]}"
  Q=(--dtype bfloat16 --prefix-length 4096 --continuation-length 128 --num-windows 2 --batch-size 2)
  evaluate "$R/quantized-cpu/shipped-4bit.json" --profile "$SHIPPED" --kv-bits 4 "${Q[@]}"
  evaluate "$R/quantized-cpu/minicache-4bit.json" --preset paper --kv-bits 4 "${Q[@]}"
  evaluate "$R/quantized-cpu/2bit-g64.json" --preset none --kv-bits 2 --kv-group-size 64 "${Q[@]}"
fi
if [[ $failed -eq 0 ]]; then echo "behaviour check: everything reproduces"; else echo "behaviour check: DIFFERENCES above"; fi
exit $failed
