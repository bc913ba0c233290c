"""The LORA type, its portable file form, and the Save LoRA / Apply LoRA nodes."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import comfy.sd
import folder_paths
import torch
from comfy_api.latest import io, ui
from PIL import Image

from ..training.config import DTYPES
from ..training.formats import RunInfo, build_metadata, save_tensors, to_state_dict
from ..training.lora import TEXT_ENCODER, LoraTensors, split_layers
from .bridge import checkpoint_name, pixels_per_latent
from .dataset_nodes import CATEGORY, LoraDataset
from .families import Family
from .inputs import errors_named, finite
from .paths import writable

SAVE_FORMATS = ("auto", "kohya", "comfy", "diffusers")
LORA = io.Custom("LORA")


@dataclass
class TrainedLora:
    """LORA: adapter weights keyed by ComfyUI module path (inside ``diffusion_model``), and what made them."""

    layers: dict[str, LoraTensors]
    family: Family
    steps: int
    config: dict
    resolution: int
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    trigger: str = ""
    cancelled: bool = False
    kept: str | None = None  # the copy Train LoRA keeps in models/loras until Save LoRA has written this LoRA
    run: RunInfo = field(default_factory=RunInfo)  # the model, dataset and times, for the files' metadata

    @property
    def rank(self) -> int:
        return int(self.config["rank"])

    @property
    def alpha(self) -> float:
        return float(self.config["alpha"] or self.rank)

    @property
    def kind(self) -> str:
        return self.config.get("adapter", "lora")

    @property
    def text_encoder_layers(self) -> int:
        """How many of the layers are the text encoder's (te_learning_rate)."""
        return len(split_layers(self.layers).get(TEXT_ENCODER, {}))

    @staticmethod
    def run_info(model, encoded, result, guidance: float | None = None) -> RunInfo:
        """What made a LoRA, from Train LoRA's MODEL, LORA_ENCODED and the engine's TrainResult: read once, when
        training ends, so that every file written of this LoRA says the same. (A static method: Train LoRA
        reaches it through the class it builds.)"""
        dataset: LoraDataset = encoded.dataset
        factor = pixels_per_latent(model.model)
        sizes = encoded.data.sizes  # latent (h, w) per cached item, repeats included, in the samples' order
        buckets: dict[tuple[int, int], int] = {}
        for height, width in sizes:
            buckets[(width * factor, height * factor)] = buckets.get((width * factor, height * factor), 0) + 1
        errors = _aspect_errors(dataset, sizes)
        finished = time.time()
        return RunInfo(
            base_model=checkpoint_name(model), dataset=_dataset_name(dataset.folder),
            dataset_dirs=_dataset_dirs(dataset), buckets=buckets,
            mean_ar_error=sum(errors) / len(errors) if errors else 0.0, bucket_multiple=dataset.bucket_multiple,
            flip=dataset.flip, random_crop=dataset.random_crop, caption=dataset.policy,
            caption_variants=dataset.caption_variants, guidance=guidance,
            started_at=finished - result.train_s - result.sampling_s,  # when the first step began
            finished_at=finished, session_id=random.randint(0, 2**32),
            reg_images=sum(s.repeats for s in dataset.samples if s.regularization))


_ORIENTATION = 0x0112  # EXIF orientation: 5-8 turn the image by 90 degrees (training.dataset.load_image applies it)


def _aspect_errors(dataset: LoraDataset, sizes) -> list[float]:
    """kohya's aspect-ratio error of each image: |bucket w/h - image w/h|, the image's size read from its header."""
    errors, at = [], 0
    for sample in dataset.samples:
        if at >= len(sizes):
            break
        height, width = sizes[at]
        at += sample.repeats
        try:
            with Image.open(sample.image) as image:
                image_w, image_h = image.size
                if image.getexif().get(_ORIENTATION) in (5, 6, 7, 8):
                    image_w, image_h = image_h, image_w
        except OSError:  # removed or replaced since it was cached: it still trained, its error is unknown
            continue
        errors.append(abs(width / height - image_w / image_h))
    return errors


