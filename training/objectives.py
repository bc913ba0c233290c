"""Training objectives: what to add to the clean latents, and what the denoiser should predict.

Two families, each a small class with the same three methods:

- ``DDPMObjective`` (SD1.x / SD2.x / SDXL): x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε, integer t ∈ [0, 1000),
  target ε or v, optional min-SNR-γ weighting (Hang et al. 2023) and noise offset.
- ``FlowObjective`` (FLUX, SD3, Qwen-Image): x_σ = (1-σ)·x0 + σ·ε, σ ∈ [0, 1], target ε - x0, with
  SD3's timestep densities (Esser et al. 2024), a timestep shift (fixed, or resolution-dependent as in
  FLUX) and SD3's loss weightings.

The denoiser receives ``timestep`` as the DDPM t for DDPM objectives and as σ for flow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
    compute_snr,
)

OBJECTIVES = ("ddpm-eps", "ddpm-v", "flow")
FLOW_SAMPLINGS = ("uniform", "logit_normal", "mode")
FLOW_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
LOSSES = ("mse", "l1", "huber", "smooth_l1")  # core ComfyUI's and kohya's; huber and smooth_l1 are kohya's pseudo-Huber
HUBER_SCHEDULES = ("snr", "exponential", "constant")  # kohya's huber_schedule


@dataclass(frozen=True)
class NoisedBatch:
    noisy: torch.Tensor  # [B, C, H, W]
    timestep: torch.Tensor  # [B] float: DDPM t, or flow σ
    target: torch.Tensor  # [B, C, H, W]
    weight: torch.Tensor  # [B] per-sample loss weight
    level: torch.Tensor  # [B] noise level in [0, 1]: t / T (DDPM), σ (flow)
    noise_ratio: torch.Tensor  # [B] noise std / signal std: sqrt((1 - ᾱ_t) / ᾱ_t), or σ / (1 - σ)


class DDPMObjective:
    """DDPM with the model's own schedule (``alphas_cumprod``), by default SD's (scaled_linear β from 0.00085 to
    0.012 over 1000 steps)."""

    def __init__(self, prediction: str = "eps", *, min_snr_gamma: float = 0.0, noise_offset: float = 0.0,
                 alphas_cumprod: torch.Tensor | None = None):
        if prediction not in ("eps", "v"):
            raise ValueError(f"DDPM prediction must be 'eps' or 'v', got {prediction!r}")
        if min_snr_gamma < 0 or noise_offset < 0:
            raise ValueError("min_snr_gamma and noise_offset must be >= 0 (0 turns them off)")
        self.name = f"ddpm-{prediction}"
        self.prediction = prediction
        self.min_snr_gamma = min_snr_gamma
        self.noise_offset = noise_offset
        prediction_type = "epsilon" if prediction == "eps" else "v_prediction"
        if alphas_cumprod is None:
            self.scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                           beta_schedule="scaled_linear", prediction_type=prediction_type)
        else:  # ᾱ_t = Π(1 - β), so β_t = 1 - ᾱ_t / ᾱ_(t-1)
            abar = alphas_cumprod.double().cpu()
            betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
            self.scheduler = DDPMScheduler(num_train_timesteps=len(abar), trained_betas=betas.numpy(),
                                           prediction_type=prediction_type)

    def sample_timesteps(self, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        steps = self.scheduler.config.num_train_timesteps
        return torch.randint(0, steps, (x0.shape[0],), generator=generator, device=x0.device)

    def sample_noise(self, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if self.noise_offset:
            offset = torch.randn((*x0.shape[:2], 1, 1), generator=generator, device=x0.device, dtype=x0.dtype)
            noise = noise + self.noise_offset * offset
        return noise

    def make(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> NoisedBatch:
        timesteps = timesteps.long()
        noisy = self.scheduler.add_noise(x0, noise, timesteps)
        target = noise if self.prediction == "eps" else self.scheduler.get_velocity(x0, noise, timesteps)
        weight = torch.ones(x0.shape[0], device=x0.device)
        if self.min_snr_gamma:
            snr = compute_snr(self.scheduler, timesteps)
            clipped = torch.clamp(snr, max=self.min_snr_gamma)
            weight = clipped / (snr + 1) if self.prediction == "v" else clipped / snr
        abar = self.scheduler.alphas_cumprod.to(x0.device)[timesteps].float()
        return NoisedBatch(noisy, timesteps.float(), target, weight,
                           level=timesteps.float() / self.scheduler.config.num_train_timesteps,
                           noise_ratio=((1 - abar) / abar).sqrt())


class FlowObjective:
    """Rectified flow: straight paths from data (σ = 0) to noise (σ = 1), velocity target."""

    name = "flow"
    prediction = "flow"

    def __init__(
        self,
        *,
        sampling: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        shift: float = 1.0,
        dynamic_shift: bool = False,
        weighting: str = "none",
    ):
        if sampling not in FLOW_SAMPLINGS:
            raise ValueError(f"Unknown flow timestep sampling {sampling!r}; choose one of {FLOW_SAMPLINGS}")
        if weighting not in FLOW_WEIGHTINGS:
            raise ValueError(f"Unknown flow loss weighting {weighting!r}; choose one of {FLOW_WEIGHTINGS}")
        if shift <= 0:
            raise ValueError(f"Flow timestep shift must be > 0, got {shift}")
        self.sampling, self.weighting = sampling, weighting
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.shift, self.dynamic_shift = shift, dynamic_shift

    def sample_timesteps(self, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        u = compute_density_for_timestep_sampling(
            self.sampling, x0.shape[0], logit_mean=self.logit_mean, logit_std=self.logit_std,
            mode_scale=self.mode_scale, device=x0.device, generator=generator,
        )
        return shift_sigmas(u, self.shift_for(tuple(x0.shape[-2:])))

    def sample_noise(self, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)

    def make(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> NoisedBatch:
        sigma = timesteps.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        noisy = (1 - sigma) * x0 + sigma * noise
        weight = compute_loss_weighting_for_sd3(self.weighting, timesteps.float())
        sigmas = timesteps.float()
        return NoisedBatch(noisy, sigmas, noise - x0, weight, level=sigmas, noise_ratio=sigmas / (1 - sigmas))

    def shift_for(self, latent_size: tuple[int, int]) -> float:
        """The timestep shift; with ``dynamic_shift``, FLUX's resolution-dependent one (2×2 patches)."""
        if not self.dynamic_shift:
            return self.shift
        return math.exp(flux_mu(latent_size[0] // 2 * (latent_size[1] // 2)))


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift: σ' = s·σ / (1 + (s - 1)·σ); s > 1 spends more steps at high noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flux_mu(image_seq_len: int, base_seq: int = 256, max_seq: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """FLUX's log-shift, linear in the number of image tokens (diffusers' ``calculate_shift``)."""
    slope = (max_shift - base_shift) / (max_seq - base_seq)
    return image_seq_len * slope + (base_shift - slope * base_seq)


def resolve_objective(choice: str, prediction: str) -> str:
    """The objective for a model that predicts ``prediction`` (eps / v / flow): ``auto`` gives its own; an explicit
    choice must fit it (a flow model trained with DDPM targets, or the reverse, learns garbage)."""
    own = {"eps": "ddpm-eps", "v": "ddpm-v", "flow": "flow"}[prediction]
    if choice == "auto":
        return own
    if choice not in OBJECTIVES:
        raise ValueError(f"Unknown objective {choice!r}; choose one of {('auto', *OBJECTIVES)}")
    if (choice == "flow") != (prediction == "flow"):
        raise ValueError(f"objective {choice!r} does not fit a model that predicts {prediction!r}; use 'auto' or "
                         "the model's own objective")
    return choice


def make_objective(name: str, **options: object) -> DDPMObjective | FlowObjective:
    """``name`` is one of OBJECTIVES; options go to the objective's constructor."""
    if name == "flow":
        return FlowObjective(**options)
    if name in ("ddpm-eps", "ddpm-v"):
        return DDPMObjective(name.removeprefix("ddpm-"), **options)
    raise ValueError(f"Unknown objective {name!r}; choose one of {OBJECTIVES}")


def denoising_loss(pred: torch.Tensor, batch: NoisedBatch, loss: str = "mse", huber_c: float = 0.1,
                   huber_schedule: str = "snr", mask: torch.Tensor | None = None,
                   unmasked_weight: float = 0.0, sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``loss`` of each element (in fp32), its mean per sample times the sample's weight (the objective's
    weighting), the mean over the batch. huber / smooth_l1 are kohya's pseudo-Huber losses, whose threshold
    follows ``huber_threshold``: near MSE for small errors, near L1 (robust to outliers) for large ones.

    ``mask`` ([B, 1, H, W] in [0, 1], the latent's last two sizes) weights each position: 1 inside the mask,
    ``unmasked_weight`` outside, linear between (kohya's masked loss, with a weight for the rest of the image).
    ``sample_weight`` ([B]) scales each sample's loss besides the objective's weighting (regularisation images)."""
    error = pred.float() - batch.target.float()
    if loss == "mse":
        per_element = error**2
    elif loss == "l1":
        per_element = error.abs()
    elif loss in ("huber", "smooth_l1"):
        c = huber_threshold(batch, huber_c, huber_schedule).view(-1, *([1] * (error.ndim - 1)))
        per_element = 2 * (torch.sqrt(error**2 + c**2) - c) * (c if loss == "huber" else 1)
    else:
        raise ValueError(f"Unknown loss {loss!r}; choose one of {LOSSES}")
    if mask is not None:
        weight = unmasked_weight + (1 - unmasked_weight) * mask.float()
        per_element = per_element * weight.view(mask.shape[0], *([1] * (error.ndim - 3)), *mask.shape[-2:])
    per_sample = per_element.mean(dim=tuple(range(1, error.ndim))) * batch.weight.float()
    if sample_weight is not None:
        per_sample = per_sample * sample_weight.float()
    return torch.mean(per_sample)


def huber_threshold(batch: NoisedBatch, c: float, schedule: str = "snr") -> torch.Tensor:
    """kohya's Huber threshold per sample: ``constant`` c; ``exponential`` c at full noise rising to 1 at none
    (exp(-α·t), α = -ln(c) / T); ``snr`` (1 - c) / (1 + noise ratio)² + c, from 1 at no noise to c at full noise."""
    if schedule == "constant":
        return torch.full_like(batch.level, c)
    if schedule == "exponential":
        return c**batch.level
    if schedule == "snr":
        return (1 - c) / (1 + batch.noise_ratio) ** 2 + c
    raise ValueError(f"Unknown huber_schedule {schedule!r}; choose one of {HUBER_SCHEDULES}")
