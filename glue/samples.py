"""Training Samples: images that ComfyUI's own sampler makes with the LoRA as trained so far, while Train LoRA
trains. Each appears live on the Train node, is saved beside the run, and the progression (sample step × prompt)
is one labelled IMAGE."""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass

import comfy.model_sampling
import comfy.sample
import comfy.samplers
import node_helpers
import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image, ImageDraw

from .bridge import pixels_per_latent
from .dataset_nodes import CATEGORY
from .families import Family
from .loss_plot import image_tensor

SAMPLES = io.Custom("LORA_TRAINING_SAMPLES")
AUTO = "auto"


@dataclass
class SampleSettings:
    """SAMPLES: what to sample and how; 0 / "auto" take the family's values (its shipped workflow's)."""

    prompts: list[str]  # labels, one per positive
    positives: list  # CONDITIONING, one per prompt
    negative: list  # CONDITIONING
    vae: object
    every: int
    seed: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    width: int
    height: int
    negative_prompt: str = ""  # what ``negative`` encodes
    encoded_prompts: int = 0  # how many of ``positives`` encode ``prompts`` (the rest: the positive input)


class TrainingSamples(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraTrainerSamples", display_name="Training Samples", category=CATEGORY,
            description="Connect to Train LoRA's 'samples' input: every N steps it generates these prompts with the "
                        "LoRA as trained so far (ComfyUI's own sampler, fixed seed), shows each image on the node "
                        "and saves it in output/lora_trainer/<name>/samples/.",
            inputs=[
                io.Clip.Input("clip", tooltip="Encodes the prompts (the model's text encoder, as for CLIP Text Encode)."),
                io.Vae.Input("vae", tooltip="Decodes the samples (the model's VAE)."),
                io.String.Input("prompts", multiline=True, default="", tooltip="One prompt per line; put the "
                                "trigger word in them. Each is one column of the progression."),
                io.String.Input("negative_prompt", default="", tooltip="The negative prompt of every sample."),
                io.Int.Input("every_n_steps", default=100, min=0, max=1_000_000, tooltip="Sample every N steps, "
                             "and always before the first step and after the last; 0: only those two."),
                io.Int.Input("seed", default=42, min=0, max=2**63 - 1, tooltip="The noise seed, the same at every "
                             "sample step so that the images are comparable."),
                io.Int.Input("steps", default=0, min=0, max=200, tooltip="Sampler steps; 0: the family's usual "
                             "(its shipped workflow's)."),
                io.Float.Input("cfg", default=0.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="CFG scale; "
                               "0: the family's usual (FLUX: 1, with its guidance at the workflow's 3.5)."),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default="euler",
                               tooltip="As in KSampler."),
                io.Combo.Input("scheduler", options=[AUTO, *comfy.samplers.KSampler.SCHEDULERS], default=AUTO,
                               tooltip="As in KSampler; auto: the family's usual."),
                io.Int.Input("width", default=0, min=0, max=8192, step=16, tooltip="0: the training resolution."),
                io.Int.Input("height", default=0, min=0, max=8192, step=16, tooltip="0: the training resolution."),
                io.Conditioning.Input("positive", optional=True, tooltip="A conditioning to sample besides the "
                                      "prompts, e.g. from TextEncodeQwenImageEdit for an edit model."),
            ],
            outputs=[SAMPLES.Output("samples", display_name="samples")],
        )

    @classmethod
    def execute(cls, clip, vae, prompts, negative_prompt, every_n_steps, seed, steps, cfg, sampler_name, scheduler,
                width, height, positive=None) -> io.NodeOutput:
        lines = [line.strip() for line in prompts.splitlines() if line.strip()]
        if not lines and positive is None:
            raise ValueError("Training Samples: prompts is empty; write one prompt per line (or connect positive)")
        if clip is None:
            raise ValueError("Training Samples: clip is not connected; connect the model's CLIP (e.g. from Load "
                             "Checkpoint)")
        positives = [_encode(clip, line) for line in lines] + ([positive] if positive is not None else [])
        labels = lines + (["(positive input)"] if positive is not None else [])
        return io.NodeOutput(SampleSettings(labels, positives, _encode(clip, negative_prompt), vae, every_n_steps,
                                            seed, steps, cfg, sampler_name, scheduler, width, height, negative_prompt,
                                            len(lines)))


def _encode(clip, text: str) -> list:
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


