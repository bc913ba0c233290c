"""Tiny random-weight models of every family, with their text encoders and VAE, built in-process from
ComfyUI's own classes, the way its loaders build them.

A diffusion model starts from the layout of its weights (the keys and shapes a file of it holds, on the meta
device): SD-style UNets from ComfyUI's ``UNetModel``, DiTs from the handful of keys ComfyUI's detection reads.
ComfyUI's ``detect_unet_config`` turns that layout into the model's config, with every argument the host's
model classes take (a new one upstream, such as FLUX's ``txt_ids_dims``, comes from the host itself); the
family's ``supported_models`` class builds it (tiny widths never match a family's detection table, so the
class is named) into the patcher class ComfyUI's loaders use. The CLIP is ``comfy.sd.CLIP`` of the family's own
``clip_target`` (CLIP-L/G, T5, Qwen2.5-VL, with their tokenizers, layer choices, pooling and padding), made
small through ComfyUI's ``<encoder>_model_config`` option; the VAE is ``comfy.sd.VAE`` of a state dict its
detection reads (SD's 4- or 16-channel autoencoder, Qwen's Wan 2.1 VAE at a small width).
The architectures, the conditioning (pooled text, SDXL size embedding, FLUX guidance, Qwen reference latents),
``model_sampling`` and the LoRA key maps are ComfyUI's; only the widths are small.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path


@dataclass(frozen=True)
class Tiny:
    """A family record's [tiny] table (families/<family>.toml)."""

    name: str  # the test's name for it (EXPECTED, Tiny Family Loader)
    config_class: str  # comfy.supported_models class: the record's first
    latent_channels: int
    encoders: dict[str, dict]  # text encoder -> its config overrides (ComfyUI's "<name>_model_config" option)
    unet: dict | None = None  # SD-style UNets: the UNetModel arguments whose weights make the layout
    keys: dict[str, tuple[int, ...]] = field(default_factory=dict)  # DiTs: the keys (and shapes) detection reads
    widths: dict = field(default_factory=dict)  # sizes the family's detection does not read (fixed full-size)
    model_type: str | None = None  # force a comfy.model_base.ModelType (SD2 v-prediction)
    edit: bool = False  # trained on edit pairs (reference latents): the record's
    frames: bool = False  # latents carry a time axis, [C, 1, h, w] (Qwen's Wan VAE), as ComfyUI's VAE gives them
    checkpoint_keys: tuple[str, ...] = ()  # text-encoder weights a checkpoint holds, where the CLIP target asks
    vae: str = "sd"  # sd: SD's autoencoder; wan: Wan 2.1's; flux2: SD's with 32 channels and a batch-norm


# SD-style UNets: a record's [tiny] unet table goes over this
_UNET = dict(use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=64, num_res_blocks=[1, 1],
             channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
             transformer_depth_middle=1, use_spatial_transformer=True,
             num_head_channels=16, num_heads=-1, legacy=False, use_temporal_attention=False,
             use_temporal_resblock=False)


def _clip(width: int, projection: int) -> dict:
    return dict(hidden_size=width, intermediate_size=2 * width, num_attention_heads=2, num_hidden_layers=3,
                projection_dim=projection)


# Text encoders a record names (or it gives the overrides inline). Context 64 wide: CLIP-L alone (SD1), CLIP-H
# (SD2), CLIP-L + CLIP-G side by side (SDXL), T5 (FLUX), Qwen2.5-VL; pooled 32: CLIP-G's projection (SDXL),
# CLIP-L's (FLUX), both (SD3: 64).
ENCODERS = {
    "clip-64": _clip(64, 64),
    "clip-32": _clip(32, 32),
    "t5": dict(d_model=64, d_ff=128, d_kv=16, num_heads=2, num_layers=2),
    "qwen25": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1),
}
RECORDS = Path(__file__).resolve().parents[1] / "families"


def _tiny(record: dict) -> Tiny:
    tiny = dict(record["tiny"])
    encoders = {name: ENCODERS[value] if isinstance(value, str) else value
                for name, value in tiny.pop("encoders").items()}
    unet = {**_UNET, **tiny.pop("unet")} if "unet" in tiny else None
    keys = {key: tuple(shape) for key, shape in tiny.pop("keys", {}).items()}
    return Tiny(config_class=record["config_classes"][0], encoders=encoders, unet=unet, keys=keys,
                edit=record.get("edit", False), checkpoint_keys=tuple(tiny.pop("checkpoint_keys", ())),
                **tiny)


