#!/usr/bin/env bash
# Set up Orchestrator on a machine with only python3 (>= 3.11): a .venv with the project
# and its dev extra, and the compiled hot paths. Idempotent: a second run only reinstalls
# when pyproject.toml changed, and only recompiles when their source changed.
#   ./setup.sh        set up
#   ./setup.sh test   set up, then run the whole test suite (what CI runs)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.installed

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "error: Orchestrator needs Python 3.11 or newer, and $PYTHON is not installed (Debian/Ubuntu: sudo apt install python3 python3-venv)" >&2
    exit 2
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "error: Orchestrator needs Python 3.11 or newer ($PYTHON is $("$PYTHON" --version 2>&1))" >&2
    exit 2
fi

if [ ! -x "$VENV/bin/python" ]; then
    # Debian and Ubuntu ship venv and ensurepip apart from python3 itself.
    if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
        minor=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
        echo "error: $PYTHON -m venv is missing; install it (Debian/Ubuntu: sudo apt install python${minor}-venv), then run this again" >&2
        exit 2
    fi
    echo "creating $VENV (first use: this takes a minute)" >&2
    "$PYTHON" -m venv "$VENV"
fi

want=$(cat pyproject.toml | "$VENV/bin/python" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
    echo "installing Orchestrator and its dev tools into $VENV" >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
    # -qq: errors only (not the build backend's notes about editable installs)
    "$VENV/bin/python" -m pip install -qq -e ".[dev]" >&2
    echo "$want" > "$STAMP"
fi

# The broker's hot modules compiled with mypyc (broker/native.py): about 30% less broker
# CPU per task. Only when the source changed since the last build; without a C compiler
# everything still runs, as plain Python.
if ! "$VENV/bin/python" -m broker.native build --if-needed >&2; then
    echo "warning: could not compile the hot paths; running them as plain Python" >&2
fi

case "${1:-}" in
    "") echo "ready: ./orchestrator.sh --help" >&2 ;;
    test) shift; exec "$VENV/bin/python" -m pytest -q "$@" ;;
    *) echo "usage: ./setup.sh [test [PYTEST ARGS...]]" >&2; exit 2 ;;
esac