class Sampler:
    """ComfyUI's sampler with the settings' steps, cfg, sampler and schedule and one latent, noise and sigmas, made
    once: every image starts from the same point, so images differ only by the model and the prompt."""

    def __init__(self, settings: SampleSettings, model, family: Family, resolution: int, what: str):
        self.settings = settings
        usual = family.sampling
        self.steps = settings.steps or usual.get("sample_steps", 20)
        self.cfg = settings.cfg or usual.get("cfg", 7.0)
        self.scheduler = usual.get("scheduler", "normal") if settings.scheduler == AUTO else settings.scheduler
        self.width, self.height = settings.width or resolution, settings.height or resolution
        factor = pixels_per_latent(model.model)
        if self.width % factor or self.height % factor:
            raise ValueError(f"{what}: the samples' width and height must be multiples of {factor} for "
                             f"{family.name}, got {self.width}×{self.height}; change them on Training Samples")
        guidance = usual.get("flux_guidance") if family.guidance is not None else None
        self.positives = [_with_guidance(c, guidance) for c in settings.positives]
        self.negative = _with_guidance(settings.negative, guidance)
        latent = torch.zeros([1, 4, self.height // factor, self.width // factor])
        self.latent = comfy.sample.fix_empty_latent_channels(model, latent)
        with torch.random.fork_rng(devices=[]):  # prepare_noise seeds the global RNG
            self.noise = comfy.sample.prepare_noise(self.latent, settings.seed)
        self.sigmas = _shifted_sigmas(model, usual.get("sampling_shift"), self.scheduler, self.steps)

    def __call__(self, model, positive, negative: list | None = None) -> torch.Tensor:
        """[H, W, 3]: ``positive`` generated with ``model`` (a ModelPatcher) and decoded."""
        s = self.settings
        samples = comfy.sample.sample(model, self.noise, self.steps, self.cfg, s.sampler_name, self.scheduler,
                                      positive, negative or self.negative, self.latent, sigmas=self.sigmas,
                                      disable_pbar=True, seed=s.seed)
        images = s.vae.decode(samples)
        return images.reshape(-1, *images.shape[-3:])[0].float().cpu()  # a video VAE (Qwen's) adds a frame axis


class SampleRun:
    """``train``'s ``sample`` callback: every prompt at the step, on the model being trained (its adapters are live
    in the layers); saved, shown, and kept for the progression."""

    def __init__(self, settings: SampleSettings, model, family: Family, resolution: int, folder: str, show,
                 text_encoder=None):
        self.model, self.folder, self.show = model, folder, show
        self.text_encoder = text_encoder  # a text encoder in training: the prompts are encoded through it each time
        self.sampler = Sampler(settings, model, family, resolution, "Train LoRA")
        os.makedirs(folder, exist_ok=True)
        self.images: dict[int, list[torch.Tensor]] = {}  # step -> [H, W, 3] per prompt

    def __call__(self, step: int) -> None:
        images, positives, negative = [], self.sampler.positives, None
        if self.text_encoder is not None:  # the prompts through the text encoder as trained so far
            settings = self.sampler.settings
            positives = [self.text_encoder.conditioning(prompt) for prompt in
                         settings.prompts[:settings.encoded_prompts]] + positives[settings.encoded_prompts:]
            negative = self.text_encoder.conditioning(settings.negative_prompt)
        with _loaded_with(self.model, self.text_encoder.clip.patcher if self.text_encoder else None):
            for index, positive in enumerate(positives):
                image = self.sampler(self.model, positive, negative)
                images.append(image)
                pil = pil_image(image)
                pil.save(os.path.join(self.folder, f"step_{step:06d}_{index + 1}.png"))
                self.show(pil, step)
        self.images[step] = images

    def progression(self) -> torch.Tensor:
        """[1, H, W, 3]: a row per sample step, a column per prompt, labelled."""
        return progression_grid(self.images, self.sampler.settings.prompts)


@contextlib.contextmanager
def _loaded_with(model, patcher):
    """ComfyUI's sampler loads ``patcher`` (the CLIP whose text encoder trains) together with ``model``, as it loads a
    ControlNet, instead of unloading it to make room: the text encoder's weights and adapter stay where training
    has them."""
    if patcher is None:
        yield
        return
    key = "lora_trainer.text_encoder"
    model.set_additional_models(key, [patcher])
    try:
        yield
    finally:
        model.additional_models.pop(key, None)


def _shifted_sigmas(model, shift: float | None, scheduler: str, steps: int) -> torch.Tensor | None:
    """The family's shifted schedule (what ModelSamplingAuraFlow gives the shipped workflows), else None: the
    model's own."""
    sampling = model.get_model_object("model_sampling")
    if shift is None or not isinstance(sampling, comfy.model_sampling.ModelSamplingDiscreteFlow):
        return None
    shifted = copy.deepcopy(sampling)
    shifted.set_parameters(shift=shift, multiplier=sampling.multiplier)
    return comfy.samplers.calculate_sigmas(shifted, scheduler, steps)


def _with_guidance(conditioning: list, guidance: float | None) -> list:
    if guidance is None or all("guidance" in c[1] for c in conditioning):
        return conditioning
    return node_helpers.conditioning_set_values(conditioning, {"guidance": guidance})


def pil_image(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(np.clip(image.numpy() * 255.0, 0, 255).astype(np.uint8))


LABEL_W, LABEL_H = 90, 28


def progression_grid(images: dict[int, list[torch.Tensor]], prompts: list[str]) -> torch.Tensor:
    """The images of each sample step side by side, steps top to bottom, under the prompts; [1, H, W, 3]."""
    if not images:
        canvas = Image.new("RGB", (480, 120), "white")
        ImageDraw.Draw(canvas).text((12, 50), "no samples: connect Training Samples to Train LoRA", fill="black")
        return image_tensor(canvas)
    return labelled_grid([("before" if step == 0 else f"step {step}", row) for step, row in sorted(images.items())],
                         prompts)


def labelled_grid(rows: list[tuple[str, list[torch.Tensor]]], columns: list[str]) -> torch.Tensor:
    """[1, H, W, 3]: each row's [H, W, 3] images side by side, the row's label on its left, the column labels on
    top."""
    height, width = rows[0][1][0].shape[:2]
    canvas = Image.new("RGB", (LABEL_W + len(columns) * width, LABEL_H + len(rows) * height), "white")
    draw = ImageDraw.Draw(canvas)
    for column, label in enumerate(columns):
        draw.text((LABEL_W + column * width + 4, 8), _fit(draw, label, width - 8), fill="black")
    for row, (label, images) in enumerate(rows):
        top = LABEL_H + row * height
        draw.text((6, top + height // 2 - 6), _fit(draw, label, LABEL_W - 8), fill="black")
        for column, image in enumerate(images):
            canvas.paste(pil_image(image), (LABEL_W + column * width, top))
    return image_tensor(canvas)


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    while text and draw.textlength(text) > width:
        text = text[:-2] + "…" if len(text) > 2 else ""
    return text
