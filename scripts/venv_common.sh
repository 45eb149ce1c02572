# Sourced by scripts/setup.sh and scripts/setup_vllm.sh, after they set VENV (the venv's folder), PY
# ($VENV/bin/python) and say (how they print):
#
#   ensure_venv            creates $VENV with $PYTHON, else python3.11, else python3, with pip
#   pip_install ARGS...    pip install into $VENV, showing what it fetches and installs
#   version_of DIST        the installed version of a distribution ("" when absent)

ensure_venv() {
  if [[ ! -x "$PY" ]]; then
    local base="${PYTHON:-}"
    if [[ -z "$base" ]]; then
      if command -v python3.11 >/dev/null 2>&1; then base=python3.11; else base=python3; fi
    fi
    say "creating $VENV with $("$base" --version 2>&1)"
    "$base" -m venv "$VENV"
  fi
  if ! "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m ensurepip --upgrade >/dev/null
  fi
}

# pip's configuration on our machines names local index folders that may be missing; its
# "Location ... is ignored" warnings about them are noise and filtered out. What pip fetches and
# installs shows as it happens (a fresh set-up takes a few minutes); errors still show, and pip's
# exit status is the function's.
pip_install() {
  "$PY" -m pip install --disable-pip-version-check --progress-bar off "$@" 2>&1 \
    | { grep --line-buffered -v -E "^WARNING: Location 'file:[^']*' is ignored|^Requirement already satisfied|^  (Using cached|Downloading|Obtaining|Preparing|Building|Checking|Getting|Created|Stored)" || true; } \
    | sed -u 's/^/  pip: /'
  return "${PIPESTATUS[0]}"
}

# Versions come from package metadata: importing torch would take seconds on every run.
version_of() { "$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1" 2>/dev/null || true; }
