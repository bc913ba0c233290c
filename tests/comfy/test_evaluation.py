"""LoRA Evaluation Grid: the prompts at each strength, as the stock sampler makes them with Apply LoRA, labelled;
and the CLIP vision similarity to the training images, with a tiny CLIP vision model of ComfyUI's own class."""

from __future__ import annotations

import json

import pytest
import torch

from tests.comfy.conftest import run_node
from tests.comfy.test_samples import SAMPLE, _stock_image
from tests.comfy.test_train_nodes import TRAIN, _encoded

TINY_CLIP_VISION = dict(hidden_act="quick_gelu", hidden_size=32, image_size=32, intermediate_size=64,
                        layer_norm_eps=1e-5, model_type="clip_vision_model", num_attention_heads=2, num_channels=3,
                        num_hidden_layers=2, patch_size=8, projection_dim=16)


@pytest.fixture(scope="module")
def trained(comfy, sd15, demo_folder):
    model, clip, vae = sd15
    encoded, _ = _encoded(comfy, sd15, demo_folder)
    lora, *_ = run_node(comfy, "LoraTrainerTrain", model=model, encoded=encoded,
                        **dict(TRAIN, steps=6, learning_rate=5e-3, name="tests/evaluated"))
    (samples,) = run_node(comfy, "LoraTrainerSamples", clip=clip, vae=vae, **SAMPLE)
    return lora, samples


@pytest.fixture(scope="module")
def clip_vision(comfy, tmp_path_factory):
    """ComfyUI's ClipVisionModel from a tiny config (the 0.3.75 host reads it from a file), seeded weights."""
    import comfy.clip_vision

    config = tmp_path_factory.mktemp("clip_vision") / "tiny.json"
    config.write_text(json.dumps(TINY_CLIP_VISION))
    model = comfy.clip_vision.ClipVisionModel(str(config))
    generator = torch.Generator().manual_seed(0)

    def initial(name: str, shape: torch.Size) -> torch.Tensor:
        if "norm" in name or name.endswith("bias"):
            return torch.ones(shape) if "norm" in name and name.endswith("weight") else torch.zeros(shape)
        return torch.randn(shape, generator=generator) / shape[-1] ** 0.5

    model.load_sd({k: initial(k, v.shape) for k, v in model.get_sd().items()})
    return model


def test_each_row_is_what_the_stock_sampler_makes_at_that_strength(comfy, sd15, trained, pack):
    model, clip, vae = sd15
    lora, samples = trained
    grid, report = run_node(comfy, "LoraTrainerEvalGrid", model=model, lora=lora, samples=samples,
                            strengths="0, 0.5 1")
    size, label_w, label_h = 128, pack.glue.samples.LABEL_W, pack.glue.samples.LABEL_H
    assert grid.shape == (1, label_h + 3 * size, label_w + 2 * size, 3)

    def cell(row, column):
        return grid[0, label_h + row * size:label_h + (row + 1) * size, label_w + column * size:
                    label_w + (column + 1) * size]

    for column, prompt in enumerate(("zkx pattern", "a red square")):
        base = _stock_image(comfy, model, clip, vae, prompt, size)
        images = [base]
        for strength in (0.5, 1.0):
            applied, _ = run_node(comfy, "LoraTrainerApply", model=model, lora=lora, strength=strength)
            images.append(_stock_image(comfy, applied, clip, vae, prompt, size))
        assert (images[0] - images[2]).abs().mean() > 0.01  # the LoRA changes the image: not vacuous
        for row, expected in enumerate(images):
            assert (cell(row, column) - expected).abs().mean() < 2 / 255, (prompt, row)
    assert "strengths 0, 0.5, 1" in report and "seed 5" in report, report
    assert "similarity" not in report


def test_similarity_to_the_training_images_per_strength(comfy, sd15, trained, clip_vision, demo_folder, pack):
    model, _, _ = sd15
    lora, samples = trained
    (dataset, _) = run_node(comfy, "LoraTrainerLoadDataset", folder="rings", resolution=128, bucket_multiple=64,
                            strict=True, edit_pairs=False, random_crop=False, flip=False)
    _, report = run_node(comfy, "LoraTrainerEvalGrid", model=model, lora=lora, samples=samples, strengths="0, 1",
                         clip_vision=clip_vision, dataset=dataset)
    line = report.splitlines()[-1]
    assert line.startswith("CLIP vision similarity to 4 training images"), report
    scores = [float(part.rsplit(": ", 1)[1]) for part in line.split(": ", 1)[1].split(", ")]
    assert len(scores) == 2 and all(-1 <= s <= 1 for s in scores) and scores[0] != scores[1], report

    # the measure itself: an image scores 1 against itself, and less against another image
    evaluation, images = pack.glue.evaluation, sorted(demo_folder.glob("*.png"))
    own = pack.glue.loss_plot.image_tensor(pack.training.dataset.load_image(images[0]))[0]
    assert evaluation.similarity(clip_vision, [[own]], images[:1]) == pytest.approx([1.0], abs=1e-5)
    assert evaluation.similarity(clip_vision, [[own]], images[1:2])[0] < 0.999


@pytest.mark.parametrize("inputs, message", [
    (dict(strengths="0, strong"), "strengths '0, strong' is not a list of numbers"),
    (dict(strengths=""), "is not a list of numbers"),
    (dict(strengths="0, 11"), "between -10 and 10"),
    (dict(strengths="1", clip_vision="cv"), "needs both clip_vision"),
])
def test_bad_inputs_are_refused_by_name(comfy, sd15, trained, inputs, message):
    model, _, _ = sd15
    lora, samples = trained
    with pytest.raises(ValueError, match=f"LoRA Evaluation Grid: .*{message}"):
        run_node(comfy, "LoraTrainerEvalGrid", model=model, lora=lora, samples=samples, **inputs)
