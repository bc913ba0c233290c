"""Masked loss: masks found (a masks/ file or the alpha channel), cropped and flipped with their image, cached at
latent resolution, and a loss that ignores what lies outside them."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from tests.unit.toy import ToyDenoiser, ToyEncoders
from training.cache import CacheSettings, encode_dataset
from training.config import TrainConfig
from training.dataset import DatasetError, scan_folder
from training.loop import train
from training.objectives import DDPMObjective, FlowObjective, denoising_loss

SETTINGS = CacheSettings(resolution=64, bucket_multiple=16)


def _image(path, size=(64, 64), mode="RGB", color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    (path.parent / f"{path.stem}.txt").write_text("a cat")
    return path


def _left_half(path, size=(64, 64)):
    """A mask file: white left half."""
    pixels = np.zeros((size[1], size[0]), np.uint8)
    pixels[:, : size[0] // 2] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "L").save(path)
    return path


def test_masks_come_from_the_masks_folder_else_the_alpha_channel(tmp_path):
    filed = _image(tmp_path / "a.png")
    _left_half(tmp_path / "masks" / "a.png")
    alpha = _image(tmp_path / "b.png", mode="RGBA", color=(1, 2, 3, 128))
    plain = _image(tmp_path / "c.png")
    report = scan_folder(tmp_path, masks=True)
    assert {s.image: s.mask for s in report.samples} == {filed: tmp_path / "masks" / "a.png", alpha: alpha,
                                                         plain: None}
    assert "2 images have a mask (1 from their alpha channel)" in report.text()
    off = scan_folder(tmp_path)  # masks off: none, and the masks folder is not a folder of training images
    assert [s.mask for s in off.samples] == [None] * 3 and len(off.samples) == 3


def test_a_mask_without_its_image_is_a_problem(tmp_path):
    _image(tmp_path / "a.png")
    stray = _left_half(tmp_path / "masks" / "zzz.png")
    with pytest.raises(DatasetError, match="mask without an image") as info:
        scan_folder(tmp_path, masks=True)
    assert info.value.report.problems[0].path == stray


@pytest.mark.parametrize("random_crop", [False, True])
def test_the_cached_mask_is_cropped_flipped_and_averaged_down_with_its_image(tmp_path, random_crop):
    """A wide image whose mask marks its left half: the latent mask matches the crop the latent is made of, at the
    latent's size, and the flipped latent gets the mirrored mask."""
    pixels = np.zeros((64, 128, 3), np.uint8)
    pixels[:, :64] = 255  # the image is white exactly where its mask is
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("a cat")
    _left_half(tmp_path / "masks" / "wide.png", (128, 64))
    samples = scan_folder(tmp_path, masks=True).samples
    settings = CacheSettings(resolution=64, bucket_multiple=16, random_crop=random_crop, flip=True)
    data = encode_dataset(samples, ToyEncoders(), tmp_path / "cache", settings)
    from safetensors.torch import load_file

    entry = data.samples[0]
    mask, flipped = load_file(entry.mask)["mask"], load_file(entry.mask_flipped)["mask"]
    assert mask.shape == (1, *entry.size)
    torch.testing.assert_close(flipped, torch.flip(mask, dims=[-1]))
    # the toy VAE averages 8x8 pixels: the crop's white share per latent cell is the mask's value there
    toy = ToyEncoders()
    white = load_file(entry.latent)["latent"]
    black = toy.encode_image(torch.full((1, 3, 8 * entry.size[0], 8 * entry.size[1]), -1.0))
    share = (white - black)[0] / (toy.encode_image(torch.ones(1, 3, 8, 8)) - toy.encode_image(-torch.ones(1, 3, 8, 8)))[0]
    torch.testing.assert_close(mask[0], share, atol=0.02, rtol=0)
    assert 0 < mask.mean() < 1  # the crop holds part of the mask (the comparison is not vacuous)


@pytest.mark.parametrize("objective,timestep", [(DDPMObjective("eps"), torch.tensor([300, 700])),
                                                (FlowObjective(), torch.tensor([0.3, 0.7]))])
@pytest.mark.parametrize("loss", ["mse", "l1", "huber"])
def test_outside_the_mask_the_gradient_is_zero(objective, timestep, loss):
    """Measured: the loss's gradient with respect to the prediction, where a mask covers the left half."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    batch = objective.make(x0, noise, timestep)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4] = 1
    pred = torch.randn(2, 4, 8, 8, generator=g, requires_grad=True)
    denoising_loss(pred, batch, loss, mask=mask).backward()
    assert pred.grad[..., 4:].abs().max() == 0 and pred.grad[..., :4].abs().min() > 0
    pred.grad = None
    denoising_loss(pred, batch, loss, mask=mask, unmasked_weight=0.25).backward()
    inside, outside = pred.grad[..., :4].abs().mean(), pred.grad[..., 4:].abs().mean()
    assert outside > 0 and outside < inside
    full = denoising_loss(pred, batch, loss, mask=torch.ones(2, 1, 8, 8))
    assert full.item() == pytest.approx(denoising_loss(pred, batch, loss).item())


def _masked_dataset(tmp_path, fill: int):
    for i in range(3):
        _image(tmp_path / "data" / f"img{i}.png", color=(60 * i, 90, 200 - 50 * i))
        Image.new("L", (64, 64), fill).save((tmp_path / "data" / "masks").mkdir(exist_ok=True) or
                                            tmp_path / "data" / "masks" / f"img{i}.png")
    samples = scan_folder(tmp_path / "data", masks=True).samples
    return encode_dataset(samples, ToyEncoders(), tmp_path / f"cache{fill}", SETTINGS)


def test_training_with_masks_learns_only_what_they_cover(tmp_path):
    """Black masks with unmasked weight 0: no loss anywhere, so the adapter stays where it started (B = 0); white
    masks train as no masks do."""
    config = dict(objective="ddpm-eps", targets=("to_q",), rank=4, learning_rate=1e-2, steps=5, batch_size=2,
                  log_every=5, weight_decay=0.0)
    black = train(TrainConfig(**config), ToyDenoiser(), _masked_dataset(tmp_path, 0))
    assert all(layer.up.abs().max() == 0 for layer in black.lora.values())
    assert black.losses[-1][1] == 0.0
    white = train(TrainConfig(**config), ToyDenoiser(), _masked_dataset(tmp_path, 255))
    assert all(layer.up.abs().max() > 0 for layer in white.lora.values())
    batch = _masked_dataset(tmp_path, 255).collate([0, 1], random.Random(0))
    assert batch.mask.shape == (2, 1, 8, 8) and batch.mask.min() == 1


def test_a_mask_file_counts_by_brightness_even_with_an_alpha_channel(tmp_path):
    """An opaque RGBA mask (as image editors save them) is read by how white it is, not by its alpha."""
    from training.dataset import load_mask

    pixels = np.zeros((8, 8, 4), np.uint8)
    pixels[..., 3] = 255
    pixels[:, :4, :3] = 255  # white left half, opaque everywhere
    Image.fromarray(pixels, "RGBA").save(tmp_path / "mask.png")
    mask = np.asarray(load_mask(tmp_path / "mask.png", (8, 8)))
    assert mask[:, :4].min() == 255 and mask[:, 4:].max() == 0
    assert np.asarray(load_mask(tmp_path / "mask.png", (8, 8), alpha=True)).min() == 255
