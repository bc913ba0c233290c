"""Train LoRA's status lines go only to the client that queued the prompt: another browser tab connected to the
same server sees none of them (ComfyUI's own progress events behave the same way)."""

from __future__ import annotations

import json
import struct

import requests
import websocket

from scripts.make_demo_assets import make_demo_dataset
from tests.e2e.test_interrupt import TEXT_EVENT, _history, _training_graph


def _connect(url: str, client_id: str, timeout: float) -> websocket.WebSocket:
    return websocket.create_connection(f"ws://{url.split('://', 1)[1]}/ws?clientId={client_id}", timeout=timeout)


def _text_events(ws: websocket.WebSocket) -> list[tuple[str, str]]:
    """The progress-text events waiting on ``ws`` (its timeout ends the read)."""
    events = []
    while True:
        try:
            message = ws.recv()
        except websocket.WebSocketTimeoutException:
            return events
        if isinstance(message, bytes) and struct.unpack(">I", message[:4])[0] == TEXT_EVENT:
            length = struct.unpack(">I", message[4:8])[0]
            events.append((message[8:8 + length].decode(), message[8 + length:].decode()))


def test_a_second_client_sees_none_of_another_clients_progress_text(comfy_server, comfy_base_dir):
    make_demo_dataset(comfy_base_dir / "input" / "e2e_rings", count=4, size=128)
    graph = _training_graph()
    graph["4"]["inputs"].update(steps=6, name="e2e/privacy")
    graph["5"]["inputs"]["name"] = "e2e/privacy"
    owner, bystander = _connect(comfy_server.url, "owner", 300), _connect(comfy_server.url, "bystander", 2)
    try:
        body = requests.post(f"{comfy_server.url}/prompt", json={"prompt": graph, "client_id": "owner"},
                             timeout=30).json()
        assert not body.get("node_errors"), body
        owner_texts = []
        while True:
            message = owner.recv()
            if isinstance(message, bytes):
                if struct.unpack(">I", message[:4])[0] == TEXT_EVENT:
                    owner_texts.append(message)
                continue
            event = json.loads(message)
            if event["type"] in ("execution_success", "execution_error", "execution_interrupted") and \
                    event.get("data", {}).get("prompt_id") == body["prompt_id"]:
                break
        assert _history(comfy_server.url, body["prompt_id"])["status"]["status_str"] == "success"
        assert owner_texts, "the client that queued the prompt sees the status lines"
        assert _text_events(bystander) == []
    finally:
        owner.close()
        bystander.close()
