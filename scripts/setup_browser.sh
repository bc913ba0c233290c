#!/usr/bin/env bash
# What the real-browser test needs besides Playwright (requirements-dev.txt): Debian's chromium, no browser download.
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
