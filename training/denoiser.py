"""What the training loop trains: a denoiser, any model that maps noisy latents, a noise level and conditioning
to a prediction. glue/bridge.py adapts ComfyUI's MODEL; training/diffusers_denoisers.py adapts diffusers models
(tests, benchmarks)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

PREDICTIONS = ("eps", "v", "flow")


@dataclass(frozen=True)
class NoiseSchedule:
    """The noise schedule the model was trained with and samples with, which training uses too.

    DDPM models: ``alphas_cumprod`` (ᾱ_t for t = 0 … T-1; None: SD's scaled-linear β 0.00085-0.012 over 1000
    steps). Flow models: ``shift``, as an SD3-style factor (σ' = s·σ / (1 + (s-1)·σ))."""

    alphas_cumprod: torch.Tensor | None = None
    shift: float = 1.0


class Denoiser(Protocol):
    """What the training loop calls. ``module`` is the root for LoRA injection (LoRA names are relative
    to it); ``prediction`` is what ``__call__`` returns: "eps", "v" or "flow" (velocity ε - x0).

    ``timestep`` is a float tensor [B]: the DDPM t in [0, 1000) for eps/v models, σ in [0, 1] for
    flow models (x_σ = (1-σ)·x0 + σ·ε). ``cond`` holds the batched conditioning (``context`` [B, L, D], and
    what the model's text encoders and edit pairs add). Adapters may also offer ``schedule`` (a NoiseSchedule;
    without it, the defaults above), ``dtype`` (what the forward pass computes in; without it, the weights'
    dtype), ``device`` (where it computes; without it, the first weight's device) and
    ``set_gradient_checkpointing(bool)``.
    """

    @property
    def module(self) -> torch.nn.Module: ...

    @property
    def prediction(self) -> str: ...

    def __call__(self, noisy: torch.Tensor, timestep: torch.Tensor,
                 cond: Mapping[str, torch.Tensor]) -> torch.Tensor: ...


TEXT_KEYS = ("context", "pooled", "mask")  # the conditioning a text encoder gives (the rest: edit pairs' control)


class TextEncoder(Protocol):
    """A text encoder the loop trains beside the denoiser (``TrainConfig.te_learning_rate``): captions are then
    encoded every step, through its adapter. ``module`` is the root for LoRA injection, ``targets`` its layers'
    name suffixes, ``device`` where its adapter computes; ``__call__`` returns the batched text conditioning
    (TEXT_KEYS: ``context`` [B, L, D], ``pooled`` where the model uses it, ``mask``) on any device (the loop moves
    it to the denoiser's), with gradients where they are enabled."""

    @property
    def module(self) -> torch.nn.Module: ...

    @property
    def targets(self) -> tuple[str, ...]: ...

    @property
    def device(self) -> torch.device: ...

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]: ...
