"""What differs per model family: objective, LoRA target presets, file naming, metadata."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import comfy.model_sampling
import comfy.utils

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
SD_ATTENTION_MLP = (*ATTENTION, "ff.net.0.proj", "ff.net.2")
PRESETS = ("attention", "attention+mlp", "all-linear")


@dataclass(frozen=True)
class Family:
    name: str  # ComfyUI's model config class (SD15, SDXL, Flux, ...), or "generic"
    base_model_version: str  # kohya ss_base_model_version
    architecture: str  # modelspec.architecture
    file_format: str  # what Save LoRA writes when asked for "auto"
    presets: dict[str, tuple[str, ...] | str] = field(default_factory=dict)
    v2: bool = False
    # comfy module path -> the module name the portable file uses (kohya: diffusers names for SD1/2)
    file_names: Callable[[list[str]], dict[str, str]] | None = None

    def targets(self, preset: str) -> tuple[str, ...] | str:
        if preset not in PRESETS:
            raise ValueError(f"Unknown target preset {preset!r}; choose one of {list(PRESETS)}")
        return self.presets.get(preset, "all-linear" if preset == "all-linear" else ATTENTION)


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


def family_of(model) -> Family:
    """The family of a ComfyUI ModelPatcher's model."""
    base = model.model
    name = type(base.model_config).__name__
    sd_presets = {"attention": ATTENTION, "attention+mlp": SD_ATTENTION_MLP}
    if name == "SD15":
        return Family(name, "sd_v1", "stable-diffusion-v1/lora", "kohya", sd_presets,
                      file_names=_diffusers_names(base.model_config.unet_config))
    if name in ("SD20", "SD21UnclipL", "SD21UnclipH"):
        return Family(name, "sd_v2", "stable-diffusion-v2/lora", "kohya", sd_presets, v2=True,
                      file_names=_diffusers_names(base.model_config.unet_config))
    if name == "SDXL":
        return Family(name, "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "kohya", sd_presets)
    return Family(name, name.lower(), f"{name}/lora", "comfy", {})


def prediction_of(model) -> str:
    """eps / v / flow, from ComfyUI's model_sampling (V_PREDICTION subclasses EPS: test it first)."""
    sampling = model.model.model_sampling
    if isinstance(sampling, comfy.model_sampling.V_PREDICTION):
        return "v"
    if isinstance(sampling, comfy.model_sampling.CONST):
        return "flow"
    if isinstance(sampling, comfy.model_sampling.EPS):
        return "eps"
    raise ValueError(f"Cannot train a model with {type(sampling).__name__} sampling (EDM, x0, ...): "
                     "only eps, v-prediction and flow models are supported")


def objective_for_model(model, choice: str) -> str:
    """``auto`` -> the model's own objective; an explicit choice is kept."""
    if choice != "auto":
        return choice
    return {"eps": "ddpm-eps", "v": "ddpm-v", "flow": "flow"}[prediction_of(model)]


def flow_shift_of(model) -> float:
    return float(getattr(model.model.model_sampling, "shift", 1.0))
