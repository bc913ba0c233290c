"""One identity per class in a ComfyUI process: the pack is loaded once, by ComfyUI's own custom-node loader, and
tests reach the engine through it; ComfyUI's ``nodes`` module is ComfyUI's (the glue package is ``glue``)."""

from __future__ import annotations

import sys
from pathlib import Path


def test_the_engine_is_loaded_once_and_nodes_is_comfyuis(comfy, pack, comfy_root):
    assert sys.modules["nodes"] is comfy and Path(comfy.__file__).resolve().parent == comfy_root.resolve()
    copies = sorted(name for name in sys.modules if name.split(".")[-2:] == ["training", "config"])
    assert copies == [f"{pack.__name__}.training.config"]
    assert not {name.split(".")[0] for name in sys.modules} & {"training", "glue"}
