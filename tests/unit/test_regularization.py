"""Regularisation (class) images: mixed into every epoch at the stated share, trained on their own captions
without the trigger, at their own loss weight."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.unit.toy import ToyDenoiser, ToyEncoders
from training.buckets import plan_batches
from training.cache import CacheSettings, encode_dataset
from training.captions import CaptionPolicy
from training.config import TrainConfig
from training.dataset import mix_regularization, scan_folder
from training.loop import train
from training.objectives import DDPMObjective, denoising_loss


def _folder(folder, count, caption, color):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (64, 64), (color, 10 * i, 100)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption)
    return scan_folder(folder).samples


def test_class_images_make_up_the_share_repeating_evenly_or_chosen(tmp_path):
    subject = _folder(tmp_path / "5_ohwx", 2, "ohwx dog", 200)  # 2 images x 5 repeats: 10 per epoch
    subject = [s.__class__(**{**s.__dict__, "repeats": 5}) for s in subject]
    dogs = _folder(tmp_path / "dogs", 4, "a dog", 30)
    half = mix_regularization(subject, dogs, share=0.5, weight=0.7)
    added = [s for s in half if s.regularization]
    assert half[:2] == subject and sorted(s.repeats for s in added) == [2, 2, 3, 3]  # 10 = 3 + 3 + 2 + 2
    assert {s.loss_weight for s in added} == {0.7} and {s.loss_weight for s in subject} == {1.0}
    quarter = [s for s in mix_regularization(subject, dogs, share=0.25, weight=1.0) if s.regularization]
    assert [s.repeats for s in quarter] == [1, 1, 1]  # round(10 * 0.25 / 0.75) = 3 of the 4, seeded
    assert mix_regularization(subject, dogs, 0.25, 1.0, seed=0) == mix_regularization(subject, dogs, 0.25, 1.0, seed=0)
    with pytest.raises(ValueError, match="share must be between 0 and 1"):
        mix_regularization(subject, dogs, share=1.0, weight=1.0)
    with pytest.raises(ValueError, match="no class images"):
        mix_regularization(subject, [], share=0.5, weight=1.0)


@pytest.mark.parametrize("share", [0.5, 0.2])
def test_every_epochs_batches_hold_class_images_at_the_share(tmp_path, share):
    subject = _folder(tmp_path / "subject", 8, "ohwx dog", 200)
    dogs = _folder(tmp_path / "dogs", 3, "a dog", 30)
    data = encode_dataset(mix_regularization(subject, dogs, share, weight=0.5), ToyEncoders(), tmp_path / "cache",
                          CacheSettings(resolution=64, bucket_multiple=16))
    for epoch in range(3):
        batches = [data.collate(batch, random.Random(0)) for batch in plan_batches(data.sizes, 4, seed=1, epoch=epoch)]
        weights = torch.cat([b.weight if b.weight is not None else torch.ones(len(b.latents)) for b in batches])
        assert (weights == 0.5).float().mean().item() == pytest.approx(round(8 * share / (1 - share)) /
                                                                     (8 + round(8 * share / (1 - share))))


def test_class_images_train_on_their_own_captions_without_the_trigger(tmp_path):
    subject = _folder(tmp_path / "subject", 1, "a dog", 200)
    dogs = _folder(tmp_path / "dogs", 1, "a dog", 30)
    encoders = ToyEncoders()
    data = encode_dataset(mix_regularization(subject, dogs, 0.5, 1.0), encoders, tmp_path / "cache",
                          CacheSettings(resolution=64, bucket_multiple=16), CaptionPolicy(trigger="ohwx"))
    texts = [load_file(sample.texts[0])["context"] for sample in data.samples]
    torch.testing.assert_close(texts[0], encoders.encode_text("ohwx, a dog")["context"])
    torch.testing.assert_close(texts[1], encoders.encode_text("a dog")["context"])


def test_a_samples_loss_weight_scales_its_loss():
    g = torch.Generator().manual_seed(0)
    batch = DDPMObjective("eps").make(torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g),
                                      torch.tensor([100, 100]))
    pred = batch.target.clone()
    pred[1] += 1.0  # only the second sample has an error
    assert denoising_loss(pred, batch, sample_weight=torch.tensor([1.0, 0.25])).item() == pytest.approx(0.125)


def test_a_run_with_class_images_at_weight_0_learns_what_the_subject_alone_teaches(tmp_path):
    """Weight 0: the class images change the batches, not the loss; the adapter still learns (not vacuous)."""
    subject = _folder(tmp_path / "subject", 2, "ohwx dog", 200)
    dogs = _folder(tmp_path / "dogs", 2, "a dog", 30)
    data = encode_dataset(mix_regularization(subject, dogs, 0.5, 0.0), ToyEncoders(), tmp_path / "cache",
                          CacheSettings(resolution=64, bucket_multiple=16))
    result = train(TrainConfig(objective="ddpm-eps", targets=("to_q",), rank=4, learning_rate=1e-2, steps=4,
                               batch_size=1, log_every=1), ToyDenoiser(), data)
    zero_loss_steps = [loss for _, loss in result.losses if loss == 0.0]
    assert len(zero_loss_steps) >= 1 and len(zero_loss_steps) < 4  # class-image steps add nothing


def test_class_images_without_captions_need_a_caption_of_their_own(tmp_path):
    """The trigger is not theirs: a '{trigger}' stand-in would train them on the empty caption."""
    subject = _folder(tmp_path / "subject", 2, "ohwx dog", 200)
    (tmp_path / "dogs").mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (30, 10 * i, 100)).save(tmp_path / "dogs" / f"dog{i}.png")
    stand_in = scan_folder(tmp_path / "dogs", missing_caption="a photo of {trigger}").samples
    with pytest.raises(ValueError, match="2 class images have no caption file .* 'a photo of a dog'"):
        mix_regularization(subject, stand_in, 0.5, 1.0)
    own = scan_folder(tmp_path / "dogs", missing_caption="a photo of a dog").samples
    assert len(mix_regularization(subject, own, 0.5, 1.0)) == 4
