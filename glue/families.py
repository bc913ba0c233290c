"""What differs per model family: objective, LoRA target presets, file naming, metadata."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import comfy.model_sampling
import comfy.utils

from ..training.lora import ALL_LINEAR

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
SD_ATTENTION_MLP = (*ATTENTION, "ff.net.0.proj", "ff.net.2")
PRESETS = ("attention", "attention+mlp", "all-linear")


@dataclass(frozen=True)
class Family:
    name: str  # display name (SD1.x, SDXL, FLUX.1, ...), or ComfyUI's config class for unknown models
    base_model_version: str  # kohya ss_base_model_version
    architecture: str  # modelspec.architecture
    formats: tuple[str, ...]  # file formats ComfyUI's key map accepts for it; the first is Save LoRA's "auto"
    presets: dict[str, tuple[str, ...] | str] = field(default_factory=dict)  # ComfyUI module-name suffixes
    bucket_multiple: int = 64  # image sides must be multiples of this (VAE factor × patch size)
    v2: bool = False
    guidance: float | None = None  # FLUX-dev: the guidance embedding while training
    # comfy module path -> the module name the portable file uses (kohya: diffusers names for SD1/2)
    file_names: Callable[[list[str]], dict[str, str]] | None = None
    file_prefix: str | None = None  # key prefix of a "diffusers"-format (lora_A/B) file

    @property
    def file_format(self) -> str:
        return self.formats[0]

    def targets(self, preset: str) -> tuple[str, ...] | str:
        if preset not in PRESETS:
            raise ValueError(f"Unknown target preset {preset!r}; choose one of {list(PRESETS)}")
        return ALL_LINEAR if preset == ALL_LINEAR else self.presets.get(preset, ATTENTION)


SD_PRESETS = {"attention": ATTENTION, "attention+mlp": SD_ATTENTION_MLP}
# FLUX: double blocks have separate image/text attention; single blocks fuse attention with the MLP
# (linear1 = qkv + MLP in, linear2 = attention + MLP out), so "attention" includes them, as kohya does.
FLUX_ATTENTION = ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj", "linear1", "linear2")
FLUX_PRESETS = {"attention": FLUX_ATTENTION,
                "attention+mlp": (*FLUX_ATTENTION, "img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2")}
SD3_ATTENTION = ("attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj")
SD3_PRESETS = {"attention": SD3_ATTENTION, "attention+mlp": (*SD3_ATTENTION, "mlp.fc1", "mlp.fc2")}
QWEN_ATTENTION = (*ATTENTION, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
QWEN_PRESETS = {"attention": QWEN_ATTENTION,
                "attention+mlp": (*QWEN_ATTENTION, "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
                                  "txt_mlp.net.2")}


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


def family_of(model, edit: bool = False) -> Family:
    """The family of a ComfyUI ModelPatcher's model; ``edit``: trained on edit pairs (Qwen-Image-Edit)."""
    base = model.model
    name = type(base.model_config).__name__
    v_pred = prediction_of(model) == "v"
    if name == "SD15":
        return Family("SD1.x", "sd_v1", "stable-diffusion-v1/lora", ("kohya", "comfy"), SD_PRESETS,
                      file_names=_diffusers_names(base.model_config.unet_config))
    if name in ("SD20", "SD21UnclipL", "SD21UnclipH"):
        return Family("SD2.x", "sd_v2", f"stable-diffusion-v2-{'768-v' if v_pred else '512'}/lora",
                      ("kohya", "comfy"), SD_PRESETS, v2=True,
                      file_names=_diffusers_names(base.model_config.unet_config))
    if name == "SDXL":
        return Family("SDXL", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", ("kohya", "comfy"), SD_PRESETS)
    if name == "SD3":
        return Family("SD3", "sd3", "stable-diffusion-v3-medium/lora", ("kohya", "comfy"), SD3_PRESETS,
                      bucket_multiple=16)
    if name in ("Flux", "FluxSchnell"):
        dev = bool(base.model_config.unet_config.get("guidance_embed"))
        return Family("FLUX.1", "flux1", f"flux-1-{'dev' if dev else 'schnell'}/lora", ("kohya", "comfy"),
                      FLUX_PRESETS, bucket_multiple=16, guidance=1.0 if dev else None)
    if name == "QwenImage":
        label = "Qwen-Image-Edit" if edit else "Qwen-Image"
        return Family(label, label.lower().replace("-", "_"), f"{label}/lora", ("diffusers", "kohya", "comfy"),
                      QWEN_PRESETS, bucket_multiple=16, file_prefix="diffusion_model")
    return Family(name, name.lower(), f"{name}/lora", ("comfy", "kohya"), {}, bucket_multiple=16)


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
