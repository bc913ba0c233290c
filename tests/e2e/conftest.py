"""Shared fixtures for tests against a real ComfyUI server (scripts/comfy_host.py).

One server per session, started with an isolated ``--base-directory`` under pytest's tmp dir
(models/, output/, custom_nodes/ with this pack linked, its own database), so nothing outside
the tmp dir is written. The tiny SD1.5 checkpoint is built once and cached under
``<repo>/.cache/`` keyed by the hash of the script that makes it.

If ComfyUI cannot be installed (no registry, no ``$COMFYUI_DIR``) every test using these
fixtures is skipped with the reason; ``REQUIRE_COMFYUI=1`` (for CI) makes that a failure.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import requests

from scripts import comfy_host
from tests.conftest import TINY_CKPT_NAME

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
def tiny_sd15_name() -> str:
    """The tiny checkpoint's name as ComfyUI lists it (ckpt_name of CheckpointLoaderSimple)."""
    return TINY_CKPT_NAME


@pytest.fixture(scope="session")
def comfy_base_dir(
    tmp_path_factory: pytest.TempPathFactory, comfy_root: Path, tiny_sd15_checkpoint: Path
) -> Path:
    """An isolated ComfyUI base directory with the tiny checkpoint in models/checkpoints and the test-only
    Tiny Family Loader node (tests/tiny_family_node) in custom_nodes."""
    base = comfy_host.prepare_base_dir(comfy_root, tmp_path_factory.mktemp("comfy_base"))
    (base / "models" / "checkpoints" / TINY_CKPT_NAME).symlink_to(tiny_sd15_checkpoint)
    (base / "custom_nodes" / "lora_trainer_tiny_families").symlink_to(Path(__file__).parents[1] / "tiny_family_node")
    return base


@pytest.fixture(scope="session")
def comfy_server(comfy_root: Path, comfy_base_dir: Path):
    with comfy_host.start_server(comfy_root, base_dir=comfy_base_dir) as server:
        yield server


@pytest.fixture(scope="session")
def comfy_client(comfy_server: comfy_host.Server) -> ComfyClient:
    return ComfyClient(comfy_server)
