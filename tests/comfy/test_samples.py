"""Samples while training (Training Samples -> Train LoRA): ComfyUI's own sampler with the LoRA as trained so far,
saved beside the run, a labelled progression, and a run that is the same as without them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from scripts.tiny_families import TINY, tiny_model
from tests.comfy import test_families
from tests.comfy.conftest import run_node
from tests.comfy.test_train_nodes import TRAIN, _encoded

PROMPTS = "zkx pattern\na red square"
SAMPLE = dict(prompts=PROMPTS, negative_prompt="", every_n_steps=3, seed=5, steps=3, cfg=3.0, sampler_name="euler",
              scheduler="auto", width=0, height=0)


def _stock_image(comfy, model, clip, vae, prompt, size, cfg=3.0, steps=3, scheduler="normal"):
    """What KSampler + VAE Decode make of ``prompt`` with SAMPLE's settings."""
    (positive,) = run_node(comfy, "CLIPTextEncode", clip=clip, text=prompt)
    (negative,) = run_node(comfy, "CLIPTextEncode", clip=clip, text="")
    (latent,) = run_node(comfy, "EmptyLatentImage", width=size, height=size, batch_size=1)
    (sampled,) = run_node(comfy, "KSampler", model=model, seed=SAMPLE["seed"], steps=steps, cfg=cfg,
                          sampler_name="euler", scheduler=scheduler, positive=positive, negative=negative,
                          latent_image=latent, denoise=1.0)
    (image,) = run_node(comfy, "VAEDecode", samples=sampled, vae=vae)
    return image[0]


def test_samples_show_the_lora_as_trained_at_each_sample_step(comfy, sd15, demo_folder):
    import folder_paths
    from PIL import Image

    model, clip, vae = sd15
    encoded, _ = _encoded(comfy, sd15, demo_folder)
    (samples,) = run_node(comfy, "LoraTrainerSamples", clip=clip, vae=vae, **SAMPLE)
    train = dict(TRAIN, steps=7, learning_rate=5e-3, name="tests/sampled")
    lora, _, report, progression = run_node(comfy, "LoraTrainerTrain", model=model, encoded=encoded,
                                            samples=samples, **train)
    plain, *_ = run_node(comfy, "LoraTrainerTrain", model=model, encoded=encoded, **dict(train, name="tests/plain"))
    assert all(torch.equal(lora.layers[k].up, plain.layers[k].up) for k in lora.layers)  # sampling changes nothing

    folder = f"{folder_paths.get_output_directory()}/lora_trainer/tests/sampled/samples"
    steps = (0, 3, 6, 7)
    names = sorted(p.name for p in Path(folder).iterdir())
    assert names == [f"step_{s:06d}_{i}.png" for s in steps for i in (1, 2)]
    assert "sampling" in report and "4 × 2 images" in report, report
    size = 128  # the dataset's resolution
    assert progression.shape[1:] > (len(steps) * size, 2 * size, 2)

    def saved(step, index):
        return torch.from_numpy(np.asarray(Image.open(f"{folder}/step_{step:06d}_{index}.png"), dtype="float32") / 255)

    base = _stock_image(comfy, model, clip, vae, "zkx pattern", size)
    applied, _ = run_node(comfy, "LoraTrainerApply", model=model, lora=lora, strength=1.0)
    trained = _stock_image(comfy, applied, clip, vae, "zkx pattern", size)
    assert (base - trained).abs().mean() > 0.01  # the LoRA changed the image: the checks below are not vacuous
    assert (saved(0, 1) - base).abs().mean() < 2 / 255  # PNG rounding
    assert (saved(7, 1) - trained).abs().mean() < 2 / 255
    assert (saved(3, 1) - trained).abs().mean() > 0.005  # step 3's LoRA is not the final one


def test_a_prompt_list_that_is_empty_is_refused_by_name(comfy, sd15):
    _, clip, vae = sd15
    with pytest.raises(ValueError, match="Training Samples: prompts is empty"):
        run_node(comfy, "LoraTrainerSamples", clip=clip, vae=vae, **dict(SAMPLE, prompts=" \n"))


@pytest.fixture(scope="module", autouse=True)
def _free_encoders():
    yield
    test_families._encoders.cache_clear()  # before interpreter exit, where ComfyUI's patchers cannot be torn down


@pytest.mark.parametrize("family", [f for f in TINY if not TINY[f].edit])
def test_every_family_samples_while_training(comfy, family):
    clip, vae = test_families._encoders(family)  # the encoders the dataset is encoded with (skips if unbuildable)
    encoded = test_families._encoded(comfy, family)
    (samples,) = run_node(comfy, "LoraTrainerSamples", clip=clip, vae=vae,
                          **dict(SAMPLE, every_n_steps=2, steps=2, cfg=0.0))
    _, _, report, progression = run_node(comfy, "LoraTrainerTrain", model=tiny_model(family), encoded=encoded,
                                         samples=samples, **dict(TRAIN, steps=2, name=f"tests/sampled_{family}"))
    assert "2 × 2 images" in report, report
    assert progression.shape[1] > 2 * 64 and torch.isfinite(progression).all()


def test_samples_encode_their_prompts_through_the_text_encoder_as_trained(comfy, sd15, demo_folder, monkeypatch):
    import folder_paths
    from comfy import model_management as mm
    from PIL import Image

    model, clip, vae = sd15
    encoded, _ = _encoded(comfy, sd15, demo_folder)
    (samples,) = run_node(comfy, "LoraTrainerSamples", clip=clip, vae=vae, **dict(SAMPLE, every_n_steps=0))
    train = dict(TRAIN, steps=7, learning_rate=5e-3, targets="attention+mlp", name="tests/sampled_te", clip=clip,
                 te_learning_rate=5e-2)
    loads, load = [], mm.load_models_gpu
    monkeypatch.setattr(mm, "load_models_gpu", lambda models, *args, **kwargs: (loads.append(list(models)),
                                                                                load(models, *args, **kwargs))[1])
    lora, _, report, _ = run_node(comfy, "LoraTrainerTrain", model=model, encoded=encoded, samples=samples, **train)
    monkeypatch.undo()
    assert "of the layers in the text encoder" in report, report
    # the training CLIP is loaded with the model when training starts and at each of the 2 × 2 samples (ComfyUI's
    # sampler does not unload it to make room)
    assert sum(clip.patcher in models and model in models for models in loads) == 1 + 4, loads
    size = 128
    folder = f"{folder_paths.get_output_directory()}/lora_trainer/tests/sampled_te/samples"
    last = torch.from_numpy(np.asarray(Image.open(f"{folder}/step_000007_1.png"), dtype="float32") / 255)
    applied, applied_clip = run_node(comfy, "LoraTrainerApply", model=model, lora=lora, strength=1.0, clip=clip,
                                     strength_clip=1.0)
    trained = _stock_image(comfy, applied, applied_clip, vae, "zkx pattern", size)
    unet_only = _stock_image(comfy, applied, clip, vae, "zkx pattern", size)
    assert (trained - unet_only).abs().mean() > 0.01  # the text encoder's adapter changes the image
    assert (last - trained).abs().mean() < 3 / 255  # PNG rounding, and the CLIP's fp16 weights with the patch merged
