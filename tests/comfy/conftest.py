"""ComfyUI in-process: its real modules, our pack loaded by its own custom-node loader, folders in tmp.

Nodes are called the way ComfyUI's executor calls them (``getattr(node, FUNCTION)(**inputs)`` inside
``torch.inference_mode()``), on the tiny random SD1.5 checkpoint loaded by the stock loader.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
import torch

from scripts.make_demo_assets import make_demo_dataset
from tests.conftest import REPO_ROOT, TINY_CKPT_NAME


@pytest.fixture(scope="session")
def comfy(comfy_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """ComfyUI's ``nodes`` module with this pack registered; models/input/output folders under tmp."""
    if str(comfy_root) not in sys.path:
        sys.path.insert(0, str(comfy_root))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # importing model_management on this CUDA build would probe a GPU
    comfy.cli_args.args.use_pytorch_cross_attention = True
    import folder_paths

    import nodes

    base = tmp_path_factory.mktemp("comfy_inproc")
    for name in ("input", "output", "temp", "loras", "checkpoints"):
        (base / name).mkdir()
    folder_paths.set_input_directory(str(base / "input"))
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_temp_directory(str(base / "temp"))
    folder_paths.folder_names_and_paths["loras"] = ([str(base / "loras")], folder_paths.supported_pt_extensions)
    folder_paths.folder_names_and_paths["checkpoints"] = ([str(base / "checkpoints")],
                                                          folder_paths.supported_pt_extensions)
    if not any(k.startswith("LoraTrainer") for k in nodes.NODE_CLASS_MAPPINGS):
        assert asyncio.run(nodes.load_custom_node(str(REPO_ROOT))), "the pack failed to load"
    nodes.base = base
    return nodes


def run_node(comfy, node_id: str, **inputs):
    """Execute one node as ComfyUI does; returns its outputs tuple (``result`` of a ui dict)."""
    cls = comfy.NODE_CLASS_MAPPINGS[node_id]
    with torch.inference_mode():
        out = getattr(cls(), cls.FUNCTION)(**inputs)
    return out["result"] if isinstance(out, dict) else out


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
