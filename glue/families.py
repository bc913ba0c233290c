"""What differs per model family, read from its record in families/<family>.toml: how ComfyUI's model is
recognised, the LoRA target presets, the file format and metadata, the bucket multiple, guidance and quirks.
The records' [tiny] and [workflow] tables are the test model's recipe and the shipped workflow (scripts/)."""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import comfy.model_sampling
import comfy.utils

from ..training.lora import ALL_LINEAR

RECORDS = Path(__file__).resolve().parents[1] / "families"
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
PRESETS = ("attention", "attention+mlp", "all-linear")
SAMPLING = ("cfg", "sample_steps", "scheduler", "flux_guidance", "sampling_shift")


@dataclass(frozen=True)
class Family:
    name: str  # display name (SD1.x, SDXL, FLUX.1, ...), or ComfyUI's config class for unknown models
    base_model_version: str  # kohya ss_base_model_version
    architecture: str  # modelspec.architecture
    formats: tuple[str, ...]  # file formats ComfyUI's key map accepts for it; the first is Save LoRA's "auto"
    presets: dict[str, tuple[str, ...]] = field(default_factory=dict)  # ComfyUI module-name suffixes
    bucket_multiple: int = 64  # image sides must be multiples of this (VAE factor × patch size)
    v2: bool = False
    guidance: float | None = None  # FLUX-dev: the guidance embedding while training
    in_place_residuals: bool = False  # its blocks add residuals in place (see bridge.OutOfPlaceAdds)
    file_names: str | None = None  # "diffusers": kohya files name the layers the diffusers way (SD1/2)
    rename: Callable[[list[str]], dict[str, str]] | None = field(default=None, compare=False)  # from file_names
    file_prefix: str | None = None  # key prefix of a "diffusers"-format (lora_A/B) file
    # the text encoders whose LoRA trains (SD1/SD2/SDXL): their attribute in ComfyUI's CLIP model -> the kohya key
    # prefix of their layers (lora_te, lora_te1, lora_te2)
    te_prefixes: dict[str, str] = field(default_factory=dict)
    # how ComfyUI's model is recognised: its config class, and where given, its prediction, unet_config values,
    # and whether it is trained on edit pairs
    config_classes: tuple[str, ...] = ()
    prediction: str | None = None
    unet_config: dict = field(default_factory=dict)
    edit: bool = False
    # how its shipped workflow samples (the record's [workflow] cfg, sample_steps, scheduler, flux_guidance,
    # sampling_shift): Training Samples' "auto" values
    sampling: dict = field(default_factory=dict, compare=False)

    @property
    def file_format(self) -> str:
        return self.formats[0]

    def targets(self, preset: str) -> tuple[str, ...] | str:
        if preset not in PRESETS:
            raise ValueError(f"Unknown target preset {preset!r}; choose one of {list(PRESETS)}")
        return ALL_LINEAR if preset == ALL_LINEAR else self.presets.get(preset, ATTENTION)

    def matches(self, config_class: str, prediction: str, unet_config: dict) -> bool:
        return (config_class in self.config_classes and self.prediction in (None, prediction)
                and all(unet_config.get(key) == value for key, value in self.unet_config.items()))

    @classmethod
    def from_record(cls, path: Path) -> Family:
        record = tomllib.loads(path.read_text(encoding="utf-8"))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(record) - known - {"tiny", "workflow"})
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; a family record has {sorted(known)}")
        values = {key: value for key, value in record.items() if key in known}
        values["presets"] = {preset: tuple(names) for preset, names in values.get("presets", {}).items()}
        values["sampling"] = {key: value for key, value in record.get("workflow", {}).items() if key in SAMPLING}
        return cls(**{**values, "formats": tuple(values["formats"]), "config_classes": tuple(values["config_classes"])})


FAMILIES = tuple(Family.from_record(path) for path in sorted(RECORDS.glob("*.toml")))


def family_of(model, edit: bool = False) -> Family:
    """The family of a ComfyUI ModelPatcher's model; ``edit``: trained on edit pairs (Qwen-Image-Edit)."""
    config = model.model.model_config
    name = type(config).__name__
    found = [f for f in FAMILIES if f.matches(name, prediction_of(model), config.unet_config)]
    if not found:
        return Family(name, name.lower(), f"{name}/lora", ("comfy", "kohya"), bucket_multiple=16)
    family = next((f for f in found if f.edit == edit), found[0])
    if family.file_names == "diffusers":
        family = dataclasses.replace(family, rename=_diffusers_names(config.unet_config))
    return family


def _diffusers_names(unet_config: dict) -> Callable[[list[str]], dict[str, str]]:
    """SD1/SD2 kohya files name layers the diffusers way (``down_blocks_0_attentions_0_…``); ComfyUI's
    own table (``comfy.utils.unet_to_diffusers``) says which diffusers weight each LDM weight is."""
    comfy_to_diffusers = {v.removesuffix(".weight"): k.removesuffix(".weight")
                          for k, v in comfy.utils.unet_to_diffusers(unet_config).items() if k.endswith(".weight")}

    def rename(paths: list[str]) -> dict[str, str]:
        missing = [p for p in paths if p not in comfy_to_diffusers]
        if missing:
            raise ValueError(f"No diffusers name for {missing[:5]}: save in the 'comfy' format instead")
        return {p: comfy_to_diffusers[p] for p in paths}

    return rename


def prediction_of(model) -> str:
    """eps / v / flow, from ComfyUI's model_sampling (V_PREDICTION subclasses EPS: test it first)."""
    sampling = model.get_model_object("model_sampling")
    if isinstance(sampling, comfy.model_sampling.V_PREDICTION):
        return "v"
    if isinstance(sampling, comfy.model_sampling.CONST):
        return "flow"
    if isinstance(sampling, comfy.model_sampling.EPS):
        return "eps"
    raise ValueError(f"Cannot train a model with {type(sampling).__name__} sampling (EDM, x0, ...): "
                     "only eps, v-prediction and flow models are supported")