def _dataset_dirs(dataset: LoraDataset) -> dict[str, tuple[int, int]]:
    """kohya's ``ss_dataset_dirs``: each folder's (repeats, images); a kohya "N_name" folder is its own."""
    dirs: dict[str, tuple[int, int]] = {}
    for sample in dataset.samples:
        if sample.regularization:  # kohya lists class images apart (ss_reg_dataset_dirs)
            continue
        name = sample.group or Path(dataset.folder).name
        repeats, images = dirs.get(name, (sample.repeats, 0))
        dirs[name] = (repeats, images + 1)
    return dirs


def _dataset_name(folder: str) -> str:
    """The dataset folder as Load LoRA Dataset takes it: relative to ComfyUI's input folder when inside it, else
    only its name (a full path would carry the user's folders into files they share)."""
    path, inputs = Path(os.path.realpath(folder)), Path(os.path.realpath(folder_paths.get_input_directory()))
    return path.relative_to(inputs).as_posix() if path.is_relative_to(inputs) else path.name


def file_parts(lora: TrainedLora, format: str = "auto") -> tuple[str, list[tuple[dict[str, LoraTensors], str | None]]]:
    """(format, [(layers under the names the file uses, key prefix)]) for a ``format`` file of ``lora``: the
    diffusion model's layers, then each text encoder's. A text encoder's layers are keyed as kohya names them
    (``lora_te_``, ``lora_te1_``, ``lora_te2_`` + the path inside its ``transformer``) or, in the comfy format, by
    ComfyUI's own name for its weights (``text_encoders.clip_l.transformer...``)."""
    format, layers, prefix = _diffusion_layers(lora, format)
    parts = [(layers, prefix)]
    encoders: dict[str, dict[str, LoraTensors]] = {}
    for path, tensors in split_layers(lora.layers).get(TEXT_ENCODER, {}).items():
        encoder, _, inside = path.partition(".transformer.")
        encoders.setdefault(encoder, {})[path if format == "comfy" else inside] = tensors
    for encoder, layers in encoders.items():
        if format == "diffusers" or encoder not in lora.family.te_prefixes:
            raise ValueError(f"A {lora.family.name} LoRA's text-encoder layers ({encoder}) have no {format!r} layout; "
                             "save it in the kohya or comfy format")
        parts.append((layers, TEXT_ENCODER.rstrip(".") if format == "comfy" else lora.family.te_prefixes[encoder]))
    return format, parts


def _diffusion_layers(lora: TrainedLora, format: str) -> tuple[str, dict[str, LoraTensors], str | None]:
    """(format, the diffusion model's layers under the names the file uses, key prefix) for a ``format`` file."""
    family = lora.family
    formats = [f for f in family.formats if lora.kind == "lora" or f != "diffusers"]  # diffusers: plain LoRA only
    format = formats[0] if format == "auto" else format
    if format not in SAVE_FORMATS:
        raise ValueError(f"Unknown LoRA format {format!r}; choose one of {list(SAVE_FORMATS)}")
    if format not in formats:
        raise ValueError(f"ComfyUI does not load {family.name} {lora.kind} files in the {format!r} format; choose one "
                         f"of {formats} (or 'auto': {formats[0]})")
    layers = split_layers(lora.layers)[""]
    if format == "kohya" and family.rename is not None:
        names = family.rename(sorted(layers))
        layers = {names[path]: tensors for path, tensors in layers.items()}
    return format, layers, family.file_prefix if format == "diffusers" else None


def file_tensors(lora: TrainedLora, format: str = "auto", dtype: torch.dtype | None = None,
                 text_encoders: bool = True) -> dict:
    """The state dict a LoRA file of ``format`` holds (``text_encoders``: with the text encoders' layers); Apply
    LoRA uses the very same tensors."""
    format, parts = file_parts(lora, format)
    return {key: tensor for layers, prefix in parts[:None if text_encoders else 1]
            for key, tensor in to_state_dict(layers, format=format, prefix=prefix, dtype=dtype).items()}


def metadata_for(lora: TrainedLora, title: str) -> dict[str, str]:
    # where the host cannot tell which file the model came from, the family is what we know of it
    run = dataclasses.replace(lora.run, base_model=lora.run.base_model or lora.family.name)
    return build_metadata(
        base_model_version=lora.family.base_model_version, architecture=lora.family.architecture,
        rank=lora.rank, alpha=lora.alpha, steps=lora.steps, resolution=lora.resolution, title=title,
        config=lora.config, tag_frequency=lora.tag_frequency, trigger=lora.trigger, v2=lora.family.v2, run=run,
    )


