#!/usr/bin/env bash
# Wheels of the transformers we require, for a device machine whose Python has an older one and no
# internet (the lent H200 had transformers 5.17, which ignores `cache=` and broke the kernel test and
# the serving bench). Run here, where PyPI answers; then carry the folder to the device:
#
#   bash scripts/device_wheels.sh            # -> .device-wheels/ (about 32 MB; git-ignored)
#   run(command="bash benchmarks/gpu_results.sh", carry=[".device-wheels"])
#
# benchmarks/gpu_results.sh installs them into a venv over the device's own packages (torch, triton
# stay the device's) when its transformers is older than we require. PY_VERSION: the device's Python.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PIP=${PIP:-.venv/bin/pip}
VERSION=$(sed -n 's/.*"transformers>=\([0-9.]*\).*/\1/p' pyproject.toml | head -1)
rm -rf .device-wheels && mkdir .device-wheels
"$PIP" download "transformers==$(.venv/bin/python -c 'import transformers; print(transformers.__version__)')" \
  --python-version "${PY_VERSION:-3.12}" --only-binary=:all: --platform manylinux_2_28_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .device-wheels -q
rm -f .device-wheels/numpy-*  # the device's torch brings its own
echo "transformers (>= $VERSION required) and its dependencies in .device-wheels: $(du -sh .device-wheels | cut -f1)"
