"""The shipped workflows against the live server: every node exists, every link type-checks against
/object_info, the UI and API twins agree, the demo runs end to end through POST /prompt, and so does every
family's workflow, with its loaders swapped for the test server's Tiny Family Loader."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from safetensors import safe_open

from scripts.demo import LORA_NAME, TRAIN_NODE, run_prompt
from scripts.make_demo_assets import make_demo_dataset, make_edit_pairs
from scripts.tiny_families import TINY
from tests.families import EXPECTED

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
SAMPLES_NODE, PROGRESSION_NODE = "25", "26"
EVALUATION_NODE, EVALUATION_SAVE_NODE = "27", "28"
PREVIEW_IMAGE = 1  # ComfyUI's binary websocket event for a preview image (to a client that asks for no metadata)
NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json") if not p.stem.endswith("_api"))


@pytest.fixture(scope="module")
def object_info(comfy_client) -> dict:
    return comfy_client.get("/object_info")


# combos listing the user's own files (models, the image to edit): the shipped name is a placeholder
USER_FILES = {"ckpt_name", "unet_name", "clip_name", "clip_name1", "clip_name2", "vae_name", "image"}
# Widgets that newer ComfyUIs added to stock nodes: the workflows carry their values (ComfyUI 0.33 requires
# them); older hosts have no such input and ignore the value (0.3.75's executor drops unknown widget inputs).
NEWER_HOST_INPUTS = {"ImageScaleToTotalPixels": ["resolution_steps"]}


def _newer_host_inputs(class_type: str, info: dict) -> list[str]:
    """The inputs of ``class_type`` that a newer ComfyUI added and this host lacks."""
    return [name for name in NEWER_HOST_INPUTS.get(class_type, []) if name not in _inputs(info)]


def _inputs(info: dict) -> dict:
    return {**info["input"].get("required", {}), **info["input"].get("optional", {})}


def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def test_there_are_workflows():
    families = {"sd15", "sd2_v", "sdxl", "sd3", "flux_dev", "qwen_image", "qwen_image_edit", "chroma", "z_image", "flux2_dev"}
    assert {"demo_tiny_sd15"} | {f"{family}_train_then_generate" for family in families} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_nodes_exist_and_links_type_check(name, object_info):
    graph = json.loads((WORKFLOWS / f"{name}_api.json").read_text())
    for node_id, node in graph.items():
        assert node["class_type"] in object_info, f"node {node_id}: unknown type {node['class_type']}"
        info = object_info[node["class_type"]]
        specs = _inputs(info)
        for required in info["input"].get("required", {}):
            assert required in node["inputs"], f"node {node_id} ({node['class_type']}) misses {required}"
        for input_name, value in node["inputs"].items():
            if input_name in _newer_host_inputs(node["class_type"], info):
                assert not isinstance(value, list), f"node {node_id}.{input_name} is a widget on newer hosts"
                continue
            assert input_name in specs, f"node {node_id}: {node['class_type']} has no input {input_name}"
            if isinstance(value, list):  # a link
                source = graph[value[0]]
                out_type = object_info[source["class_type"]]["output"][value[1]]
                assert out_type == specs[input_name][0] or specs[input_name][0] == "*", \
                    f"node {node_id}.{input_name}: {out_type} into {specs[input_name][0]}"
            else:
                assert _is_widget(specs[input_name]), f"node {node_id}.{input_name} is a link input"
                kind, *options = specs[input_name]  # a combo: [choices, ...] (v1) or ["COMBO", {"options": ...}] (v3)
                choices = kind if isinstance(kind, list) else options[0].get("options") if kind == "COMBO" else None
                if choices is not None and input_name not in USER_FILES:
                    assert value in choices, f"node {node_id}.{input_name}: {value!r} not in {choices}"


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_matches_its_api_twin(name, object_info):
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    api = json.loads((WORKFLOWS / f"{name}_api.json").read_text())
    assert {str(n["id"]): n["type"] for n in ui["nodes"]} == {k: v["class_type"] for k, v in api.items()}
    by_id = {n["id"]: n for n in ui["nodes"]}
    links = {row[0]: row for row in ui["links"]}
    for node in ui["nodes"]:
        api_inputs = api[str(node["id"])]["inputs"]
        for slot in node["inputs"]:
            if slot["link"] is None:  # an optional input left unconnected
                assert slot["name"] not in api_inputs
                continue
            source, source_slot, target, _, kind = links[slot["link"]][1:]
            assert target == node["id"] and api_inputs[slot["name"]] == [str(source), source_slot]
            assert kind == slot["type"] == object_info[by_id[source]["type"]]["output"][source_slot]
        widget_names = [k for k, spec in _inputs(object_info[node["type"]]).items() if _is_widget(spec)]
        values = list(node["widgets_values"])
        for widget in widget_names:
            assert values.pop(0) == api_inputs[widget], f"node {node['id']}.{widget}"
            if widget in ("seed", "noise_seed"):
                assert values.pop(0) == "fixed"  # the frontend's "control after generate" value
        assert values == [api_inputs[name] for name in _newer_host_inputs(node["type"], object_info[node["type"]])]


def test_the_demo_workflow_runs_through_the_api(comfy_server, comfy_base_dir, object_info):
    make_demo_dataset(comfy_base_dir / "input" / "lora_trainer_demo" / "rings", count=4, size=256)
    graph = json.loads((WORKFLOWS / "demo_tiny_sd15_api.json").read_text())
    steps, every = 4, graph[SAMPLES_NODE]["inputs"]["every_n_steps"] // 5
    graph[TRAIN_NODE]["inputs"].update(steps=steps, name="e2e/demo_api")  # its own run folder for the samples
    graph[SAMPLES_NODE]["inputs"]["every_n_steps"] = every
    events, binary = [], []
    entry = run_prompt(comfy_server.url, graph, {}, say=lambda _: None, on_event=events.append,
                       on_binary=binary.append)
    progress = [e["data"]["value"] for e in events if e["type"] == "progress" and e["data"]["node"] == TRAIN_NODE]
    assert progress == sorted(progress) and set(progress) == set(range(steps + 1)), progress
    sample_steps = [0, *range(every, steps + 1, every)]
    assert binary.count(PREVIEW_IMAGE) == len(sample_steps), binary  # one prompt: an image per sample step
    ours = [e["data"] for e in events if e["type"] == "lora_trainer.progress"]
    assert [d["step"] for d in ours if d.get("sample")] == sample_steps
    assert [d["step"] for d in ours if "loss" in d] == list(range(1, steps + 1))  # the demo logs every step
    saved = {node: out for node, out in entry["outputs"].items() if out.get("images")}
    prefixes = {graph[node]["inputs"]["filename_prefix"] for node in saved if "filename_prefix" in graph[node]["inputs"]}
    assert prefixes == {"lora_trainer_demo/with_lora", "lora_trainer_demo/without_lora",
                        "lora_trainer_demo/loss_curve", "lora_trainer_demo/samples", "lora_trainer_demo/evaluation"}
    for node, out in saved.items():
        image = out["images"][0]
        assert image["type"] == ("temp" if node == EVALUATION_NODE else "output"), (node, image)  # a preview there
        assert (comfy_base_dir / image["type"] / image["subfolder"] / image["filename"]).is_file()
    samples_dir = comfy_base_dir / "output" / "lora_trainer" / graph[TRAIN_NODE]["inputs"]["name"] / "samples"
    assert sorted(p.name for p in samples_dir.iterdir()) == [f"step_{s:06d}_1.png" for s in sample_steps]
    progression = saved[PROGRESSION_NODE]["images"][0]
    with Image.open(comfy_base_dir / "output" / progression["subfolder"] / progression["filename"]) as image:
        assert image.height > len(sample_steps) * 256  # a row per sample step, under a label line
    assert entry["outputs"]["6"]["text"] == [LORA_NAME]  # Save LoRA shows the name LoraLoader lists
    evaluation = entry["outputs"][EVALUATION_NODE]  # its own preview and report, besides the saved grid
    assert evaluation["images"] and "strengths 0, 0.5, 1" in evaluation["text"][0], evaluation
    grid = saved[EVALUATION_SAVE_NODE]["images"][0]
    with Image.open(comfy_base_dir / "output" / grid["subfolder"] / grid["filename"]) as image:
        assert image.height > 3 * 256  # a row per strength
    report = entry["outputs"][TRAIN_NODE]["text"][0]
    probe = re.search(rf"probe loss ([\d.]+) -> ([\d.]+) \(-\d+%: 4 training images at fixed noise, steps 0 and "
                      rf"{steps}\)", report)
    assert "final loss" in report and probe and float(probe[2]) < float(probe[1]), report  # what the demo learned
    assert (comfy_base_dir / "models" / "loras" / LORA_NAME).is_file()
    listed = requests.get(f"{comfy_server.url}/object_info/LoraLoader", timeout=30).json()
    assert LORA_NAME in listed["LoraLoader"]["input"]["required"]["lora_name"][0]


@pytest.mark.parametrize("name", NAMES)
def test_every_api_workflow_node_has_a_unique_title(name):
    graph = json.loads((WORKFLOWS / f"{name}_api.json").read_text())
    titles = [node["_meta"]["title"] for node in graph.values()]
    assert len(set(titles)) == len(titles) and all(titles), titles
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    assert {str(node["id"]): node["title"] for node in ui["nodes"]} == {k: v["_meta"]["title"] for k, v in graph.items()}


FAMILY_WORKFLOWS = {"sd15": "SD15", "sd2_v": "SD2-v", "sdxl": "SDXL", "sd3": "SD3", "flux_dev": "FLUX.1-dev",
                    "qwen_image": "Qwen-Image", "qwen_image_edit": "Qwen-Image-Edit", "chroma": "Chroma",
                    "z_image": "Z-Image", "flux2_dev": "FLUX.2"}
LOADERS = ("CheckpointLoaderSimple", "UNETLoader", "CLIPLoader", "DualCLIPLoader", "VAELoader")
SMALL = {  # class_type: inputs that make the run a few steps at 64 px
    "LoraTrainerTrain": {"steps": 3, "learning_rate": 1e-2},
    "KSampler": {"steps": 2},
    "EmptyLatentImage": {"width": 64, "height": 64},
    "EmptySD3LatentImage": {"width": 64, "height": 64},
    "EmptyFlux2LatentImage": {"width": 64, "height": 64},
    "ImageScaleToTotalPixels": {"megapixels": 0.01},
    "LoraTrainerLoadDataset": {"resolution": 64},
    "LoraTrainerSamples": {"width": 64, "height": 64, "steps": 2},
}


def on_tiny_model(graph: dict, family: str, object_info: dict) -> dict:
    """``graph`` with its model, CLIP and VAE loaders replaced by one Tiny Family Loader of ``family``, every
    link re-pointed by the type it carried, and the run shrunk (SMALL)."""
    graph = copy.deepcopy(graph)
    loaders = {node_id for node_id, node in graph.items() if node["class_type"] in LOADERS}
    assert loaders, "the workflow loads no model"
    for node in graph.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and value[0] in loaders:
                carried = object_info[graph[value[0]]["class_type"]]["output"][value[1]]
                node["inputs"][name] = ["tiny", ["MODEL", "CLIP", "VAE"].index(carried)]
        node["inputs"].update(SMALL.get(node["class_type"], {}))
    for node_id in loaders:
        del graph[node_id]
    graph["tiny"] = {"class_type": "TinyFamilyLoader", "inputs": {"family": family}}
    return graph


@pytest.mark.parametrize("workflow, family", list(FAMILY_WORKFLOWS.items()))
def test_every_family_workflow_runs_through_the_api_on_the_tiny_model(workflow, family, comfy_client,
                                                                     comfy_base_dir, object_info):
    """The shipped graph as a user queues it, on a tiny model of its family: it trains, saves a LoRA file with
    the family's metadata, and samples with and without the LoRA, which differ."""
    if family not in object_info["TinyFamilyLoader"]["input"]["required"]["family"][0]:
        pytest.skip(f"this ComfyUI cannot build a tiny {family} (its text encoder or VAE is newer)")
    graph = json.loads((WORKFLOWS / f"{workflow}_train_then_generate_api.json").read_text())
    graph = on_tiny_model(graph, family, object_info)
    folder = f"family_workflows/{workflow}"  # the dataset under input/, the images under output/
    (make_edit_pairs if TINY[family].edit else make_demo_dataset)(comfy_base_dir / "input" / folder, count=2,
                                                                  size=64)
    name = f"tests/workflow_{workflow}"
    for node in graph.values():
        inputs = node["inputs"]
        if node["class_type"] == "LoraTrainerLoadDataset":
            inputs["folder"] = folder
        if node["class_type"] in ("LoraTrainerTrain", "LoraTrainerSave"):
            inputs["name"] = name
        if node["class_type"] == "SaveImage":
            inputs["filename_prefix"] = inputs["filename_prefix"].replace("lora_trainer", folder, 1)
        if node["class_type"] == "LoadImage":  # the image to edit: one of the dataset's own
            inputs["image"] = f"{folder}/control/zkx_000.png"
    entry = comfy_client.run(graph)

    _, base_version, architecture, first_key = EXPECTED[family]
    with safe_open(comfy_base_dir / "models" / "loras" / f"{name}.safetensors", "pt") as saved:
        metadata, keys = saved.metadata(), list(saved.keys())
    assert any(key.startswith(first_key) for key in keys), keys[:4]
    assert (metadata["ss_base_model_version"], metadata["modelspec.architecture"]) == (base_version, architecture)
    images = {}  # by the last part of the SaveImage node's prefix: with_lora, without_lora, loss_curve, samples
    for node_id, out in entry["outputs"].items():
        for image in out.get("images", []):
            images[graph[node_id]["inputs"]["filename_prefix"].rsplit("/", 1)[-1]] = np.asarray(
                Image.open(comfy_base_dir / "output" / image["subfolder"] / image["filename"]))
    assert set(images) == {"with_lora", "without_lora", "loss_curve", "samples"}
    assert images["samples"].shape[0] > 2 * 64  # before the first step and after the last
    assert images["with_lora"].shape == images["without_lora"].shape
    assert not np.array_equal(images["with_lora"], images["without_lora"])