def adapter_from_file(model, path: str, clip=None) -> dict[str, LoraTensors]:
    """A LoRA file in any layout ComfyUI loads for ``model`` (ours, kohya's, LyCORIS's, diffusers/peft's, ...) as
    the engine's adapter, keyed by module path inside ``diffusion_model`` (and, given the ``clip``, its text-encoder
    layers by TEXT_ENCODER + path inside ``cond_stage_model``). ComfyUI's own reader finds the layers (its key maps
    and ``comfy.lora.load_lora``), so what LoraLoader would patch is what training continues."""
    import comfy.lora
    import comfy.lora_convert
    import comfy.utils

    name = os.path.basename(path)
    sd = comfy.lora_convert.convert_lora(comfy.utils.load_torch_file(path, safe_load=True))
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    patches = comfy.lora.load_lora(sd, key_map, log_missing=False)
    if not patches:
        raise ValueError(f"{name} has no layer of {type(model.model).__name__}; pick a LoRA made for this model")
    layers = {}
    for key, patch in patches.items():
        if not (isinstance(key, str) and key.endswith(".weight")
                and getattr(patch, "name", None) in ("lora", "loha", "lokr")):
            what = getattr(patch, "name", None) or (patch[0] if isinstance(patch, tuple) else type(patch).__name__)
            raise ValueError(f"{name}: layer {key!r} is a {what} patch{' of a slice' if isinstance(key, tuple) else ''}"
                             ", which Train LoRA cannot continue (it trains LoRA, DoRA, LoHa and LoKr layers of "
                             "whole weights)")
        path = key.removesuffix(".weight")
        diffusion = path.startswith("diffusion_model.")
        layers[path.removeprefix("diffusion_model.") if diffusion else TEXT_ENCODER + path] = _layer_of(
            patch, f"{name}: {key}")
    # the keys ComfyUI read: one set, shared by every adapter of a load_lora call (diffs included)
    used = next((patch.loaded_keys for patch in patches.values() if hasattr(patch, "loaded_keys")), set())
    left = sorted(set(sd) - used)
    if left:
        raise ValueError(f"{name}: {len(left)} of its tensors are not for {type(model.model).__name__}'s layers, e.g. "
                         f"{left[:4]}; pick a LoRA made for this model" + (
                             "" if clip is not None else " (text-encoder layers, lora_te*: connect the clip and set "
                             "te_learning_rate to train them on)"))
    return layers


def _layer_of(patch, where: str) -> LoraTensors:
    """One layer from ComfyUI's adapter object (``weights`` as comfy/weight_adapter lays them out)."""
    if patch.name == "lora":
        up, down, alpha, mid, dora_scale, reshape = patch.weights
        unsupported = {"lora_mid (LoCon's Tucker form)": mid, "reshape_weight": reshape}
        tensors = {"lora_down.weight": down, "lora_up.weight": up}
        if dora_scale is not None:
            unsupported["an input-axis dora_scale (old LyCORIS)"] = dora_scale if dora_scale.shape[0] != up.shape[0] \
                else None
            tensors["dora_scale"] = dora_scale
    elif patch.name == "loha":
        w1a, w1b, alpha, w2a, w2b, t1, t2, dora_scale = patch.weights
        unsupported = {"hada_t1/t2 (Tucker form)": t1 if t1 is not None else t2, "dora_scale": dora_scale}
        tensors = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b}
    else:
        w1, w2, alpha, w1a, w1b, w2a, w2b, t2, dora_scale = patch.weights
        unsupported = {"lokr_t2 (Tucker form)": t2, "dora_scale": dora_scale}
        tensors = {k: v for k, v in dict(lokr_w1=w1, lokr_w1_a=w1a, lokr_w1_b=w1b, lokr_w2=w2, lokr_w2_a=w2a,
                                         lokr_w2_b=w2b).items() if v is not None}
    found = [what for what, tensor in unsupported.items() if tensor is not None]
    if found:
        raise ValueError(f"{where} has {', '.join(found)}, which Train LoRA cannot continue")
    return LoraTensors.read({k: v.detach().float().cpu() for k, v in tensors.items()}, alpha)


