# Sourced first by the benchmark scripts that make results/ (after `set -euo pipefail`):
#
#   source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
#
# Moves to the repository root; PY = the interpreter ($PYTHON, else .venv/bin/python); PYTHONPATH = this
# checkout's code, whatever the environment has installed; OMP_NUM_THREADS = 2 unless set (the 2-core
# machines the results come from: one torch job at a time, never two); WORK = a scratch folder removed
# on exit; machine_line prints the line every log opens with.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

machine_line() {
  # The CPU model and whether it has bf16 instructions: bfloat16 models (vLLM's runs) are several
  # times slower without them, so timings compare only within one run, or on the same kind of CPU.
  local cpu bf16=no
  cpu="$(grep -m1 "model name" /proc/cpuinfo 2>/dev/null | cut -d: -f2 | sed 's/^ *//')"
  grep -qE "avx512_bf16|amx_bf16" /proc/cpuinfo 2>/dev/null && bf16=yes
  echo "machine: $(nproc --all) CPU cores (OMP_NUM_THREADS=$OMP_NUM_THREADS), $(uname -m), ${cpu:-unknown CPU}, bf16 instructions: $bf16; $(date -u +%F); commit $(git rev-parse --short HEAD)"
}
