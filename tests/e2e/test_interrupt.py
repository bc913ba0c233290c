"""Cancel over the HTTP API: POST /interrupt during Train LoRA ends the prompt within one step; the LoRA
trained so far is saved and loads in the stock LoraLoader."""

from __future__ import annotations

import json
import struct
import time

import requests
import websocket

from scripts.make_demo_assets import make_demo_dataset
from tests.conftest import TINY_CKPT_NAME

STEPS = 200
NAME = "e2e/interrupted"
TEXT_EVENT = 3  # ComfyUI protocol.BinaryEventTypes.TEXT


def _training_graph() -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_CKPT_NAME}},
        "2": {"class_type": "LoraTrainerLoadDataset", "inputs": {
            "folder": "e2e_rings", "resolution": 128, "bucket_multiple": 64, "strict": True, "edit_pairs": False,
            "random_crop": False, "flip": False}},
        "3": {"class_type": "LoraTrainerEncodeLatentsCache", "inputs": {
            "dataset": ["2", 0], "vae": ["1", 2], "clip": ["1", 1], "cache_dir": "e2e_cache"}},
        "4": {"class_type": "LoraTrainerTrain", "inputs": {
            "model": ["1", 0], "encoded": ["3", 0], "steps": STEPS, "learning_rate": 1e-3, "rank": 4, "alpha": 0.0,
            "targets": "attention", "objective": "auto", "batch_size": 1, "seed": 0, "name": NAME}},
        "5": {"class_type": "LoraTrainerSave", "inputs": {
            "lora": ["4", 0], "name": NAME, "format": "auto", "precision": "fp32"}},
    }


def _generation_graph(lora_name: str, prefix: str) -> dict:
    """One image from the tiny checkpoint through the stock LoraLoader with ``lora_name`` (model strength 1)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_CKPT_NAME}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "strength_model": 1.0,
                                                     "strength_clip": 0.0, "lora_name": lora_name}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "zkx"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "seed": 0, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def _history(url: str, prompt_id: str, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        entry = requests.get(f"{url}/history/{prompt_id}", timeout=30).json().get(prompt_id)
        if entry is not None:
            return entry
        time.sleep(0.25)
    raise AssertionError(f"prompt {prompt_id} did not finish in {timeout_s} s")


def test_interrupt_during_training_saves_a_loadable_partial_lora(comfy_server, comfy_base_dir):
    make_demo_dataset(comfy_base_dir / "input" / "e2e_rings", count=4, size=128)
    client_id = "interrupt-test"
    ws = websocket.create_connection(f"ws://{comfy_server.url.split('://', 1)[1]}/ws?clientId={client_id}",
                                     timeout=300)
    try:
        body = requests.post(f"{comfy_server.url}/prompt", json={"prompt": _training_graph(), "client_id": client_id},
                             timeout=30).json()
        assert not body.get("node_errors"), body
        prompt_id = body["prompt_id"]
        progress, status_lines, interrupted_at = [], [], None
        while True:
            message = ws.recv()
            if not isinstance(message, str):  # binary: [event u32][node id length u32][node id][text]
                if struct.unpack(">I", message[:4])[0] == TEXT_EVENT:
                    length = struct.unpack(">I", message[4:8])[0]
                    status_lines.append((message[8:8 + length].decode(), message[8 + length:].decode()))
                continue
            event = json.loads(message)
            data = event.get("data", {})
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if event["type"] == "progress" and data.get("node") == "4":
                progress.append(data["value"])
                if data["value"] >= 3 and interrupted_at is None:
                    interrupted_at = data["value"]
                    requests.post(f"{comfy_server.url}/interrupt", timeout=30)
            if event["type"] in ("execution_interrupted", "execution_error", "execution_success"):
                break
    finally:
        ws.close()
    assert event["type"] == "execution_interrupted", event
    # the node shows the step, loss and speed while it runs
    assert any(node == "4" and "step 2/200" in text and "it/s" in text and "loss" in text
               for node, text in status_lines), status_lines
    assert progress == sorted(progress) and max(progress) <= interrupted_at + 1 < STEPS
    entry = _history(comfy_server.url, prompt_id)
    assert entry["status"]["status_str"] == "error"
    partial = comfy_base_dir / "models" / "loras" / "e2e" / "interrupted_partial.safetensors"
    assert partial.is_file()
    listed = requests.get(f"{comfy_server.url}/object_info/LoraLoader", timeout=30).json()
    assert "e2e/interrupted_partial.safetensors" in json.dumps(listed)
    check = _generation_graph("e2e/interrupted_partial.safetensors", "e2e/after_interrupt")
    body = requests.post(f"{comfy_server.url}/prompt", json={"prompt": check}, timeout=30).json()
    assert not body.get("node_errors"), body
    assert _history(comfy_server.url, body["prompt_id"])["status"]["status_str"] == "success"
    assert "lora key not loaded" not in comfy_server.log_path.read_text()
