"""LoRA Evaluation Grid: the prompts at several LoRA strengths with one seed, labelled; and, with a CLIP vision
model, how close the images at each strength are to the training images."""

from __future__ import annotations

import re

import torch
from comfy_api.latest import io, ui

from ..training.dataset import load_image
from .dataset_nodes import CATEGORY, DATASET
from .inputs import errors_named
from .lora_nodes import LORA, with_lora
from .loss_plot import image_tensor
from .samples import SAMPLES, Sampler, labelled_grid

MAX_REFERENCES = 64  # training images compared with; more add time, hardly precision


class EvaluationGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraTrainerEvalGrid", display_name="LoRA Evaluation Grid", category=CATEGORY,
            is_output_node=True,
            description="Generate the prompts of a Training Samples node at each LoRA strength, with its seed and "
                        "sampler: a row per strength, a column per prompt. With a CLIP vision model and the dataset, "
                        "the report gives each strength's similarity to the training images.",
            inputs=[
                io.Model.Input("model", tooltip="The model the LoRA was trained on (e.g. from Load Checkpoint)."),
                LORA.Input("lora", tooltip="From Train LoRA."),
                SAMPLES.Input("samples", tooltip="From Training Samples: the prompts, seed, sampler, size and VAE "
                              "(its every_n_steps is not used here)."),
                io.String.Input("strengths", default="0, 0.5, 1.0", tooltip="LoRA strengths, comma-separated; "
                                "0 is the model without the LoRA. One row each."),
                io.ClipVision.Input("clip_vision", optional=True, tooltip="From Load CLIP Vision: scores each "
                                    "strength by the cosine similarity of its images to the training images."),
                DATASET.Input("dataset", optional=True, tooltip="From Load LoRA Dataset: the training images the "
                              "similarity compares with (needs clip_vision)."),
            ],
            outputs=[io.Image.Output("grid", display_name="grid"), io.String.Output("report", display_name="report")],
        )

    @classmethod
    def execute(cls, model, lora, samples, strengths, clip_vision=None, dataset=None) -> io.NodeOutput:
        with errors_named("LoRA Evaluation Grid"):
            levels = parse_strengths(strengths)
            if (clip_vision is None) != (dataset is None):
                raise ValueError("LoRA Evaluation Grid: the similarity needs both clip_vision (Load CLIP Vision) and "
                                 "dataset (Load LoRA Dataset); connect the other one, or neither")
            sampler = Sampler(samples, model, lora.family, lora.resolution, "LoRA Evaluation Grid")
            rows = [(f"strength {level:g}", [sampler(with_lora(model, lora, level)[0] if level else model, positive)
                                             for positive in sampler.positives]) for level in levels]
            grid = labelled_grid(rows, samples.prompts)
            report = (f"{lora.family.name} LoRA of {lora.steps} steps at strengths {', '.join(f'{v:g}' for v in levels)}"
                      f"; seed {samples.seed}, {sampler.steps} steps, cfg {sampler.cfg:g}, {sampler.width}×"
                      f"{sampler.height}")
            if lora.text_encoder_layers:  # the prompts come encoded from Training Samples, with its CLIP
                report += (f"; its {lora.text_encoder_layers} text-encoder layers are not applied: Training Samples encoded the "
                           "prompts with the CLIP it was given")
            if clip_vision is not None:
                references = [sample.image for sample in dataset.samples][:MAX_REFERENCES]
                scores = similarity(clip_vision, [images for _, images in rows], references)
                report += (f"\nCLIP vision similarity to {len(references)} training images (mean cosine): "
                           + ", ".join(f"strength {level:g}: {score:.3f}" for level, score in zip(levels, scores)))
        preview = ui.PreviewImage(grid, cls=cls).as_dict()
        return io.NodeOutput(grid, report, ui={**preview, "text": [report]})


def parse_strengths(text: str) -> list[float]:
    parts = [part for part in re.split(r"[,\s]+", text.strip()) if part]
    try:
        levels = [float(part) for part in parts]
    except ValueError:
        levels = []
    if not levels or not all(abs(level) <= 10 for level in levels):
        raise ValueError(f"LoRA Evaluation Grid: strengths {text!r} is not a list of numbers between -10 and 10; "
                         "write them comma-separated, e.g. '0, 0.5, 1.0'")
    return levels


def similarity(clip_vision, rows: list[list[torch.Tensor]], references: list) -> list[float]:
    """Per row: the mean cosine similarity of its images' CLIP vision embeddings to the references'."""
    def embeds(images: list[torch.Tensor]) -> torch.Tensor:  # each [1, H, W, 3]
        encoded = torch.cat([clip_vision.encode_image(image)["image_embeds"] for image in images])
        return torch.nn.functional.normalize(encoded.float(), dim=-1)

    reference = embeds([image_tensor(load_image(path)) for path in references])
    return [(embeds([image[None] for image in images]) @ reference.T).mean().item() for images in rows]
