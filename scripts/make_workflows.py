"""Write the shipped workflows, each in both formats, from one graph description per workflow.

    .comfyui/0.33.0/venv/bin/python scripts/make_workflows.py    # regenerates workflows/*.json

Widget order and output types come from the node classes themselves (ComfyUI loaded in-process, this pack
registered), so the UI files stay in step with the nodes' INPUT_TYPES. Run it on the newest host: inputs that
newer ComfyUIs added (ImageScaleToTotalPixels' resolution_steps) get their values, which older hosts ignore. The frontend gives INT inputs named
seed/noise_seed an extra "control after generate" widget value, written here as "fixed".
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from scripts.comfy_host import comfy_root  # noqa: E402
from scripts.comfy_inproc import load_comfy  # noqa: E402
from scripts.tiny_families import family_records  # noqa: E402

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
SEED_NAMES = ("seed", "noise_seed")


def train_then_generate(*, ckpt: str | None = None, unet: str | None = None, clips: tuple[str, ...] = (),
                        clip_type: str = "", vae: str = "", folder: str, resolution: int, steps: int, rank: int,
                        lr: float, trigger: str, prompt: str, size: int, sample_steps: int, cfg: float, name: str,
                        prefix: str, latent: str = "EmptyLatentImage", scheduler: str = "normal",
                        flux_guidance: float | None = None, sampling_shift: float | None = None,
                        edit_image: str | None = None, sample_every: int = 250,
                        evaluate: bool = False) -> list[tuple]:
    """(id, type, widget values by name, links {input: (source id, slot)}, column, row).

    One checkpoint (``ckpt``), or a diffusion model with its text encoder(s) and VAE (``unet``, ``clips``,
    ``vae``) as FLUX and Qwen-Image ship. FLUX's prompt goes through FluxGuidance; Qwen samples with
    ModelSamplingAuraFlow's shift; Qwen-Image-Edit trains on edit pairs and edits ``edit_image``, sent
    through TextEncodeQwenImageEdit as ComfyUI's own workflows do. Training Samples samples the prompt every
    ``sample_every`` steps while it trains (the edit prompt, with its image, for an edit model); ``evaluate`` adds
    LoRA Evaluation Grid at strengths 0, 0.5 and 1 with the same sampling."""
    train = dict(steps=steps, learning_rate=lr, rank=rank, alpha=float(rank), name=name)  # rest: node defaults
    sampler = dict(seed=42, steps=sample_steps, cfg=cfg, sampler_name="euler", scheduler=scheduler, denoise=1.0)
    edit = edit_image is not None
    if ckpt is not None:
        graph = [(1, "CheckpointLoaderSimple", {"ckpt_name": ckpt}, {}, 0, 0)]
        model, clip, vae_out = (1, 0), (1, 1), (1, 2)
    else:
        clip_loader = ("DualCLIPLoader", {"clip_name1": clips[0], "clip_name2": clips[1]}) if len(clips) == 2 else \
            ("CLIPLoader", {"clip_name": clips[0]})
        graph = [(1, "UNETLoader", {"unet_name": unet, "weight_dtype": "default"}, {}, 0, 0),
                 (18, clip_loader[0], {**clip_loader[1], "type": clip_type, "device": "default"}, {}, 0, 2),
                 (19, "VAELoader", {"vae_name": vae}, {}, 0, 3)]
        model, clip, vae_out = (1, 0), (18, 0), (19, 0)
    graph += [
        (2, "LoraTrainerLoadDataset", dict(folder=folder, resolution=resolution, bucket_multiple=64, strict=True,
                                           edit_pairs=edit, random_crop=False, flip=False), {}, 0, 1),
        (3, "LoraTrainerCaptionDropout", dict(dropout=0.1, trigger_word=trigger, shuffle_tags=False, keep_tokens=1,
                                              shuffle_variants=4), {"dataset": (2, 0)}, 1, 1),
        (4, "LoraTrainerEncodeLatentsCache", {"cache_dir": "lora_trainer_cache"},
         {"dataset": (3, 0), "vae": vae_out, "clip": clip}, 2, 1),
        (5, "LoraTrainerTrain", train, {"model": model, "encoded": (4, 0), "samples": (25, 0)}, 3, 0),
        (6, "LoraTrainerSave", dict(name=name, format="auto", precision="fp32"), {"lora": (5, 0)}, 4, 0),
        (7, "SaveImage", {"filename_prefix": f"{prefix}/loss_curve"}, {"images": (5, 1)}, 4, 1),
        (8, "LoraTrainerApply", {"strength": 1.0}, {"model": model, "lora": (5, 0)}, 4, 2),
        (25, "LoraTrainerSamples", dict(prompts="" if edit else prompt, every_n_steps=sample_every, steps=sample_steps,
                                        cfg=cfg, scheduler=scheduler, width=size, height=size),
         {"clip": clip, "vae": vae_out, **({"positive": (9, 0)} if edit else {})}, 2, 0),
        (26, "SaveImage", {"filename_prefix": f"{prefix}/samples"}, {"images": (5, 3)}, 4, 3),
    ]
    if evaluate:
        graph += [(27, "LoraTrainerEvalGrid", {"strengths": "0, 0.5, 1.0"},
                   {"model": model, "lora": (5, 0), "samples": (25, 0)}, 4, 5),
                  (28, "SaveImage", {"filename_prefix": f"{prefix}/evaluation"}, {"images": (27, 0)}, 5, 5)]
    lora_model, base_model = (8, 0), model
    if sampling_shift is not None:
        graph += [(23, "ModelSamplingAuraFlow", {"shift": sampling_shift}, {"model": (8, 0)}, 5, 1),
                  (24, "ModelSamplingAuraFlow", {"shift": sampling_shift}, {"model": model}, 5, 5)]
        lora_model, base_model = (23, 0), (24, 0)
    if edit:
        graph += [(21, "LoadImage", {"image": edit_image}, {}, 0, 4),
                  (22, "ImageScaleToTotalPixels", {"upscale_method": "lanczos", "megapixels": size * size / 2**20,
                                                   "resolution_steps": 1}, {"image": (21, 0)}, 0, 5),
                  (9, "TextEncodeQwenImageEdit", {"prompt": prompt}, {"clip": clip, "vae": vae_out, "image": (22, 0)},
                   1, 3),
                  (10, "TextEncodeQwenImageEdit", {"prompt": ""}, {"clip": clip, "vae": vae_out, "image": (22, 0)},
                   1, 4),
                  (11, "VAEEncode", {}, {"pixels": (22, 0), "vae": vae_out}, 1, 5)]
    else:
        graph += [(9, "CLIPTextEncode", {"text": prompt}, {"clip": clip}, 1, 3),
                  (10, "CLIPTextEncode", {"text": ""}, {"clip": clip}, 1, 4),
                  (11, latent, dict(width=size, height=size, batch_size=1), {}, 1, 5)]
    positive = (9, 0)
    if flux_guidance is not None:
        graph.append((20, "FluxGuidance", {"guidance": flux_guidance}, {"conditioning": (9, 0)}, 2, 3))
        positive = (20, 0)
    graph += [
        (12, "KSampler", sampler, {"model": lora_model, "positive": positive, "negative": (10, 0),
                                   "latent_image": (11, 0)}, 6, 2),
        (13, "VAEDecode", {}, {"samples": (12, 0), "vae": vae_out}, 7, 2),
        (14, "SaveImage", {"filename_prefix": f"{prefix}/with_lora"}, {"images": (13, 0)}, 8, 2),
        (15, "KSampler", sampler, {"model": base_model, "positive": positive, "negative": (10, 0),
                                   "latent_image": (11, 0)}, 6, 4),
        (16, "VAEDecode", {}, {"samples": (15, 0), "vae": vae_out}, 7, 4),
        (17, "SaveImage", {"filename_prefix": f"{prefix}/without_lora"}, {"images": (16, 0)}, 8, 4),
    ]
    return sorted(graph, key=lambda node: node[0])


YOURS = dict(folder="my_dataset", trigger="", prompt="a photo in the style of my dataset", prefix="lora_trainer",
             rank=16, lr=1e-4)
# the demo, and each family record's [workflow] table (families/<family>.toml)
WORKFLOWS = {
    "demo_tiny_sd15": train_then_generate(
        ckpt="tiny_sd15.safetensors", folder="lora_trainer_demo/rings", resolution=256, steps=30, rank=8, lr=1e-3,
        trigger="zkx", prompt="zkx pattern", size=256, sample_steps=4, cfg=4.0, name="lora_trainer/demo_zkx",
        prefix="lora_trainer_demo", sample_every=10, evaluate=True),
    **{f"{workflow['file']}_train_then_generate": train_then_generate(
        **{**YOURS, **{key: value for key, value in workflow.items() if key != "file"}})
       for workflow in (record["workflow"] for record in family_records().values() if "workflow" in record)},
}


TITLES = {1: "Load model", 18: "Load text encoders", 19: "Load VAE", 2: "Load LoRA Dataset", 3: "Caption Dropout",
          4: "Encode Latents Cache", 25: "Training Samples", 5: "Train LoRA", 6: "Save LoRA", 7: "Loss chart",
          26: "Sample progression", 8: "Apply LoRA", 23: "Sampling shift, with LoRA", 24: "Sampling shift, without LoRA",
          21: "Image to edit", 22: "Scale image to edit", 9: "Prompt", 10: "Negative prompt", 11: "Latent",
          20: "Guidance", 12: "Sample with LoRA", 13: "Decode with LoRA", 14: "With LoRA",
          15: "Sample without LoRA", 16: "Decode without LoRA", 17: "Without LoRA", 27: "LoRA strengths",
          28: "Evaluation grid"}


def input_specs(cls) -> list[tuple[str, object]]:
    types = cls.INPUT_TYPES()
    return [(name, spec[0]) for section in ("required", "optional") for name, spec in types.get(section, {}).items()]


def widget_values(kind: str, node_id: int, widgets: dict, cls) -> dict:
    """The node's widget values in input order: the graph's, else the node's own defaults (so the workflows
    take the Train LoRA defaults from the node, which takes them from TrainConfig)."""
    types = cls.INPUT_TYPES()
    values = {}
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            if not is_widget(spec[0]):
                continue
            if name in widgets:
                values[name] = widgets[name]
            elif len(spec) > 1 and "default" in spec[1]:
                values[name] = spec[1]["default"]
            else:
                raise ValueError(f"{kind} (node {node_id}) needs a value for its widget {name!r}")
    unknown = set(widgets) - set(values)
    if unknown:
        raise ValueError(f"{kind} (node {node_id}) has no widget {sorted(unknown)}")
    return values


def is_widget(kind: object) -> bool:
    return isinstance(kind, list) or kind in WIDGET_TYPES


def api_format(graph: list[tuple], classes: dict) -> dict:
    out = {}
    for node_id, kind, widgets, links, _, _ in graph:
        inputs = widget_values(kind, node_id, widgets, classes[kind])
        inputs.update({name: [str(src), slot] for name, (src, slot) in links.items()})
        out[str(node_id)] = {"class_type": kind, "inputs": inputs, "_meta": {"title": TITLES[node_id]}}
    return out


def ui_format(graph: list[tuple], classes: dict) -> dict:
    links, link_rows = {}, []
    for node_id, _, _, node_links, _, _ in graph:
        for name, (src, slot) in node_links.items():
            link_id = len(link_rows) + 1
            src_type = classes[next(k for i, k, *_ in graph if i == src)].RETURN_TYPES[slot]
            link_rows.append([link_id, src, slot, node_id, name, src_type])
            links[(node_id, name)] = link_id
    nodes = []
    for order, (node_id, kind, widgets, node_links, column, row) in enumerate(graph):
        cls = classes[kind]
        specs = input_specs(cls)
        widget_value = widget_values(kind, node_id, widgets, cls)
        inputs, values = [], []
        for name, spec in specs:
            if is_widget(spec):
                values.append(widget_value[name])
                if name in SEED_NAMES:
                    values.append("fixed")
            else:
                inputs.append({"name": name, "type": spec, "link": links.get((node_id, name))})
        outputs = [{"name": (getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES)[slot], "type": out_type,
                    "links": [r[0] for r in link_rows if r[1] == node_id and r[2] == slot], "slot_index": slot}
                   for slot, out_type in enumerate(cls.RETURN_TYPES)]
        nodes.append({"id": node_id, "type": kind, "title": TITLES[node_id], "pos": [40 + 380 * column, 40 + 300 * row], "size": [340, 240],
                      "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
                      "properties": {"Node name for S&R": kind}, "widgets_values": values})
    rows = [[r[0], r[1], r[2], r[3], _slot_of(graph, classes, r[3], r[4]), r[5]] for r in link_rows]
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": len(rows), "nodes": nodes, "links": rows,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def _slot_of(graph, classes, node_id, name) -> int:
    kind = next(k for i, k, *_ in graph if i == node_id)
    links = [n for n, spec in input_specs(classes[kind]) if not is_widget(spec)]
    return links.index(name)


def main() -> None:
    nodes = load_comfy(comfy_root(), Path(tempfile.mkdtemp(prefix="workflows_")))
    asyncio.run(nodes.init_builtin_extra_nodes())  # FluxGuidance, EmptySD3LatentImage, the Qwen edit encoder
    folder = REPO_ROOT / "workflows"
    folder.mkdir(exist_ok=True)
    for name, graph in WORKFLOWS.items():
        (folder / f"{name}.json").write_text(json.dumps(ui_format(graph, nodes.NODE_CLASS_MAPPINGS), indent=1) + "\n")
        (folder / f"{name}_api.json").write_text(json.dumps(api_format(graph, nodes.NODE_CLASS_MAPPINGS), indent=1) + "\n")
        print(f"wrote workflows/{name}.json and workflows/{name}_api.json")


if __name__ == "__main__":
    main()
