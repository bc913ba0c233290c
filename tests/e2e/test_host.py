"""The real ComfyUI server starts, sees the tiny SD1.5 checkpoint and renders an image with it.

Every test here needs the ``comfy_server`` fixture, so the module is skipped (with the reason)
only when ComfyUI cannot be installed; see conftest.py.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image


def combo_options(spec: list) -> list[str]:
    """The choices of a combo input in /object_info: V1 nodes give ``[[choices], {...}]``,
    V3 nodes ``["COMBO", {"options": [choices]}]``."""
    if isinstance(spec[0], list):
        return spec[0]
    return spec[1]["options"]


def text_to_image_graph(ckpt_name: str, prefix: str) -> dict:
    """API-format graph: checkpoint -> two prompts -> 64x64 latent -> 2 sampler steps -> decode -> save."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "zkx pattern, red rings", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "seed": 1234,
                "steps": 2,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def test_system_stats_answers(comfy_client):
    stats = comfy_client.get("/system_stats")

    assert stats["system"]["comfyui_version"]
    assert stats["devices"], "ComfyUI reports no device"


def test_checkpoint_loader_lists_tiny_checkpoint(comfy_client, tiny_sd15_name: str):
    info = comfy_client.get("/object_info/CheckpointLoaderSimple")["CheckpointLoaderSimple"]

    assert tiny_sd15_name in combo_options(info["input"]["required"]["ckpt_name"])


def test_text_to_image_prompt_writes_an_image(comfy_client, comfy_base_dir: Path, tiny_sd15_name: str):
    entry = comfy_client.run(text_to_image_graph(tiny_sd15_name, prefix="e2e_host"))

    images = entry["outputs"]["7"]["images"]
    assert len(images) == 1
    image = images[0]
    assert image["type"] == "output"
    written = comfy_base_dir / "output" / image["subfolder"] / image["filename"]
    assert written.name.startswith("e2e_host")
    with Image.open(written) as png:
        assert png.format == "PNG"
        assert png.size == (64, 64)
