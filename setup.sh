#!/usr/bin/env bash
# Set up Orchestrator on a machine with only python3 (>= 3.11): a .venv with the project
# and its dev extra. Idempotent: a second run only reinstalls when pyproject.toml changed.
#   ./setup.sh        set up
#   ./setup.sh test   set up, then run the whole test suite (what CI runs)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.installed

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "error: Orchestrator needs Python 3.11 or newer ($PYTHON is $("$PYTHON" --version 2>&1))" >&2
    exit 2
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi

want=$(cat pyproject.toml | "$VENV/bin/python" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
    echo "installing Orchestrator and its dev tools into $VENV" >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
    "$VENV/bin/python" -m pip install --quiet -e ".[dev]" >&2
    echo "$want" > "$STAMP"
fi

case "${1:-}" in
    "") echo "ready: ./orchestrator.sh --help" >&2 ;;
    test) shift; exec "$VENV/bin/python" -m pytest -q "$@" ;;
    *) echo "usage: ./setup.sh [test [PYTEST ARGS...]]" >&2; exit 2 ;;
esac
