"""Fixtures shared by tests/comfy (ComfyUI in-process) and tests/e2e (a real server): a ComfyUI
install and the tiny random SD1.5 checkpoint.

If ComfyUI cannot be installed (no registry, no ``$COMFYUI_DIR``) the tests using these fixtures
are skipped with the reason; ``REQUIRE_COMFYUI=1`` (CI sets it) makes that a failure.
"""

from __future__ import annotations

import os
import subprocess
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
        return comfy_host.comfy_root()
    except (OSError, subprocess.CalledProcessError) as exc:
        reason = (
            f"ComfyUI cannot be installed here ({type(exc).__name__}: {exc}); set $COMFYUI_DIR to an install"
        )
        if os.environ.get("REQUIRE_COMFYUI") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def tiny_sd15_checkpoint(comfy_root: Path) -> Path:
    """The tiny random SD1.5 checkpoint (built once, cached in .cache/)."""
    return cached_tiny_sd15(CACHE_DIR)
