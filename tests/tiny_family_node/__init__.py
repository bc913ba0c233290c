"""A test-only custom node for the e2e server: Tiny Family Loader gives a tiny random MODEL, CLIP and VAE of
any family (scripts/tiny_families.py), so each family's shipped workflow runs through the HTTP API with its
loaders swapped for this one. ComfyUI's stock loaders cannot load such files: their detection fixes the widths.
"""

import functools
import os
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[2]))  # the repo's scripts/, after ComfyUI's own modules

from scripts.tiny_families import TINY, tiny_clip, tiny_model, tiny_vae, unbuildable  # noqa: E402


@functools.cache
def _buildable() -> list[str]:
    """The families whose tiny model, text encoder and VAE this ComfyUI can build."""
    return [family for family in TINY if unbuildable(family) is None]


class TinyFamilyLoader:
    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (_buildable(),)}}

    def load(self, family):
        return tiny_model(family), tiny_clip(family), tiny_vae(family)


NODE_CLASS_MAPPINGS = {"TinyFamilyLoader": TinyFamilyLoader}

if os.environ.get("LORA_TRAINER_FAULTS"):  # the reliability tests' server only
    from .faults import PauseHere, install

    install()
    NODE_CLASS_MAPPINGS["PauseHere"] = PauseHere
