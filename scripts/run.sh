#!/usr/bin/env bash
# The main job (README): set up the environment, then calibrate the built-in model.
#
#   bash scripts/run.sh                       # minicache-calibrate with no arguments
#   bash scripts/run.sh --data sample.jsonl   # extra arguments go to minicache-calibrate
#
# With no arguments this calibrates SmolLM2-135M-Instruct (built in) on the built-in corpus (real
# prose, docs, code and chat; about 4 minutes on 2 cores), writes ./minicache-smollm2-135m/minicache_config.yaml plus a report,
# and prints where they went; a second run replaces them. With arguments, they go to
# minicache-calibrate as given (an existing --out is then kept unless you pass --force).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
if [[ $# -eq 0 ]]; then
  # The main job owns its output folder (./minicache-smollm2-135m/, ignored by git): running it
  # again replaces the previous run's profile and report instead of refusing to.
  exec "$ROOT/.venv/bin/minicache-calibrate" --force
fi
exec "$ROOT/.venv/bin/minicache-calibrate" "$@"
