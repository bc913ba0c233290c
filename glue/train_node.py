"""Train LoRA: the engine's training loop on ComfyUI's own MODEL, with its progress bar and Cancel."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os

import comfy.model_management as mm
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..training.checkpoint import list_checkpoints
from ..training.config import TrainConfig
from ..training.dataset import tag_frequency
from ..training.loop import TrainingFailed, TrainResult, train
from ..training.lora import KIND_NAMES, adapter_settings
from ..training.memory import remade_weights
from .bridge import (
    ComfyDenoiser,
    ComfyTextEncoder,
    LatentsIn,
    Progress,
    frozen_layers,
    interrupt_now,
    load_for_training,
    pixels_per_latent,
    training_mode,
)
from .dataset_nodes import CATEGORY
from .encode_node import ENCODED
from .families import PRESETS, family_of
from .inputs import errors_named, finite
from .lora_nodes import LORA, TrainedLora, adapter_from_file, loras_path, write_lora
from .loss_plot import loss_curve_image
from .paths import writable
from .samples import SAMPLES, SampleRun, progression_grid

log = logging.getLogger(__name__)


def _config_input(name: str) -> io.Input:
    """A node input for a TrainConfig setting: its type, default, range or choices and help, from the setting."""
    default, option = TrainConfig.options()[name]
    common = dict(default=default, tooltip=option.help)
    if option.choices:
        return io.Combo.Input(name, options=list(option.choices), **common)
    if isinstance(default, bool):
        return io.Boolean.Input(name, **common)
    bounds = dict(min=option.min, max=option.max, step=option.step)
    if isinstance(default, int):
        return io.Int.Input(name, **bounds, **common)
    return io.Float.Input(name, **bounds, round=False, **common)  # as typed: 3e-6 is not rounded to the step


REQUIRED = ("model", "encoded", "steps", "learning_rate", "rank", "alpha", "targets", "objective", "batch_size",
            "seed", "name")
OPTIONAL = ("optimizer", "weight_decay", "lr_schedule", "warmup_steps", "grad_accum", "loss", "huber_c",
            "huber_schedule", "unmasked_weight", "ema_decay", "ema_start", "timestep_sampling", "min_snr_gamma", "noise_offset",
            "precision", "flux_guidance", "gradient_checkpointing", "memory_budget_gb", "checkpoint_every", "resume",
            "adapter", "continue_from", "initial_lora", "samples", "clip", "te_learning_rate",
            "te_stop_step")  # new inputs go last: saved workflows keep
# their widgets' order
# Options that do nothing for a kind of model; the report names them.
INERT = {"flow": ("min_snr_gamma", "noise_offset"), "ddpm": ("timestep_sampling",)}
RANK_DEFAULT = TrainConfig.options()["rank"][0]
NONE = "none"  # continue_from: start a new LoRA


def _placed(node_input: io.Input) -> io.Input:
    """Optional inputs with a widget are advanced ones: the 0.33 frontend folds them away until asked for; older
    ones ignore the flag (their widget inputs take no ``advanced`` argument, hence ``extra_dict``, read by both)."""
    if node_input.id in OPTIONAL:
        node_input.optional = True
        if isinstance(node_input, io.WidgetInput):
            node_input.extra_dict["advanced"] = True
    return node_input


# The node's own inputs; every other input is a TrainConfig setting of the same name (one definition).
NODE_INPUTS = {
    "model": io.Model.Input("model", tooltip="The model to train on, e.g. from Load Checkpoint."),
    "encoded": ENCODED.Input("encoded", tooltip="From Encode Latents Cache (same model family's VAE/CLIP)."),
    "targets": io.Combo.Input("targets", options=list(PRESETS), default="attention", tooltip="Layers that get "
                              "adapters: attention projections, also the MLPs, or every linear layer."),
    "name": io.String.Input("name", default="lora_trainer/my_lora", tooltip="Run name: checkpoints go to "
                            "output/lora_trainer/<name>/, what was trained is kept as models/loras/"
                            "<name>_partial.safetensors until Save LoRA writes it."),
    "alpha": io.Float.Input("alpha", default=float(RANK_DEFAULT), min=0.0, max=1024.0, step=0.5,
                            tooltip="LoRA alpha: the update is scaled by alpha / rank, so alpha = rank is scale 1. "
                            "It follows rank while the two are equal; 0 also means alpha = rank."),
    "flux_guidance": io.Float.Input("flux_guidance", default=1.0, min=0.0, max=100.0, step=0.1,
                                    tooltip="FLUX.1-dev only (other models ignore it): the guidance embedding while "
                                    "training (1.0 as kohya and ai-toolkit; sample with FluxGuidance as usual)."),
    "memory_budget_gb": io.Float.Input("memory_budget_gb", default=0.0, min=0.0, max=1024.0, step=0.5,
                                       tooltip="GPU memory training may use for weights and the step, in GiB; 0: "
                                       "what the GPU has free. Before the first step, what does not fit turns on "
                                       "gradient checkpointing (when auto), then keeps frozen weights in CPU "
                                       "memory, streamed to the GPU layer by layer."),
    "resume": io.Boolean.Input("resume", default=False,
                               tooltip="Continue from this run name's newest checkpoint."),
    "initial_lora": LORA.Input("initial_lora", optional=True, tooltip="Train on from this LoRA (from Train LoRA); "
                               "its kind, rank and alpha replace the node's."),
    "clip": io.Clip.Input("clip", optional=True, tooltip="The model's CLIP (e.g. from Load Checkpoint), for "
                          "te_learning_rate: its text encoder then trains too."),
    "samples": SAMPLES.Input("samples", optional=True, tooltip="From Training Samples: images made with the LoRA "
                             "as trained so far, every N steps, shown here live."),
}


class TrainLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraTrainerTrain", display_name="Train LoRA", category=CATEGORY,
            description="Train a LoRA on the MODEL (which is left unchanged) with the cached dataset. Cancel stops "
                        "within a step. What was learned is kept as '<name>_partial' in models/loras until Save LoRA "
                        "has written it, so a Cancel at any moment after the first step keeps it.",
            inputs=[_placed(_continue_from() if name == "continue_from" else NODE_INPUTS[name] if name in NODE_INPUTS
                            else _config_input(name)) for name in REQUIRED + OPTIONAL],
            outputs=[LORA.Output("lora", display_name="lora"), io.Image.Output("loss_curve", display_name="loss_curve"),
                     io.String.Output("report", display_name="report"),
                     io.Image.Output("progression", display_name="sample progression",
                                     tooltip="The samples of every sample step (rows) and prompt (columns).")],
        )

    @classmethod
    def fingerprint_inputs(cls, continue_from=NONE, **_) -> str:
        """Follows the continue_from file itself, not only its name: a LoRA saved again under that name trains
        again instead of ComfyUI re-using the last run."""
        path = folder_paths.get_full_path("loras", continue_from) if continue_from != NONE else None
        if path is None:
            return continue_from  # none, or a missing file (execute reports it)
        stat = os.stat(path)
        return f"{continue_from}:{stat.st_size}:{stat.st_mtime_ns}"

    @classmethod
    def execute(cls, model, encoded, targets, name, flux_guidance=1.0, resume=False, memory_budget_gb=0.0,
                continue_from=NONE, initial_lora=None, samples=None, clip=None, **settings) -> io.NodeOutput:
        with errors_named("Train LoRA"):
            budget = int(finite("Train LoRA: memory_budget_gb", memory_budget_gb) * 2**30) or None
            initial = _initial_adapter(model, continue_from, initial_lora, clip)
            return train_lora(model, encoded, targets, name, flux_guidance, resume, settings, budget, samples,
                              initial, clip)


def _continue_from() -> io.Input:
    """Made each time the node's schema is: the list is models/loras as it is now, as LoraLoader's."""
    return io.Combo.Input("continue_from", options=[NONE, *folder_paths.get_filename_list("loras")], default=NONE,
                          tooltip="Train on from this LoRA file (ours or another trainer's, in any layout ComfyUI "
                          "loads for this model: LoRA, DoRA, LoHa, LoKr): its kind, rank and alpha replace the "
                          "node's. none: start a new LoRA.")


def _initial_adapter(model, continue_from: str, initial_lora, clip=None) -> dict | None:
    if continue_from != NONE and initial_lora is not None:
        raise ValueError("continue_from and initial_lora are both set; train on from one of them")
    if initial_lora is not None:
        return initial_lora.layers
    if continue_from != NONE:
        return adapter_from_file(model, folder_paths.get_full_path_or_raise("loras", continue_from), clip)
    return None


def _text_encoder(clip, family, preset: str, te_learning_rate: float) -> ComfyTextEncoder | None:
    """The CLIP as the text encoder the run trains, where te_learning_rate asks for one."""
    if not te_learning_rate:
        return None
    if not family.te_prefixes:
        raise ValueError(f"Train LoRA: te_learning_rate trains the CLIP text encoder of SD1.x, SD2.x and SDXL; "
                         f"{family.name}'s text encoder is not trained here. Set te_learning_rate to 0")
    if clip is None:
        raise ValueError("Train LoRA: te_learning_rate is set but clip is not connected; connect the model's CLIP "
                         "(e.g. from Load Checkpoint), or set te_learning_rate to 0")
    missing = [name for name in family.te_prefixes if getattr(clip.cond_stage_model, name, None) is None]
    if missing:
        raise ValueError(f"Train LoRA: the CLIP connected is not {family.name}'s (it has no {', '.join(missing)}); "
                         "connect the CLIP loaded with the model")
    return ComfyTextEncoder(clip, preset)


def train_lora(model, encoded, targets, name, flux_guidance, resume, settings, budget=None,
               samples=None, initial=None, clip=None) -> io.NodeOutput:
    kept_name = f"{name}_partial"
    for checked in (name, kept_name):  # bad names fail now, not after the training
        loras_path(checked, "Train LoRA: name")
    checkpoint_dir = writable(folder_paths.get_output_directory(), f"lora_trainer/{name}/checkpoints",
                              what="Train LoRA: name")
    edit = any(sample.control is not None for sample in encoded.dataset.samples)
    family = family_of(model, edit=edit)
    _check_sizes(encoded, family, model)
    _check_cache(encoded)
    flux_guidance = finite("Train LoRA: flux_guidance", flux_guidance)
    text_encoder = _text_encoder(clip, family, targets, settings.get("te_learning_rate", 0.0))
    clip = clip if text_encoder else None
    denoiser = ComfyDenoiser(model, guidance=family.guidance if family.guidance is None else flux_guidance,
                             family=family, budget=budget, clip=clip)
    if initial:  # the LoRA training continues decides these
        settings = dict(settings, **dict(zip(("adapter", "rank", "alpha"), adapter_settings(initial))))
    config = TrainConfig(**settings, targets=family.targets(targets),
                         log_every=max(1, min(10, settings["steps"] // 20)),
                         checkpoint_dir=checkpoint_dir if settings.get("checkpoint_every") else None)
    resume_from = None
    if resume:
        if not list_checkpoints(checkpoint_dir):
            raise FileNotFoundError(f"Train LoRA: resume is on but {checkpoint_dir} has no checkpoint; "
                                    "turn resume off or set checkpoint_every on the first run")
        resume_from = checkpoint_dir
    progress = Progress(config.steps)
    sampler = None
    if samples is not None:
        sample_dir = writable(folder_paths.get_output_directory(), f"lora_trainer/{name}/samples",
                              what="Train LoRA: name")
        sampler = SampleRun(samples, model, family, encoded.dataset.resolution, sample_dir, progress.show,
                            text_encoder)
    load_for_training(model, budget, clip)
    data = LatentsIn(encoded.data, model)

    def kept(result: TrainResult) -> TrainedLora:
        """The run's LoRA, also written to models/loras/<name>_partial, so that it survives a Cancel from
        now until Save LoRA has written it (Save then removes this copy)."""
        run = TrainedLora.run_info(model, encoded, result, denoiser.guidance)
        if clip is not None and clip.layer_idx is not None:  # kohya's clip skip: 2 is the penultimate layer
            run = dataclasses.replace(run, clip_skip=-clip.layer_idx)
        lora = TrainedLora(result.lora, family, result.steps_done, result.config.to_dict(),
                           encoded.dataset.resolution, tag_frequency(encoded.dataset.samples),
                           encoded.dataset.policy.trigger, result.cancelled, run=run)
        if result.steps_done:
            lora.kept = write_lora(lora, kept_name, what="Train LoRA: name")
        return lora

    with torch.inference_mode(False), torch.enable_grad(), training_mode(), \
            remade_weights(frozen_layers(denoiser.module)), \
            remade_weights(frozen_layers(text_encoder.module)) if text_encoder else contextlib.nullcontext():
        try:
            result = train(config, denoiser, data, on_step=progress.on_step, should_stop=progress.should_stop,
                           initial_lora=initial, resume_from=resume_from, interrupts=(mm.InterruptProcessingException,),
                           sample=sampler, sample_every=samples.every if samples is not None else 0,
                           text_encoder=text_encoder)
        except TrainingFailed as error:
            path = kept(error.result).kept
            raise RuntimeError(f"Train LoRA: {error} Saved the adapter of step {error.result.steps_done} to "
                               f"{path}.") from error
    lora = kept(result)
    if result.cancelled:
        message = (f"Cancelled at step {result.steps_done}/{config.steps}; "
                   + (f"saved the LoRA trained so far to {lora.kept}" if lora.kept else "no step was completed"))
        log.warning(message)
        progress.text(message)
        interrupt_now()
    last = f"{result.losses[-1][1]:.4f}" if result.losses else "n/a"
    trained = result.steps_done - result.first_step
    report = (f"{family.name} {KIND_NAMES[config.adapter]}, {result.objective}, rank {config.rank}, {len(lora.layers)} layers, "
              f"{result.steps_done} steps, final loss {last}"
              + (f", {lora.text_encoder_layers} of the layers in the text encoder at lr {config.te_learning_rate:g}"
                 + (f" until step {config.te_stop_step}" if config.te_stop_step else "")
                 if lora.text_encoder_layers else "")
              + (f", {config.optimizer}, {config.loss} loss" if (config.optimizer, config.loss) != ("adamw", "mse")
                 else "")
              + (f", the EMA of the adapter (decay {config.ema_decay} from step {config.ema_start})"
                 if config.ema_decay else "")
              + (", gradient checkpointing on" if result.gradient_checkpointing else "")
              + (f"; probe loss {result.probe[0][1]:.4f} -> {result.probe[-1][1]:.4f} ({-result.probe_drop:+.0%}: "
                 f"{result.probe_images} training images at fixed noise, steps {result.probe[0][0]} and "
                 f"{result.probe[-1][0]})" if result.probe_drop is not None else "")
              + f"; not used by {family.name} ({result.objective}): {', '.join(inert_options(result.objective, family))}"
              + f"; training {result.train_s:.1f} s"
              + (f" ({result.train_s / trained:.3f} s/step)" if trained else "")
              + (f", sampling {result.sampling_s:.1f} s ({len(result.sample_steps)} × {len(samples.prompts)} "
                 "images)" if samples is not None else ""))
    progression = sampler.progression() if sampler is not None else progression_grid({}, [])
    every = config.checkpoint_every
    chart = loss_curve_image(result.losses, title=f"{name}: loss ({result.objective})", total=config.steps,
                             sample_steps=result.sample_steps,
                             checkpoint_steps=range(every, result.steps_done + 1, every) if every else (),
                             probe=result.probe)
    return io.NodeOutput(lora, chart, report, progression, ui=ui.PreviewText(report))


def inert_options(objective: str, family) -> tuple[str, ...]:
    """The node's options that do nothing for this model and objective."""
    return INERT["flow" if objective == "flow" else "ddpm"] + (("flux_guidance",) if family.guidance is None else ())


def _check_cache(encoded) -> None:
    """The cache files the run will read are as Encode Latents Cache verified them (ComfyUI may hand over that
    node's result from an earlier prompt)."""
    changed = encoded.data.changed_files()
    if changed:
        raise RuntimeError(f"Train LoRA: {len(changed)} files of the latent cache in {encoded.cache_dir} were changed "
                           f"or removed after Encode Latents Cache verified them (e.g. {changed[0]}); queue the "
                           "prompt again: Encode Latents Cache then sees the change and rebuilds them")


def _check_sizes(encoded, family, model) -> None:
    """Every bucket must suit the model's patches (FLUX/SD3/Qwen: multiples of 16 pixels)."""
    factor = pixels_per_latent(model.model)
    bad = sorted({(h * factor, w * factor) for h, w in encoded.data.sizes
                  if (h * factor) % family.bucket_multiple or (w * factor) % family.bucket_multiple})
    if bad:
        raise ValueError(f"Train LoRA: {family.name} needs image sides that are multiples of {family.bucket_multiple} "
                         f"pixels, but the dataset has buckets {bad}; set Load LoRA Dataset's bucket_multiple to "
                         f"{family.bucket_multiple} or 64")
