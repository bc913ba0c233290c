"""Fixtures shared by tests/comfy (ComfyUI in-process) and tests/e2e (a real server): a ComfyUI
install and the tiny random SD1.5 checkpoint.

If ComfyUI cannot be installed (no registry, no ``$COMFYUI_DIR``) the tests using these fixtures
are skipped with the reason; ``REQUIRE_COMFYUI=1`` (CI sets it) makes that a failure.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import comfy_host

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO_ROOT / ".cache"
ASSETS_SCRIPT = REPO_ROOT / "scripts" / "make_demo_assets.py"
TINY_CKPT_NAME = "tiny_sd15.safetensors"
CKPT_BUILD_TIMEOUT_S = 600


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
    """The tiny random SD1.5 checkpoint, cached by the content hash of make_demo_assets.py and
    built in a subprocess so that this process never imports ComfyUI."""
    digest = hashlib.sha256(ASSETS_SCRIPT.read_bytes()).hexdigest()[:16]
    path = CACHE_DIR / f"tiny_sd15-{digest}.safetensors"
    if not path.is_file():
        partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.safetensors")
        subprocess.run(
            [sys.executable, str(ASSETS_SCRIPT), "checkpoint", str(partial)],
            check=True,
            timeout=CKPT_BUILD_TIMEOUT_S,
            cwd=REPO_ROOT,
        )
        partial.replace(path)  # atomic: a concurrent session sees the whole file or none
        for stale in CACHE_DIR.glob("tiny_sd15-*.safetensors"):  # ~450 MB each
            if stale != path and ".partial" not in stale.name:
                stale.unlink(missing_ok=True)
    return path


