"""Cancel (ComfyUI's interrupt) during Train LoRA: the prompt ends within a step and the LoRA learned so
far is saved and loads."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from tests.comfy.conftest import run_node


def test_interrupt_stops_within_a_step_and_saves_the_partial_lora(comfy, sd15, demo_folder):
    from comfy import model_management as mm
    from comfy import utils as comfy_utils

    model, clip, vae = sd15
    dataset, _ = run_node(comfy, "LoraTrainerLoadDataset", folder=str(demo_folder), resolution=128,
                          bucket_multiple=64, strict=True, edit_pairs=False, random_crop=False, flip=False)
    encoded, _ = run_node(comfy, "LoraTrainerEncodeLatentsCache", dataset=dataset, vae=vae, clip=clip,
                          cache_dir="cache")
    steps_seen = []

    def hook(value, total, preview, node_id=None):  # what main.py installs: it raises once interrupted
        steps_seen.append(value)
        if value == 3:
            mm.interrupt_current_processing(True)  # the user presses Cancel during step 3's report
        mm.throw_exception_if_processing_interrupted()

    comfy_utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run_node(comfy, "LoraTrainerTrain", model=model, encoded=encoded, steps=50, learning_rate=1e-3, rank=2,
                     alpha=0.0, targets="attention", objective="auto", batch_size=1, seed=0, name="tests/cancelled")
    finally:
        comfy_utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    assert max(steps_seen) == 3  # no step after the one that saw the interrupt
    path = comfy.base / "loras" / "tests" / "cancelled_partial.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_steps"] == "3" and json.loads(meta["lora_trainer.config"])["steps"] == 50
    loaded, _ = run_node(comfy, "LoraLoader", model=model, clip=clip, lora_name="tests/cancelled_partial.safetensors",
                         strength_model=1.0, strength_clip=0.0)
    assert len(loaded.patches) > 0
