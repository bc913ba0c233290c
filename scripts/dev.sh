#!/usr/bin/env bash
# The two commands of the README, on a fresh machine or an existing checkout:
#   bash scripts/dev.sh demo   # set up, then train the tiny demo LoRA through a real ComfyUI server
#   bash scripts/dev.sh test   # set up, then lint and run every test (unit, in-process ComfyUI, e2e, browser)
# Set-up is idempotent: a venv in .venv, torch, the pack's requirements, a ComfyUI from the package
# registry (or $COMFYUI_DIR), and for the tests Debian's chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
command="${1:-}"
case "$command" in demo | test) ;; *) echo "usage: bash scripts/dev.sh demo|test" >&2; exit 2 ;; esac

PY=.venv/bin/python
if [ ! -x "$PY" ]; then
  python3 -m venv .venv
fi
if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
  "$PY" -m pip install --quiet torch==2.14.1 torchvision==0.29.1
fi
"$PY" -m pip install --quiet -r requirements-dev.txt
"$PY" scripts/comfy_host.py install --install-requirements >/dev/null

if [ "$command" = demo ]; then
  exec "$PY" scripts/demo.py
fi

bash scripts/setup_browser.sh
"$PY" -m ruff check .
exec "$PY" -m pytest -q "${@:2}"
