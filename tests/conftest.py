"""Fixtures shared by tests/comfy (ComfyUI in-process) and tests/e2e (a real server): the ComfyUI host
and the tiny random SD1.5 checkpoint.

``scripts/run_tests.py`` runs these suites once per host, in the host's own venv, with ``$COMFYUI_DIR`` naming
its folder. Run elsewhere (no ComfyUI, or a Python without its requirements), the tests using these fixtures
are skipped with the reason; ``REQUIRE_COMFYUI=1`` (CI sets it) makes that a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import comfy_host
from scripts.make_demo_assets import cached_tiny_sd15

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO_ROOT / ".cache"
TINY_CKPT_NAME = "tiny_sd15.safetensors"


@pytest.fixture(scope="session")
def comfy_root() -> Path:
    try:
        root = comfy_host.comfy_root()
        missing = comfy_host.missing_requirements(root)
        if missing:
            raise ImportError(f"this Python ({sys.executable}) lacks {missing} of {root}/requirements.txt")
        return root
    except (OSError, ImportError, subprocess.CalledProcessError) as exc:
        reason = (f"no ComfyUI host here ({type(exc).__name__}: {exc}); run `bash scripts/dev.sh test`, which "
                  f"runs these tests on every host in its own venv")
        if os.environ.get("REQUIRE_COMFYUI") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def tiny_sd15_checkpoint(comfy_root: Path) -> Path:
    """The tiny random SD1.5 checkpoint (built once, cached in .cache/)."""
    return cached_tiny_sd15(CACHE_DIR)