def loras_path(name: str, what: str = "Save LoRA: name") -> str:
    """``name`` (subfolders allowed) as a .safetensors path inside ComfyUI's first loras folder; refuse
    anything that would land outside it or that could not be written (``paths.writable``)."""
    return writable(folder_paths.get_folder_paths("loras")[0], name, what=what, suffix=".safetensors")


def lora_name(path: str) -> str:
    """``path`` as LoraLoader lists it: relative to its loras folder, with '/'."""
    return os.path.relpath(path, folder_paths.get_folder_paths("loras")[0]).replace(os.sep, "/")


def write_lora(lora: TrainedLora, name: str, format: str = "auto", precision: str = "fp32",
               what: str = "Save LoRA: name") -> str:
    path = loras_path(name, what)  # checked again when writing: a folder may have become a symlink meanwhile
    metadata = metadata_for(lora, title=os.path.basename(path).removesuffix(".safetensors"))
    save_tensors(path, file_tensors(lora, format, DTYPES[precision]), metadata)
    return path


class SaveLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraTrainerSave", display_name="Save LoRA", category=CATEGORY, is_output_node=True,
            description="Write the LoRA into models/loras (atomically, with metadata); LoraLoader lists it at once, "
                        "under the name this node shows.",
            inputs=[
                LORA.Input("lora", tooltip="From Train LoRA."),
                io.String.Input("name", default="lora_trainer/my_lora", tooltip="File name inside models/loras; "
                                "'/' makes subfolders. An existing file of that name is replaced."),
                io.Combo.Input("format", options=list(SAVE_FORMATS), default="auto", tooltip="auto: the family's "
                               "portable format (kohya for SD/SDXL/FLUX, diffusers-style for Qwen; kohya for a "
                               "DoRA/LoHa/LoKr). comfy: ComfyUI-only generic keys."),
                io.Combo.Input("precision", options=list(DTYPES), default="fp32", tooltip="fp16/bf16 halve the "
                               "file; fp32 keeps it identical to what Apply LoRA uses."),
            ],
            outputs=[io.String.Output("path", display_name="path")],
        )

    @classmethod
    def execute(cls, lora, name, format, precision) -> io.NodeOutput:
        with errors_named("Save LoRA"):
            path = write_lora(lora, name, format, precision)
        if lora.kept not in (None, path):
            with contextlib.suppress(FileNotFoundError):
                os.remove(lora.kept)  # Train LoRA's safety copy: the LoRA is saved now
        return io.NodeOutput(path, ui=ui.PreviewText(lora_name(path)))


class ApplyLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraTrainerApply", display_name="Apply LoRA", category=CATEGORY,
            description="Use the trained LoRA right away: the same patches the stock LoraLoader makes from the "
                        "saved file.",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (not changed: a patched copy comes out)."),
                LORA.Input("lora", tooltip="From Train LoRA."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="LoRA strength, as in LoraLoader."),
                io.Clip.Input("clip", optional=True, tooltip="The CLIP to patch with the LoRA's text-encoder layers "
                              "(trained with te_learning_rate), as LoraLoader's clip input; a patched copy comes out."),
                io.Float.Input("strength_clip", default=1.0, min=-10.0, max=10.0, step=0.01, optional=True,
                               tooltip="The text-encoder layers' strength, as LoraLoader's strength_clip."),
            ],
            outputs=[io.Model.Output(), io.Clip.Output()],
        )

    @classmethod
    def execute(cls, model, lora, strength, clip=None, strength_clip=1.0) -> io.NodeOutput:
        return io.NodeOutput(*with_lora(model, lora, finite("Apply LoRA: strength", strength), clip,
                                        finite("Apply LoRA: strength_clip", strength_clip)))


def with_lora(model, lora: TrainedLora, strength: float, clip=None, strength_clip: float = 1.0):
    """Patched copies of the ModelPatcher and the CLIP (None stays None): the patches the stock LoraLoader makes
    from the saved file."""
    tensors = file_tensors(lora, text_encoders=clip is not None)
    return comfy.sd.load_lora_for_models(model, clip, tensors, strength, strength_clip)
