"""The README's demo: train a tiny LoRA through a real ComfyUI server, no GPU and no downloads needed.

    .venv/bin/python scripts/demo.py [--steps N] [--host VERSION]   (bash scripts/dev.sh demo sets up first)

Builds a random-weight SD1.5 checkpoint and a ring-pattern dataset (trigger word "zkx") into
.cache/demo_base, starts ComfyUI (the first selected host, scripts/comfy_host.py: 0.33.0 unless
$COMFY_HOSTS says otherwise) on 127.0.0.1 with that base folder, in its own venv that holds only ComfyUI's
requirements and the pack's requirements.txt, queues
workflows/demo_tiny_sd15_api.json through POST /prompt, streams the progress, loads the new LoRA in the
stock LoraLoader (no "lora key not loaded" allowed) and prints where the LoRA, the images with and without
it, and the loss curve are, and how far the probe loss fell (the images are colour noise: the VAE is random).
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import sys
import time
import uuid
from pathlib import Path

import requests
import websocket

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from scripts import comfy_host  # noqa: E402
from scripts.make_demo_assets import cached_tiny_sd15, make_demo_dataset  # noqa: E402

WORKFLOW = REPO_ROOT / "workflows" / "demo_tiny_sd15_api.json"
BASE = REPO_ROOT / ".cache" / "demo_base"
TEXT_EVENT = 3  # ComfyUI's binary websocket event for a node's progress text
TRAIN_NODE = "5"
LORA_NAME = "lora_trainer/demo_zkx.safetensors"


def prepare(host: comfy_host.Host, base: Path) -> None:
    comfy_host.install(host)
    comfy_host.prepare_base_dir(host.root, base)
    checkpoint = base / "models" / "checkpoints" / "tiny_sd15.safetensors"
    checkpoint.unlink(missing_ok=True)
    checkpoint.symlink_to(cached_tiny_sd15(python=host.python))
    make_demo_dataset(base / "input" / "lora_trainer_demo" / "rings", count=8, size=256)


def run_prompt(url: str, graph: dict, titles: dict[str, str], say=print, on_event=None, on_binary=None) -> dict:
    """Queue ``graph``, stream its progress, return its /history entry (raise if it failed).
    ``on_event`` gets every JSON websocket event of this prompt, ``on_binary`` the type of every binary one
    (1 and 4: a preview image, 3: a node's status line)."""
    client_id = uuid.uuid4().hex
    ws = websocket.create_connection(f"ws://{url.split('://', 1)[1]}/ws?clientId={client_id}", timeout=3600)
    try:
        body = requests.post(f"{url}/prompt", json={"prompt": graph, "client_id": client_id}, timeout=60).json()
        if body.get("node_errors") or "prompt_id" not in body:
            raise RuntimeError(f"ComfyUI refused the workflow: {json.dumps(body)[:2000]}")
        prompt_id, last_text = body["prompt_id"], 0.0
        while True:
            message = ws.recv()
            if isinstance(message, bytes):
                if on_binary is not None:
                    on_binary(struct.unpack(">I", message[:4])[0])
                if struct.unpack(">I", message[:4])[0] == TEXT_EVENT and time.monotonic() - last_text > 2:
                    length = struct.unpack(">I", message[4:8])[0]
                    say(f"  {titles.get(message[8:8 + length].decode(), '?')}: {message[8 + length:].decode()}")
                    last_text = time.monotonic()
                continue
            event = json.loads(message)
            data = event.get("data", {})
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if on_event is not None:
                on_event(event)
            if event["type"] == "executing" and data.get("node"):
                say(f"- {titles.get(data['node'], data['node'])}")
            elif event["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                break
    finally:
        ws.close()
    entry = None
    for _ in range(240):  # the history entry is written just after the final websocket event
        entry = requests.get(f"{url}/history/{prompt_id}", timeout=60).json().get(prompt_id)
        if entry is not None:
            break
        time.sleep(0.25)
    if entry is None:
        raise RuntimeError(f"no /history entry for prompt {prompt_id}")
    if entry["status"]["status_str"] != "success":
        raise RuntimeError(f"the workflow failed: {json.dumps(entry['status'])[:3000]}")
    return entry


def lora_loader_check(url: str) -> dict:
    """Load the new LoRA with the stock LoraLoader and sample one step with it."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": LORA_NAME,
                                                     "strength_model": 1.0, "strength_clip": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "zkx pattern"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "seed": 0, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "lora_trainer_demo/check"}},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, help="training steps (default: the workflow's)")
    parser.add_argument("--base", type=Path, default=BASE, help="ComfyUI base folder for the demo")
    parser.add_argument("--host", default=None, help="ComfyUI version or install folder (default: the first "
                                                     "of $COMFY_HOSTS, else 0.33.0)")
    args = parser.parse_args(argv)
    host = comfy_host.host(args.host) if args.host else comfy_host.selected_hosts()[0]
    started = time.monotonic()
    graph = json.loads(WORKFLOW.read_text())
    if args.steps:
        graph[TRAIN_NODE]["inputs"]["steps"] = args.steps
    print(f"preparing ComfyUI {host.name}, the tiny checkpoint and the dataset in {args.base} ...")
    prepare(host, args.base)
    with comfy_host.start_server(host.root, base_dir=args.base, python=host.python) as server:
        print(f"ComfyUI {host.version} is up at {server.url} (log: {server.log_path})")
        titles = {node_id: node["class_type"] for node_id, node in graph.items()}
        titles.update({TRAIN_NODE: "Train LoRA"})
        try:
            entry = run_prompt(server.url, graph, titles)
            run_prompt(server.url, lora_loader_check(server.url), {}, say=lambda _: None)
        except (RuntimeError, OSError) as error:
            print(f"FAILED: {error}\n--- server log ---\n{server.log_tail()}", file=sys.stderr)
            return 1
        log = Path(server.log_path).read_text(errors="replace")
    if "lora key not loaded" in log:
        print("FAILED: the stock LoraLoader did not load every key:\n"
              + "\n".join(line for line in log.splitlines() if "lora key not loaded" in line)[:3000], file=sys.stderr)
        return 1
    output = args.base / "output"
    print(f"\ndone in {time.monotonic() - started:.0f} s")
    print(f"LoRA (loads in LoraLoader with every key): {args.base / 'models' / 'loras' / LORA_NAME}")
    for node, out in sorted(entry["outputs"].items(), key=lambda item: int(item[0])):
        label = Path(graph[node]["inputs"].get("filename_prefix", node)).name
        for image in out.get("images", []):
            if image["type"] == "output":  # not the nodes' previews (temp/)
                print(f"{label}: {output / image['subfolder'] / image['filename']}")
    probe = re.search(r"probe loss [^;]*", entry["outputs"][TRAIN_NODE]["text"][0])
    if probe:  # the images cannot show it: the tiny checkpoint's VAE has random weights, so they are colour noise
        print(f"what the LoRA learned: {probe[0]}; the loss curve draws it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
