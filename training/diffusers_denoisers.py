"""Denoisers for diffusers models: one small adapter per family behind training.denoiser.Denoiser.

Optional: for the engine's tests, benchmarks and scripts that train diffusers models. The ComfyUI pack never
imports this module (it adapts ComfyUI's own MODEL in glue/bridge.py; tests/unit/test_layering checks).

Each adapter packs, positions and unpacks whatever its model wants, mirroring the diffusers pipeline that runs
the same model at inference (cited where the logic is copied). ``cond`` keys (batched tensors from the text
encoder(s)):

- ``context`` [B, L, D], always;
- ``mask`` [B, L], 1 = real token, 0 = padding (optional);
- ``pooled`` [B, D'] for FLUX and SDXL;
- ``time_ids`` [B, 6] for SDXL (optional: defaults to the latent size, no crop);
- ``control`` [B, C, h, w] reference latents for edit models (Qwen-Image-Edit, FLUX.1 Kontext).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel, UNet2DConditionModel
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

# ---- 2x2 patch packing (FLUX and Qwen-Image share it) -------------------------------------------

def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, C*4] tokens, row-major over 2x2 patches.

    ``FluxPipeline._pack_latents``; ``QwenImagePipeline._pack_latents`` is the same code.
    """
    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of ``pack_latents``: [B, H/2 * W/2, C*4] -> [B, C, H, W] (latent, not pixel, sizes).

    ``FluxPipeline._unpack_latents`` without its pixel-size/VAE-factor arithmetic.
    """
    b, _, packed_channels = tokens.shape
    x = tokens.view(b, height // 2, width // 2, packed_channels // 4, 2, 2)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, packed_channels // 4, height, width)


# ---- checks shared by the adapters --------------------------------------------------------------

def _check_latents(noisy: torch.Tensor, channels: int, family: str, *, even: bool) -> None:
    if noisy.ndim != 4:
        raise ValueError(f"{family} expects latents [B, C, H, W], got shape {tuple(noisy.shape)}")
    if noisy.shape[1] != channels:
        raise ValueError(f"{family} expects {channels} latent channels, got {noisy.shape[1]} "
                         f"(latents from another model's VAE?)")
    if even and (noisy.shape[2] % 2 or noisy.shape[3] % 2):
        raise ValueError(f"{family} packs 2x2 patches, so latent height and width must be even; got "
                         f"{noisy.shape[2]}x{noisy.shape[3]} (use image sizes that are multiples of 16)")


def _require(cond: Mapping[str, torch.Tensor], key: str, family: str) -> torch.Tensor:
    if key not in cond:
        raise ValueError(f"{family} needs cond[{key!r}]; got keys {sorted(cond)}")
    return cond[key]


def _check_control(control: torch.Tensor, noisy: torch.Tensor, family: str) -> None:
    if control.ndim != 4 or control.shape[:2] != noisy.shape[:2]:
        raise ValueError(f"{family} expects cond['control'] as [B, C, h, w] with B={noisy.shape[0]} and "
                         f"C={noisy.shape[1]} like the latents; got shape {tuple(control.shape)}")
    if control.shape[2] % 2 or control.shape[3] % 2:
        raise ValueError(f"{family} packs 2x2 patches, so the control latents' height and width must be "
                         f"even; got {control.shape[2]}x{control.shape[3]}")


def _set_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    if enabled:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()


# ---- adapters -----------------------------------------------------------------------------------

@dataclass(eq=False)
class UNetDenoiser:
    """SD1.x / SD2.x / SDXL UNet; the DDPM timestep goes in as it is.

    ``mask`` is passed as ``encoder_attention_mask`` when present. Note the SD/SDXL pipelines pass no
    mask (the UNet attends to CLIP's padding tokens at inference), so leave ``mask`` out of ``cond`` to
    train as the model is used. SDXL (``addition_embed_type="text_time"``) needs ``pooled``, and takes
    ``time_ids`` [B, 6] or defaults them to (H·8, W·8, 0, 0, H·8, W·8) from the latent size, as
    ``StableDiffusionXLPipeline._get_add_time_ids`` does for an uncropped image.
    """

    unet: UNet2DConditionModel
    prediction: Literal["eps", "v"] = "eps"

    def __post_init__(self) -> None:
        if self.prediction not in ("eps", "v"):
            raise ValueError(f"UNetDenoiser prediction must be 'eps' or 'v' (SD2.x 768-v models), "
                             f"got {self.prediction!r}")

    @property
    def module(self) -> torch.nn.Module:
        return self.unet

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        _set_checkpointing(self.unet, enabled)

    def __call__(self, noisy: torch.Tensor, timestep: torch.Tensor,
                 cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        _check_latents(noisy, self.unet.config.in_channels, "UNet", even=False)
        dtype = self.unet.dtype
        added = None
        if self.unet.config.addition_embed_type == "text_time":
            pooled = _require(cond, "pooled", "SDXL UNet")
            time_ids = cond.get("time_ids")
            if time_ids is None:
                h, w = noisy.shape[2] * 8, noisy.shape[3] * 8
                time_ids = torch.tensor([h, w, 0, 0, h, w], device=noisy.device).expand(noisy.shape[0], 6)
            added = {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}
        out = self.unet(
            noisy.to(dtype),
            timestep,
            encoder_hidden_states=_require(cond, "context", "UNet").to(dtype),
            encoder_attention_mask=cond.get("mask"),
            added_cond_kwargs=added,
        ).sample
        return out.to(noisy.dtype)


@dataclass(eq=False)
class FluxDenoiser:
    """FLUX.1 transformer: velocity on 2x2-packed tokens, timestep = σ (the model multiplies by 1000;
    ``FluxPipeline`` and diffusers' ``train_dreambooth_lora_flux.py`` pass ``timesteps / 1000``).

    ``guidance`` feeds the guidance embedding when the config has ``guidance_embeds`` (FLUX.1-dev is
    guidance-distilled; 1.0 is the usual training value). ``mask`` is ignored: FLUX attends to T5's
    padding, as ``FluxPipeline`` does. ``control`` (FLUX.1 Kontext) is appended after the target
    tokens with position ids whose first axis is 1, as ``FluxKontextPipeline.prepare_latents`` does.
    """

    transformer: FluxTransformer2DModel
    guidance: float = 1.0
    prediction: ClassVar[str] = "flow"

    @property
    def module(self) -> torch.nn.Module:
        return self.transformer

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        _set_checkpointing(self.transformer, enabled)

    def __call__(self, noisy: torch.Tensor, timestep: torch.Tensor,
                 cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        config = self.transformer.config
        _check_latents(noisy, config.in_channels // 4, "FLUX", even=True)
        dtype, device = self.transformer.dtype, noisy.device
        b, _, h, w = noisy.shape
        context = _require(cond, "context", "FLUX")
        pooled = _require(cond, "pooled", "FLUX")

        # FluxPipeline.prepare_latents / __call__: packed tokens, (0, row, col) ids, zero text ids.
        tokens = pack_latents(noisy.to(dtype))
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)
        control = cond.get("control")
        if control is not None:  # FluxKontextPipeline: reference tokens after the target, ids (1, row, col)
            _check_control(control, noisy, "FLUX Kontext")
            ch, cw = control.shape[2:]
            control_ids = FluxPipeline._prepare_latent_image_ids(b, ch // 2, cw // 2, device, dtype)
            control_ids[..., 0] = 1
            tokens = torch.cat([tokens, pack_latents(control.to(dtype))], dim=1)
            img_ids = torch.cat([img_ids, control_ids], dim=0)
        txt_ids = torch.zeros(context.shape[1], 3, device=device, dtype=dtype)
        guidance = None
        if config.guidance_embeds:
            guidance = torch.full((b,), self.guidance, device=device, dtype=torch.float32)

        out = self.transformer(
            hidden_states=tokens,
            timestep=timestep.to(dtype),
            guidance=guidance,
            pooled_projections=pooled.to(dtype),
            encoder_hidden_states=context.to(dtype),
            txt_ids=txt_ids,
            img_ids=img_ids,
        ).sample
        return unpack_latents(out[:, : (h // 2) * (w // 2)], h, w).to(noisy.dtype)


@dataclass(eq=False)
class QwenImageDenoiser:
    """Qwen-Image (and -Edit) transformer: velocity on 2x2-packed tokens, timestep = σ (the model's
    time projection scales by 1000; ``QwenImagePipeline`` passes ``timestep / 1000``).

    ``mask`` becomes ``encoder_hidden_states_mask``, so padded text tokens are never attended to.
    ``control`` (Qwen-Image-Edit) is packed and appended after the target tokens with ``img_shapes``
    listing both, as ``QwenImageEditPipeline.__call__`` does; only the target tokens are returned.
    Uses the mask-based API of current diffusers (``txt_seq_lens`` is deprecated, gone in 0.39).
    """

    transformer: QwenImageTransformer2DModel
    prediction: ClassVar[str] = "flow"

    @property
    def module(self) -> torch.nn.Module:
        return self.transformer

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        _set_checkpointing(self.transformer, enabled)

    def __call__(self, noisy: torch.Tensor, timestep: torch.Tensor,
                 cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        _check_latents(noisy, self.transformer.config.in_channels // 4, "Qwen-Image", even=True)
        dtype = self.transformer.dtype
        b, _, h, w = noisy.shape
        context = _require(cond, "context", "Qwen-Image")
        mask = cond.get("mask")
        # QwenImagePipeline.encode_prompt drops an all-ones mask: without one, SDPA may pick the flash
        # kernel. note: this is a CPU-GPU sync point, cheap next to the transformer.
        if mask is not None and bool(mask.all()):
            mask = None

        tokens = pack_latents(noisy.to(dtype))
        shapes = [(1, h // 2, w // 2)]
        control = cond.get("control")
        if control is not None:  # QwenImageEditPipeline: reference tokens after the target ones
            _check_control(control, noisy, "Qwen-Image-Edit")
            tokens = torch.cat([tokens, pack_latents(control.to(dtype))], dim=1)
            shapes.append((1, control.shape[2] // 2, control.shape[3] // 2))

        out = self.transformer(
            hidden_states=tokens,
            timestep=timestep.to(dtype),
            encoder_hidden_states=context.to(dtype),
            encoder_hidden_states_mask=mask,
            img_shapes=[shapes] * b,
        ).sample
        return unpack_latents(out[:, : (h // 2) * (w // 2)], h, w).to(noisy.dtype)
