"""The LORA type, its portable file form, and the Save LoRA / Apply LoRA nodes."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import comfy.sd
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..training.config import DTYPES
from ..training.formats import build_metadata, save_lora, to_state_dict
from ..training.lora import LoraTensors
from .dataset_nodes import CATEGORY
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
    started_at: float = field(default_factory=time.time)
    kept: str | None = None  # the copy Train LoRA keeps in models/loras until Save LoRA has written this LoRA

    @property
    def rank(self) -> int:
        return next(iter(self.layers.values())).rank

    @property
    def alpha(self) -> float:
        return next(iter(self.layers.values())).alpha


def file_layers(lora: TrainedLora, format: str = "auto") -> tuple[str, dict[str, LoraTensors], str | None]:
    """(format, layers under the names the file uses, key prefix) for a ``format`` file of ``lora``."""
    family = lora.family
    format = family.file_format if format == "auto" else format
    if format not in SAVE_FORMATS:
        raise ValueError(f"Unknown LoRA format {format!r}; choose one of {list(SAVE_FORMATS)}")
    if format not in family.formats:
        raise ValueError(f"ComfyUI does not load {family.name} LoRAs in the {format!r} format; choose one of "
                         f"{list(family.formats)} (or 'auto': {family.file_format})")
    layers = lora.layers
    if format == "kohya" and family.rename is not None:
        names = family.rename(sorted(layers))
        layers = {names[path]: tensors for path, tensors in layers.items()}
    return format, layers, family.file_prefix if format == "diffusers" else None


def file_tensors(lora: TrainedLora, format: str = "auto", dtype: torch.dtype | None = None) -> dict:
    """The state dict a LoRA file of ``format`` holds; Apply LoRA uses the very same tensors."""
    format, layers, prefix = file_layers(lora, format)
    return to_state_dict(layers, format=format, prefix=prefix, dtype=dtype)


def metadata_for(lora: TrainedLora, title: str) -> dict[str, str]:
    return build_metadata(
        base_model_version=lora.family.base_model_version, architecture=lora.family.architecture,
        rank=lora.rank, alpha=lora.alpha, steps=lora.steps, resolution=lora.resolution, title=title,
        config=lora.config, tag_frequency=lora.tag_frequency, trigger=lora.trigger, v2=lora.family.v2,
        started_at=lora.started_at,
    )


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
    format, layers, prefix = file_layers(lora, format)
    metadata = metadata_for(lora, title=os.path.basename(path).removesuffix(".safetensors"))
    save_lora(path, layers, format=format, prefix=prefix, metadata=metadata, dtype=DTYPES[precision])
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
                               "portable format (kohya for SD/SDXL/FLUX, diffusers-style for Qwen). comfy: "
                               "ComfyUI-only generic keys."),
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
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, lora, strength) -> io.NodeOutput:
        return io.NodeOutput(with_lora(model, lora, finite("Apply LoRA: strength", strength)))


def with_lora(model, lora: TrainedLora, strength: float):
    """A patched copy of the ModelPatcher: the patches the stock LoraLoader makes from the saved file."""
    patched, _ = comfy.sd.load_lora_for_models(model, None, file_tensors(lora), strength, 0)
    return patched
