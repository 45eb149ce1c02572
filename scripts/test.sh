#!/usr/bin/env bash
# The test command (README, CI): set up the environment, then run the fast test suite.
#
#   bash scripts/test.sh             # tests not marked slow
#   bash scripts/test.sh -k models   # extra arguments go to pytest
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash "$ROOT/scripts/setup.sh"

status=0
"$ROOT/.venv/bin/python" -m pytest -m "not slow" -q "$@" || status=$?
if [[ $status -eq 5 ]]; then
  echo "test.sh: pytest collected no tests (exit code 5); check the arguments and the tests/ folder" >&2
  exit 1
fi
exit "$status"
