"""Shared fixtures for tests against a real ComfyUI server (scripts/comfy_host.py).

One server per session, started with an isolated ``--base-directory`` under pytest's tmp dir
(models/, output/, custom_nodes/ with this pack linked, its own database), so nothing outside
the tmp dir is written. The tiny SD1.5 checkpoint is built once and cached under
``<repo>/.cache/`` keyed by the hash of the script that makes it.

If ComfyUI cannot be installed (no registry, no ``$COMFYUI_DIR``) every test using these
fixtures is skipped with the reason; ``REQUIRE_COMFYUI=1`` (for CI) makes that a failure.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

from scripts import comfy_host

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO_ROOT / ".cache"
ASSETS_SCRIPT = REPO_ROOT / "scripts" / "make_demo_assets.py"
TINY_CKPT_NAME = "tiny_sd15.safetensors"
CKPT_BUILD_TIMEOUT_S = 600
PROMPT_TIMEOUT_S = 300.0


class ComfyClient:
    """The few HTTP calls the tests make; failures carry the server log's tail."""

    def __init__(self, server: comfy_host.Server):
        self.server = server
        self.url = server.url
        self.client_id = uuid.uuid4().hex

    def get(self, path: str) -> dict:
        response = requests.get(self.url + path, timeout=30)
        response.raise_for_status()
        return response.json()

    def queue(self, graph: dict) -> str:
        """POST an API-format graph to /prompt and return its prompt_id."""
        response = requests.post(
            self.url + "/prompt", json={"prompt": graph, "client_id": self.client_id}, timeout=30
        )
        body = response.json()
        if response.status_code != 200 or body.get("node_errors"):
            raise AssertionError(f"/prompt refused the graph ({response.status_code}): {body}")
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout_s: float = PROMPT_TIMEOUT_S) -> dict:
        """Poll /history/<prompt_id> until the prompt is done; return its entry, which must
        have succeeded."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.server.alive():
                raise AssertionError(f"ComfyUI exited while running {prompt_id}:\n{self.server.log_tail()}")
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry is not None:  # ComfyUI adds the entry when the prompt has finished
                status = entry.get("status", {})
                if status.get("status_str") != "success":
                    raise AssertionError(
                        f"prompt {prompt_id} failed: {status.get('messages')}\n{self.server.log_tail()}"
                    )
                return entry
            time.sleep(0.25)
        raise AssertionError(
            f"prompt {prompt_id} not done after {timeout_s:.0f} s:\n{self.server.log_tail()}"
        )

    def run(self, graph: dict, timeout_s: float = PROMPT_TIMEOUT_S) -> dict:
        return self.wait(self.queue(graph), timeout_s)


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


@pytest.fixture(scope="session")
def tiny_sd15_name() -> str:
    """The tiny checkpoint's name as ComfyUI lists it (ckpt_name of CheckpointLoaderSimple)."""
    return TINY_CKPT_NAME


@pytest.fixture(scope="session")
def comfy_base_dir(
    tmp_path_factory: pytest.TempPathFactory, comfy_root: Path, tiny_sd15_checkpoint: Path
) -> Path:
    """An isolated ComfyUI base directory with the tiny checkpoint in models/checkpoints."""
    base = comfy_host.prepare_base_dir(comfy_root, tmp_path_factory.mktemp("comfy_base"))
    (base / "models" / "checkpoints" / TINY_CKPT_NAME).symlink_to(tiny_sd15_checkpoint)
    return base


@pytest.fixture(scope="session")
def comfy_server(comfy_root: Path, comfy_base_dir: Path):
    with comfy_host.start_server(comfy_root, base_dir=comfy_base_dir) as server:
        yield server


@pytest.fixture(scope="session")
def comfy_client(comfy_server: comfy_host.Server) -> ComfyClient:
    return ComfyClient(comfy_server)
