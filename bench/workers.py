"""Benchmarks measure each case in its own process, so that a peak is that run's own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_worker(script: str, what: str, *args: str) -> dict:
    """Run ``script`` with ``args`` in a fresh interpreter; its last line of output, a JSON object."""
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=REPO_ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
