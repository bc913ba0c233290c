"""ComfyUI inside this process: its real modules, with this pack loaded by its own custom-node loader and
its folders (input, output, temp, models/loras, models/checkpoints) under ``base``. For tests and benchmarks."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_comfy(root: Path, base: Path, cpu: bool = True):
    """Import ComfyUI from ``root`` and return its ``nodes`` module with this pack registered."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu  # importing model_management on a CUDA build of torch probes for a GPU
    comfy.cli_args.args.use_pytorch_cross_attention = True
    import folder_paths
    import nodes

    for name in ("input", "output", "temp", "loras", "checkpoints"):
        (base / name).mkdir(parents=True, exist_ok=True)
    folder_paths.set_input_directory(str(base / "input"))
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_temp_directory(str(base / "temp"))
    for kind in ("loras", "checkpoints"):
        folder_paths.folder_names_and_paths[kind] = ([str(base / kind)], folder_paths.supported_pt_extensions)
    if not any(k.startswith("LoraTrainer") for k in nodes.NODE_CLASS_MAPPINGS):
        if not asyncio.run(nodes.load_custom_node(str(REPO_ROOT))):
            raise RuntimeError(f"ComfyUI could not load the pack at {REPO_ROOT}; see the log above")
    return nodes


def loaded_pack(nodes):
    """The pack as ComfyUI loaded it (its package module): the one identity of every engine and glue class in
    this process. Tests and scripts reach ``training`` and ``glue`` through it, never by importing them anew."""
    return sys.modules[nodes.NODE_CLASS_MAPPINGS["LoraTrainerTrain"].__module__.rsplit(".", 2)[0]]


def run_node(nodes, node_id: str, **inputs):
    """Execute one node the way ComfyUI's executor does (its own node-calling code, inside
    torch.inference_mode, with the executing-node context set); the node's outputs tuple."""
    import execution
    import torch

    cls = nodes.NODE_CLASS_MAPPINGS[node_id]
    with torch.inference_mode():
        (out,) = asyncio.run(execution._async_map_node_over_list(
            "in-process", node_id, cls(), {name: [value] for name, value in inputs.items()}, cls.FUNCTION))
    if isinstance(out, dict):  # dict-style nodes with a UI part
        return out["result"]
    return out.result if hasattr(out, "result") else out