def family_records() -> dict[str, dict]:
    """Every family record (families/<family>.toml), by file name."""
    return {path.stem: tomllib.loads(path.read_text(encoding="utf-8")) for path in sorted(RECORDS.glob("*.toml"))}


TINY = {tiny.name: tiny for tiny in (_tiny(record) for record in family_records().values() if "tiny" in record)}

# diffusers' kohya FLUX converter hard-codes FLUX.1's width (3072, MLP 12288): checking that a file loads there
# needs the real width, at one double and one single block (0.5 G parameters).
FLUX_FULL_WIDTH = replace(TINY["FLUX.1-dev"], widths={"num_heads": 24},
                          keys={key: (3072, *shape[1:]) if len(shape) == 2 else shape
                                for key, shape in TINY["FLUX.1-dev"].keys.items()})


def tiny_model(family: str | Tiny, seed: int = 0, dtype=None, compute_dtype=None):
    """A ComfyUI MODEL of ``family`` (a TINY key, or a spec) with random weights; ComfyUI must be importable.
    ``dtype``: the weights' storage (default fp32), as a file loaded with ComfyUI's weight_dtype would give it;
    ``compute_dtype``: ComfyUI's manual cast for storage it does not compute in (fp8 -> fp32 by default).
    The values are the fp32 model's, rounded to the storage."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import torch

    spec = TINY[family] if isinstance(family, str) else family
    config = _family_config(spec)
    dtype = dtype or torch.float32
    config.set_inference_dtype(dtype, None if dtype == torch.float32 else compute_dtype or torch.float32)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if spec.model_type is not None:  # what SD20.get_model builds when its v-prediction test says so
            base = comfy.model_base.BaseModel(config, model_type=getattr(comfy.model_base.ModelType, spec.model_type))
        else:
            base = config.get_model({})
        _randomize(base.diffusion_model)
    if dtype == torch.float32:
        base.diffusion_model.to(torch.float32)
    patcher = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)  # as the loaders
    return patcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def scaled_fp8_file(model) -> dict:
    """The diffusion model of ``model`` as a scaled-fp8 file holds it (the format of ComfyUI's own fp8 releases):
    each matrix divided by a scale of its own (its largest magnitude over e4m3's 448) and rounded to fp8, the
    scale beside it as ``<layer>.scale_weight``, and the ``scaled_fp8`` marker key."""
    import torch

    out = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for key, tensor in model.model.diffusion_model.state_dict().items():
        if key.endswith(".weight") and tensor.ndim == 2:
            scale = tensor.abs().max().float() / 448
            out[key], out[f"{key[:-len('weight')]}scale_weight"] = (tensor / scale).to(torch.float8_e4m3fn), scale
        else:
            out[key] = tensor
    return out


def load_diffusion_file(family: str, state_dict: dict):
    """A MODEL from a tiny diffusion-model file by ComfyUI's own loader (what Load Diffusion Model runs: format
    detection, scaled-fp8 and quantised layers, the ops it picks). Its detection reads the sizes a file's keys
    give; the record's widths, which a tiny file cannot show (full-size models fix them), go over them as
    tiny_model's config does. It loads in inference mode, as ComfyUI's executor runs the loader node."""
    from unittest import mock

    import comfy.model_detection
    import comfy.sd
    import torch

    detect = comfy.model_detection.detect_unet_config
    with torch.inference_mode(), mock.patch.object(comfy.model_detection, "detect_unet_config",
                                                   lambda *args, **kwargs: {**detect(*args, **kwargs),
                                                                            **TINY[family].widths}):
        return comfy.sd.load_diffusion_model_state_dict(state_dict)


def unbuildable(family: str) -> str | None:
    """Why this ComfyUI cannot build ``family``'s tiny text encoder or VAE (None: it can)."""
    import torch

    spec = TINY[family]
    config = _family_config(spec)
    prefix = config.text_encoder_key_prefix[0]
    if config.clip_target({f"{prefix}{key}": torch.empty(0) for key in spec.checkpoint_keys}) is None:
        return f"this ComfyUI has no text encoder for {spec.config_class} models"
    if spec.vae == "flux2" and "bn.running_mean" not in _autoencoder(spec).state_dict():
        return "this ComfyUI's autoencoder has no batch-normalised latent (FLUX.2's VAE)"
    return None


def tiny_clip(family: str, seed: int = 0):
    """A ComfyUI CLIP of ``family``'s text encoders (its ``clip_target``), small, with random weights."""
    import comfy.sd
    import torch

    spec = TINY[family]
    config = _family_config(spec)
    prefix = config.text_encoder_key_prefix[0]
    target = config.clip_target({f"{prefix}{key}": torch.empty(0) for key in spec.checkpoint_keys})
    clip = comfy.sd.CLIP(target, model_options={f"{name}_model_config": dict(overrides)
                                                for name, overrides in spec.encoders.items()})
    encoder = clip.cond_stage_model
    if "qwen25_7b" in spec.encoders:  # Qwen2.5-VL's vision tower has no config option: swap in a small one
        from comfy.text_encoders.qwen_vl import Qwen2VLVisionTransformer

        language = encoder.qwen25_7b.transformer
        language.visual = Qwen2VLVisionTransformer(
            hidden_size=32, output_hidden_size=spec.encoders["qwen25_7b"]["hidden_size"], intermediate_size=64,
            num_heads=2, num_layers=2, dtype=language.dtype, ops=encoder.qwen25_7b.operations)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        _randomize(encoder)
    return clip


def tiny_vae(family: str, seed: int = 0):
    """A ComfyUI VAE that ComfyUI's own detection builds from a state dict: the SD autoencoder with the
    family's latent channels (4, or 16 for SD3/FLUX), or Qwen-Image's Wan 2.1 VAE at a small width."""
    import comfy.sd
    import torch

    spec = TINY[family]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if spec.frames:
            from comfy.ldm.wan.vae import WanVAE

            model = WanVAE(dim=16, z_dim=spec.latent_channels, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                           attn_scales=[], temperal_downsample=[False, True, True])
        else:
            model = _autoencoder(spec)
        _randomize(model)
    return comfy.sd.VAE(sd=model.state_dict())


def _autoencoder(spec: Tiny):
    """SD's autoencoder with the family's latent channels (4 or 16), or FLUX.2's: 32 channels, patchified 2x2
    into the latent's 128 and batch-normalised."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    from scripts.make_demo_assets import SD_VAE_DDCONFIG

    if spec.vae == "flux2":
        return AutoencoderKL(ddconfig={**SD_VAE_DDCONFIG, "z_channels": 32, "batch_norm_latent": True}, embed_dim=32)
    channels = spec.latent_channels
    return AutoencoderKL(ddconfig={**SD_VAE_DDCONFIG, "z_channels": channels}, embed_dim=channels)


def _family_config(spec: Tiny):
    """ComfyUI's supported_models config of the spec's family, from what its detection reads in the layout."""
    return _config_from(spec, _layout(spec))


def _config_from(spec: Tiny, state_dict: dict):
    import comfy.model_detection
    import comfy.supported_models

    unet_config = comfy.model_detection.detect_unet_config(state_dict, "")
    if unet_config is None:
        raise ValueError(f"ComfyUI's detection does not recognise the {spec.config_class} layout")
    return getattr(comfy.supported_models, spec.config_class)({**unet_config, **spec.widths})


def _layout(spec: Tiny) -> dict:
    """The diffusion model's weights on the meta device: what a file of the tiny model holds, without values."""
    import torch

    if spec.unet is not None:
        import comfy.ops
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

        return UNetModel(**spec.unet, device="meta", operations=comfy.ops.disable_weight_init).state_dict()
    keys = {key: torch.empty(shape, device="meta") for key, shape in spec.keys.items()}
    return _config_from(spec, keys).get_model({}, device="meta").diffusion_model.state_dict()


def _randomize(module) -> None:
    """ComfyUI's ops leave weights uninitialised (checkpoints overwrite them): give layers torch's default
    init, norms ones and zeros, and every other tensor (embeddings, modulation tables) small random values.
    Output layers that real models zero-initialise get random values too, so every LoRA shows. Values are
    drawn in fp32 and rounded to each tensor's storage (torch cannot draw fp8)."""
    import torch

    with torch.no_grad():
        for tensor in module.state_dict(keep_vars=True).values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape) * 0.02)
        for sub in module.modules():
            base = next((c for c in type(sub).__mro__ if c.__module__.startswith("torch.nn")
                         and "reset_parameters" in vars(c)), None)
            if base is not None:
                params = [p for p in sub.parameters(recurse=False) if p.is_floating_point()]
                stored = [p.data for p in params]
                for p in params:
                    p.data = p.data.float()
                base.reset_parameters(sub)
                for p, data in zip(params, stored):
                    p.data = data.copy_(p.data)
            elif "norm" in type(sub).__name__.lower():
                for name, param in sub.named_parameters(recurse=False):
                    param.fill_(1.0 if name in ("weight", "scale", "gamma") else 0.0)
