#!/usr/bin/env bash
# A decode step of the vLLM plugin's stores and their attention (no engine), an older commit against the working
# tree, alternating run by run: integrations/vllm/bench/step_profile.py's unprofiled time per step.
#
#   bash benchmarks/vllm_step_ab.sh BASE [ROUNDS] [step_profile options]   # ~1 minute a round on 2 idle cores
#
# Default options: --quantized --requests 10 --tokens 600 --steps 8 (the shipped profile + 4-bit KIVI, 10
# requests decoding together), one thread and glibc's mmap/trim thresholds raised (steady timings on this VM).
# The base commit's code runs from a git worktree by PYTHONPATH.
set -euo pipefail
BASE=${1:?usage: vllm_step_ab.sh BASE [ROUNDS] [step_profile options]}
ROUNDS=${2:-4}
shift $(( $# < 2 ? $# : 2 ))
OPTIONS=("$@")
[[ ${#OPTIONS[@]} -gt 0 ]] || OPTIONS=(--quantized --requests 10 --tokens 600 --steps 8)
export OMP_NUM_THREADS=1
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
export MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=268435456
HERE=$(pwd)
TREE="$WORK/base"
git worktree add -q --detach "$TREE" "$BASE"
trap 'git -C "$HERE" worktree remove --force "$TREE"; rm -rf "$WORK"' EXIT
machine_line
echo "step_profile.py ${OPTIONS[*]}, MALLOC_MMAP_THRESHOLD_=$MALLOC_MMAP_THRESHOLD_ MALLOC_TRIM_THRESHOLD_=$MALLOC_TRIM_THRESHOLD_"
for round in $(seq "$ROUNDS"); do
  for tree in "$TREE" "$HERE"; do
    label=new; [[ $tree == "$TREE" ]] && label="base ($BASE)"
    (cd "$tree" && PYTHONPATH=.:integrations/vllm "$HERE/.venv-vllm/bin/python" integrations/vllm/bench/step_profile.py \
       "${OPTIONS[@]}" 2>/dev/null | grep unprofiled | sed "s/^/round $round $label: /")
  done
done
