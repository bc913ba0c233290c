"""ComfyUI in-process: its real modules, our pack loaded by its own custom-node loader, folders in tmp.

Nodes are called through ComfyUI's own executor code (``execution._async_map_node_over_list``, inside
``torch.inference_mode()``), on the tiny random SD1.5 checkpoint loaded by the stock loader.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scripts.comfy_inproc import load_comfy, loaded_pack, run_node
from scripts.make_demo_assets import make_demo_dataset
from tests.conftest import TINY_CKPT_NAME

__all__ = ["run_node"]


@pytest.fixture(scope="session")
def comfy(comfy_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """ComfyUI's ``nodes`` module with this pack registered; its folders under tmp (``nodes.base``)."""
    base = tmp_path_factory.mktemp("comfy_inproc")
    nodes = load_comfy(comfy_root, base, cpu=not torch.cuda.is_available())  # bench/gpu.sh runs them on CUDA
    nodes.base = base
    return nodes


@pytest.fixture(scope="session")
def pack(comfy):
    """The pack's package as ComfyUI loaded it: ``pack.training``, ``pack.glue``."""
    return loaded_pack(comfy)


@pytest.fixture(scope="session")
def sd15(comfy, tiny_sd15_checkpoint: Path):
    """(MODEL, CLIP, VAE) of the tiny SD1.5 checkpoint, loaded by the stock CheckpointLoaderSimple."""
    link = comfy.base / "checkpoints" / TINY_CKPT_NAME
    if not link.exists():
        link.symlink_to(tiny_sd15_checkpoint)
    return run_node(comfy, "CheckpointLoaderSimple", ckpt_name=TINY_CKPT_NAME)[:3]


@pytest.fixture(scope="session")
def demo_folder(comfy) -> Path:
    folder = comfy.base / "input" / "rings"
    make_demo_dataset(folder, count=4, size=128)
    return folder
