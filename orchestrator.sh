#!/usr/bin/env bash
# Run the orchestrator CLI, setting up .venv first if it is missing.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ ! -x "$here/.venv/bin/orchestrator" ]; then
    "$here/setup.sh" >&2
fi
exec "$here/.venv/bin/orchestrator" "$@"
