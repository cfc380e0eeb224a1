#!/usr/bin/env bash
# One entry point that does all set-up on a fresh machine, then runs what you ask for.
#
#   scripts/quickstart.sh demo [pipeline demo options]   # label + train end to end on the built-in default
#   scripts/quickstart.sh test [pytest options]          # the test suite (what CI runs)
#
# Set-up: a virtualenv in .venv (override with KD_VENV) with the CPU build of torch installed first (a bare
# `torch` requirement would pull a multi-GB CUDA build), then this project with its dev extras. It is redone
# only when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${KD_VENV:-.venv}"
stamp="$venv/.kd-pipeline-installed"
if [ ! -x "$venv/bin/python" ] || [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setting up $venv (torch CPU build + kd-pipeline[dev]); this happens once" >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0 2> >(grep -v "^WARNING: Location" >&2)
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev]" 2> >(grep -v "^WARNING: Location" >&2)
  touch "$stamp"
fi
cmd="${1:-}"
shift || true
case "$cmd" in
  demo) exec "$venv/bin/pipeline" demo "$@" ;;
  test) exec "$venv/bin/python" -m pytest "$@" ;;
  *) echo "usage: scripts/quickstart.sh demo|test [options]" >&2; exit 2 ;;
esac
