#!/usr/bin/env bash
# What the real-browser test needs: Debian's chromium (no browser download) and the Playwright driver.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
.venv/bin/python -m pip install --quiet "playwright>=1.45"
