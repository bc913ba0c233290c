"""Does it learn? 200 CPU steps on 4 image/caption pairs lower the denoising loss at fixed probes.

Probes are fixed (noise, timestep) pairs: the same before and after, so the comparison measures the
adapter, not the sampling. The four training images share a look (smooth, from 4×4 detail); the
held-out image does not (16×16 detail). It must improve less: the adapter learned these images, not a
shortcut that helps any input (the tiny models start from random weights, so some of what they learn
is general denoising).
"""

import logging

import pytest
import torch

from tests.unit.tiny_models import LATENT_CHANNELS, tiny_cond, tiny_flux, tiny_qwen_image, tiny_unet
from training.batching import InMemoryData
from training.config import TrainConfig
from training.diffusers_denoisers import FluxDenoiser, QwenImageDenoiser, UNetDenoiser
from training.loop import objective_for, probe_loss, train
from training.lora import LoraAttachment

# The tiny models have few attention layers, so the adapters also go on the MLPs (and the UNet's convs).
UNET_TARGETS = r".*(to_q|to_k|to_v|to_out\.0|proj_in|proj_out|conv1|conv2|ff\.net\.0\.proj|ff\.net\.2)$"
FAMILIES = {
    "unet": (lambda: UNetDenoiser(tiny_unet()), "ddpm-eps", UNET_TARGETS),
    "flux": (lambda: FluxDenoiser(tiny_flux()), "flow", "all-linear"),
    "qwen": (lambda: QwenImageDenoiser(tiny_qwen_image()), "flow", "all-linear"),
}


def _pairs(family, count, seed, detail=4):
    """Smooth 'image' latents (upsampled from detail×detail noise) and one caption embedding each."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(count, LATENT_CHANNELS[family], detail, detail, generator=g)
    latents = torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False)
    cond = tiny_cond(family, count, generator=g)
    return [latents[i] for i in range(count)], [{k: v[i] for k, v in cond.items()} for i in range(count)]


def _probe_loss(denoiser, objective, latents, conds):
    batch = InMemoryData(latents, conds).collate(list(range(len(latents))), None)
    return probe_loss(TrainConfig(precision="fp32"), denoiser, objective, [batch], draws=4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_200_steps_lower_the_probe_loss_on_training_images_more_than_held_out(family):
    make, objective_name, targets = FAMILIES[family]
    train_latents, train_conds = _pairs(family, 4, seed=0)
    held_latents, held_conds = _pairs(family, 1, seed=1, detail=16)
    config = TrainConfig(steps=200, objective=objective_name, rank=16, learning_rate=1e-2, batch_size=2,
                         targets=targets, seed=0)
    denoiser = make()
    objective = objective_for(config)
    before_train = _probe_loss(denoiser, objective, train_latents, train_conds)
    before_held = _probe_loss(denoiser, objective, held_latents, held_conds)
    result = train(config, denoiser, InMemoryData(train_latents, train_conds))
    assert result.objective == objective_name and result.steps_done == 200
    with LoraAttachment(denoiser.module, [], rank=1, alpha=1, initial=result.lora):
        after_train = _probe_loss(denoiser, objective, train_latents, train_conds)
        after_held = _probe_loss(denoiser, objective, held_latents, held_conds)
    train_drop = 1 - after_train / before_train
    held_drop = 1 - after_held / before_held
    logging.getLogger(__name__).info(f"{family}: train {before_train:.4f} -> {after_train:.4f} ({train_drop:.0%}), "
          f"held-out {before_held:.4f} -> {after_held:.4f} ({held_drop:.0%})")
    assert train_drop >= 0.30
    assert held_drop < train_drop
    # the run's own probe (its first batches, fixed draws) saw the same fall
    assert [step for step, _ in result.probe] == [0, 200] and result.probe_drop >= 0.30, result.probe


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_step_zero_and_after_removal_equal_the_base_model(family):
    make, objective_name, _ = FAMILIES[family]
    denoiser = make()
    latents, conds = _pairs(family, 2, seed=3)
    batch = InMemoryData(latents, conds).collate([0, 1], None)
    t = torch.tensor([0.4, 0.7]) if objective_name == "flow" else torch.tensor([300.0, 700.0])
    with torch.no_grad():
        base = denoiser(batch.latents, t, batch.cond)
        with LoraAttachment(denoiser.module, ("to_q", "to_k", "to_v", "to_out.0"), rank=4, alpha=4) as lora:
            assert torch.equal(denoiser(batch.latents, t, batch.cond), base)
            for p in lora.parameters():
                p.add_(0.05)
            assert not torch.equal(denoiser(batch.latents, t, batch.cond), base)
        assert torch.equal(denoiser(batch.latents, t, batch.cond), base)
