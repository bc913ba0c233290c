"""Fault injection for the reliability tests (tests/e2e/test_reliability.py), active only in a server started
with ``$LORA_TRAINER_FAULTS`` (a folder). The test arms a pause point by writing ``<point>.armed``; the server
process stops there, writes ``<point>.reached`` and waits until the prompt is cancelled (POST /interrupt) or the
test writes ``<point>.release`` — or the test kills it (kill -9). Points:

- ``train``: the N-th forward of a diffusion model with gradients on (N = the armed file's text), i.e. inside
  training step N;
- ``text``: the next forward of a CLIP text model, i.e. while Encode Latents Cache encodes captions;
- ``replace``: the next rename of a temporary file over a target whose path contains the armed file's text: the
  data is written, the rename has not happened (a save, a checkpoint, a cache entry);
- ``node``: the Pause Here node, placed between two nodes of a graph.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

FAULTS = Path(os.environ["LORA_TRAINER_FAULTS"])
DIFFUSION_MODELS = ("UNetModel", "MMDiT", "Flux", "QwenImageTransformer2DModel")
TEXT_MODELS = ("CLIPTextModel_", "CLIPTextModel")
_counts: dict[str, int] = {}


def _take(point: str) -> str | None:
    """The armed file's text, removing the file, or None when ``point`` is not armed."""
    armed = FAULTS / f"{point}.armed"
    try:
        text = armed.read_text()
    except FileNotFoundError:
        return None
    armed.unlink()
    return text


def pause(point: str, timeout_s: float = 120.0) -> None:
    import comfy.model_management as mm

    release = FAULTS / f"{point}.release"
    (FAULTS / f"{point}.reached").write_text(str(os.getpid()))
    deadline = time.monotonic() + timeout_s
    while not (mm.processing_interrupted() or release.exists()) and time.monotonic() < deadline:
        time.sleep(0.02)
    release.unlink(missing_ok=True)


def _forward_pre_hook(module: torch.nn.Module, args) -> None:
    name = type(module).__name__
    if name in DIFFUSION_MODELS and torch.is_grad_enabled():
        armed = _take("train")
        if armed is not None:
            _counts["train"] = int(armed)
        if "train" in _counts:
            _counts["train"] -= 1
            if _counts["train"] == 0:
                del _counts["train"]
                pause("train")
    elif name in TEXT_MODELS and _take("text") is not None:
        pause("text")


_real_replace = os.replace


def _replace(src, dst, *args, **kwargs):
    armed = FAULTS / "replace.armed"
    if armed.exists() and str(os.path.basename(src)).endswith(".tmp") and armed.read_text() in str(dst):
        armed.unlink()
        pause("replace")
    return _real_replace(src, dst, *args, **kwargs)


class PauseHere:
    """Passes its input on, pausing at the ``node`` point when armed: a moment between two nodes."""

    CATEGORY = "testing"
    RETURN_TYPES = ("LORA",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora": ("LORA",)}}

    def run(self, lora):
        if _take("node") is not None:
            pause("node")
        return (lora,)


def install() -> None:
    FAULTS.mkdir(parents=True, exist_ok=True)
    torch.nn.modules.module.register_module_forward_pre_hook(_forward_pre_hook)
    os.replace = _replace
