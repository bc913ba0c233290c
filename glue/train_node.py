"""Train LoRA: the engine's training loop on ComfyUI's own MODEL, with its progress bar and Cancel."""

from __future__ import annotations

import logging

import comfy.model_management as mm
import folder_paths
import torch

from ..training.checkpoint import list_checkpoints
from ..training.config import TrainConfig
from ..training.dataset import tag_frequency
from ..training.loop import TrainingDiverged, TrainResult, train
from ..training.objectives import FLOW_SAMPLINGS, OBJECTIVES
from ..training.optim import LR_SCHEDULES
from .bridge import ComfyDenoiser, LatentsIn, Progress, interrupt_now, load_for_training, training_mode
from .dataset_nodes import CATEGORY
from .families import PRESETS, family_of
from .lora_nodes import TrainedLora, loras_path, write_lora
from .loss_plot import loss_curve_image
from .paths import under

log = logging.getLogger(__name__)


def _tip(text: str, **options) -> dict:
    return {"tooltip": text, **options}


class TrainLora:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LORA", "IMAGE", "STRING")
    RETURN_NAMES = ("lora", "loss_curve", "report")
    FUNCTION = "execute"
    DESCRIPTION = ("Train a LoRA on the MODEL (which is left unchanged) with the cached dataset. Cancel stops "
                   "within a step and saves what was learned as '<name>_partial' in models/loras.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", _tip("The model to train on, e.g. from Load Checkpoint.")),
                "encoded": ("LORA_ENCODED", _tip("From Encode Latents Cache (same model family's VAE/CLIP).")),
                "steps": ("INT", _tip("Optimizer steps.", default=500, min=1, max=1_000_000)),
                "learning_rate": ("FLOAT", _tip("AdamW learning rate (1e-4 is a common start).", default=1e-4,
                                                min=1e-7, max=1.0, step=1e-5, round=False)),
                "rank": ("INT", _tip("LoRA rank: capacity and file size.", default=16, min=1, max=256)),
                "alpha": ("FLOAT", _tip("LoRA alpha; 0 means alpha = rank (scale 1).", default=0.0, min=0.0,
                                        max=1024.0, step=0.5)),
                "targets": (list(PRESETS), _tip("Layers that get adapters: attention projections, also the "
                                                 "MLPs, or every linear layer.", default="attention")),
                "objective": (["auto", *OBJECTIVES], _tip("auto reads the model: eps/v-prediction models get "
                                                          "DDPM targets, flow models rectified flow.",
                                                          default="auto")),
                "batch_size": ("INT", _tip("Images per step (all of one bucket shape).", default=1, min=1,
                                           max=64)),
                "seed": ("INT", _tip("Seeds LoRA init, batch order, noise and timesteps.", default=0, min=0,
                                     max=2**31 - 1)),
                "name": ("STRING", _tip("Run name: checkpoints go to output/lora_trainer/<name>/, a cancelled "
                                        "run saves models/loras/<name>_partial.safetensors.",
                                        default="lora_trainer/my_lora")),
            },
            "optional": {
                "lr_schedule": (list(LR_SCHEDULES), _tip("Learning-rate schedule.", default="constant")),
                "warmup_steps": ("INT", _tip("Linear warm-up steps.", default=0, min=0, max=100_000)),
                "grad_accum": ("INT", _tip("Batches per optimizer step.", default=1, min=1, max=256)),
                "timestep_sampling": (list(FLOW_SAMPLINGS), _tip("Flow models: how σ is drawn.",
                                                                 default="logit_normal")),
                "min_snr_gamma": ("FLOAT", _tip("DDPM models: min-SNR-γ loss weighting; 0 turns it off.",
                                                default=5.0, min=0.0, max=100.0, step=0.5)),
                "noise_offset": ("FLOAT", _tip("DDPM models: noise offset (0.05 helps dark/bright images).",
                                               default=0.0, min=0.0, max=1.0, step=0.01)),
                "precision": (["auto", "fp32", "bf16", "fp16"], _tip("Forward-pass precision; auto = the "
                                                                     "model's. Adapters are always fp32.",
                                                                     default="auto")),
                "flux_guidance": ("FLOAT", _tip("FLUX.1-dev only: the guidance embedding while training (1.0 as "
                                                "kohya and ai-toolkit; sample with FluxGuidance as usual).",
                                                default=1.0, min=0.0, max=100.0, step=0.1)),
                "gradient_checkpointing": (["auto", "off", "on"], _tip(
                    "Trade compute for memory by recomputing activations in the backward pass. auto: off, and "
                    "turned on if a step runs out of GPU memory.", default="auto")),
                "checkpoint_every": ("INT", _tip("Save a resumable checkpoint every N steps (0: never).",
                                                 default=0, min=0, max=1_000_000)),
                "resume": ("BOOLEAN", _tip("Continue from this run name's newest checkpoint.", default=False)),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def execute(self, model, encoded, steps, learning_rate, rank, alpha, targets, objective, batch_size, seed,
                name, lr_schedule="constant", warmup_steps=0, grad_accum=1, timestep_sampling="logit_normal",
                min_snr_gamma=5.0, noise_offset=0.0, precision="auto", flux_guidance=1.0, gradient_checkpointing="auto",
                checkpoint_every=0, resume=False, unique_id=None):
        loras_path(name)  # a bad name fails now, not after the training
        edit = any(sample.control is not None for sample in encoded.dataset.samples)
        family = family_of(model, edit=edit)
        _check_sizes(encoded, family)
        denoiser = ComfyDenoiser(model, guidance=family.guidance if family.guidance is None else flux_guidance)
        checkpoint_dir = under(folder_paths.get_output_directory(), f"lora_trainer/{name}/checkpoints",
                               what="Train LoRA: name")
        config = TrainConfig(
            steps=steps, learning_rate=learning_rate, rank=rank, alpha=alpha, targets=family.targets(targets),
            objective=objective, batch_size=batch_size, seed=seed, lr_schedule=lr_schedule,
            warmup_steps=warmup_steps, grad_accum=grad_accum, timestep_sampling=timestep_sampling,
            min_snr_gamma=min_snr_gamma, noise_offset=noise_offset, precision=precision,
            log_every=max(1, min(10, steps // 20)), gradient_checkpointing=gradient_checkpointing,
            checkpoint_every=checkpoint_every, checkpoint_dir=checkpoint_dir if checkpoint_every else None,
        )
        resume_from = None
        if resume:
            if not list_checkpoints(checkpoint_dir):
                raise FileNotFoundError(f"Train LoRA: resume is on but {checkpoint_dir} has no checkpoint; "
                                        "turn resume off or set checkpoint_every on the first run")
            resume_from = checkpoint_dir
        progress = Progress(steps, unique_id)
        load_for_training(model)
        data = LatentsIn(encoded.data, model)

        def as_lora(result: TrainResult) -> TrainedLora:
            return TrainedLora(result.lora, family, result.steps_done, result.config.to_dict(), encoded.dataset.resolution,
                               tag_frequency(encoded.dataset.samples), encoded.dataset.policy.trigger,
                               result.cancelled)

        with torch.inference_mode(False), torch.enable_grad(), training_mode():
            try:
                result = train(config, denoiser, data, on_step=progress.on_step, should_stop=progress.should_stop,
                               resume_from=resume_from, interrupts=(mm.InterruptProcessingException,))
            except TrainingDiverged as error:
                path = write_lora(as_lora(error.result), f"{name}_partial")
                raise RuntimeError(f"Train LoRA: {error} Saved that adapter to {path}.") from error
        lora = as_lora(result)
        if result.cancelled:
            path = write_lora(lora, f"{name}_partial")
            message = f"Cancelled at step {result.steps_done}/{steps}; saved the LoRA trained so far to {path}"
            log.warning(message)
            progress.text(message)
            interrupt_now()
        last = f"{result.losses[-1][1]:.4f}" if result.losses else "n/a"
        report = (f"{family.name} LoRA, {result.objective}, rank {rank}, {len(lora.layers)} layers, "
                  f"{result.steps_done} steps, final loss {last}"
                  + (", gradient checkpointing on" if result.gradient_checkpointing else ""))
        return (lora, loss_curve_image(result.losses, title=f"{name}: loss ({result.objective})"), report)


def _check_sizes(encoded, family) -> None:
    """Every bucket must suit the model's patches (FLUX/SD3/Qwen: multiples of 16 pixels)."""
    bad = sorted({(h * 8, w * 8) for h, w in encoded.data.sizes if (h * 8) % family.bucket_multiple
                  or (w * 8) % family.bucket_multiple})
    if bad:
        raise ValueError(f"Train LoRA: {family.name} needs image sides that are multiples of {family.bucket_multiple} "
                         f"pixels, but the dataset has buckets {bad}; set Load LoRA Dataset's bucket_multiple to "
                         f"{family.bucket_multiple} or 64")
