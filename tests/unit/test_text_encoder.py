"""Text-encoder LoRA in the loop: captions encoded live through an adapter that trains at its own rate, stops at
its stop step, resumes exactly, and changes nothing when off."""

import random

import pytest
import torch

from tests.unit.test_cache import _dataset
from tests.unit.toy import ToyDenoiser, ToyEncoders
from training.batching import stack_conditioning
from training.cache import CacheSettings, encode_dataset
from training.captions import CaptionPolicy
from training.config import TrainConfig
from training.loop import train
from training.lora import TEXT_ENCODER

BASE = dict(objective="ddpm-eps", targets=("to_q", "to_k"), rank=4, learning_rate=1e-2, batch_size=2, log_every=5,
            seed=3)


class ToyTextEncoder:
    """ToyEncoders' word embeddings through two Linear layers (the ones adapters go on), a residual like CLIP's."""

    targets = ("q_proj", "fc1")
    device = torch.device("cpu")

    def __init__(self):
        self.words = ToyEncoders().words
        torch.manual_seed(1)
        self.module = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8), "fc1": torch.nn.Linear(8, 8)})
        self.module.requires_grad_(False)
        self.calls = 0
        self.modes = []  # (train mode, gradients on) of each call

    def __call__(self, captions):
        self.calls += 1
        self.modes.append((self.module.training, torch.is_grad_enabled()))
        conds = []
        for caption in captions:
            x = self.words[[sum(map(ord, w)) % 64 for w in caption.replace(",", " ").split()] or [0]]
            conds.append({"context": x + self.module.fc1(torch.relu(self.module.q_proj(x)))})
        return stack_conditioning(conds)


@pytest.fixture
def data(tmp_path):
    samples = _dataset(tmp_path / "data", captions=("red square", "blue sky, clouds, sun", "green", "a ring"),
                       sizes=((96, 96),) * 4)
    return encode_dataset(samples, ToyEncoders(), tmp_path / "cache", CacheSettings(resolution=64, bucket_multiple=16),
                          CaptionPolicy(dropout=0.3))


def test_batches_carry_the_captions_their_cached_text_encodes(data):
    encoders, dropped = ToyEncoders(), 0
    for position in range(12):
        batch = data.collate([position % 4, (position + 1) % 4], random.Random(position))
        for i, caption in enumerate(batch.captions):
            context = encoders.encode_text(caption)["context"]
            torch.testing.assert_close(batch.cond["context"][i, :len(context)], context)
            dropped += caption == ""
    assert 0 < dropped < 24  # dropout draws the empty caption, and not always


def test_the_text_encoder_trains_at_its_own_rate_beside_the_denoiser(data):
    plain = train(TrainConfig(steps=20, **BASE), ToyDenoiser(), data)
    text = ToyTextEncoder()
    off = train(TrainConfig(steps=20, **BASE), ToyDenoiser(), data, text_encoder=text)
    assert text.calls == 0 and off.lora.keys() == plain.lora.keys()  # 0: as before, bit for bit
    assert all(torch.equal(off.lora[k].up, plain.lora[k].up) for k in plain.lora)

    both = train(TrainConfig(steps=20, te_learning_rate=5e-3, **BASE), ToyDenoiser(), data, text_encoder=text)
    te_layers = {k for k in both.lora if k.startswith(TEXT_ENCODER)}
    assert te_layers == {TEXT_ENCODER + "q_proj", TEXT_ENCODER + "fc1"}
    assert all(both.lora[k].up.abs().max() > 0 for k in te_layers)  # trained (B starts at zero)
    assert all(k in both.lora for k in plain.lora)
    assert both.probe[-1][1] < both.probe[0][1], both.probe
    assert dict(text.module.named_parameters()).keys() == {"q_proj.weight", "q_proj.bias", "fc1.weight", "fc1.bias"}
    faster = train(TrainConfig(steps=20, te_learning_rate=2e-2, **BASE), ToyDenoiser(), data, text_encoder=text)
    assert faster.lora[TEXT_ENCODER + "q_proj"].up.abs().mean() > both.lora[TEXT_ENCODER + "q_proj"].up.abs().mean()


def test_the_text_encoder_stops_at_its_stop_step_while_the_denoiser_trains_on(data):
    text = ToyTextEncoder()
    stopped = train(TrainConfig(steps=20, te_learning_rate=5e-3, te_stop_step=5, **dict(BASE, lora_dropout=0.1)),
                    ToyDenoiser(), data, text_encoder=text)
    # the probe (eval, no grad), 5 training steps, then frozen: no gradients, no LoRA dropout; the final probe
    assert text.modes == [(False, False)] * 4 + [(True, True)] * 5 + [(False, False)] * 15 + [(False, False)] * 4
    stopped = train(TrainConfig(steps=20, te_learning_rate=5e-3, te_stop_step=5, **BASE), ToyDenoiser(), data,
                    text_encoder=text)
    five = train(TrainConfig(steps=5, te_learning_rate=5e-3, **BASE), ToyDenoiser(), data, text_encoder=text)
    for name in (TEXT_ENCODER + "q_proj", TEXT_ENCODER + "fc1"):
        assert torch.equal(stopped.lora[name].up, five.lora[name].up)
    assert not torch.equal(stopped.lora["to_q"].up, five.lora["to_q"].up)


def test_a_run_with_the_text_encoder_resumes_exactly(data, tmp_path):
    options = dict(BASE, te_learning_rate=5e-3, lora_dropout=0.1)
    whole = train(TrainConfig(steps=20, **options), ToyDenoiser(), data, text_encoder=ToyTextEncoder())
    config = TrainConfig(steps=20, checkpoint_every=10, checkpoint_dir=str(tmp_path / "ckpt"), **options)
    calls = []
    first = train(config, ToyDenoiser(), data, text_encoder=ToyTextEncoder(), on_step=calls.append,
                  should_stop=lambda: len(calls) >= 10)
    assert first.steps_done == 10
    resumed = train(config, ToyDenoiser(), data, text_encoder=ToyTextEncoder(), resume_from=str(tmp_path / "ckpt"))
    assert resumed.lora.keys() == whole.lora.keys()
    assert max((resumed.lora[k].up - whole.lora[k].up).abs().max().item() for k in whole.lora) <= 1e-6


def test_a_run_with_the_text_encoder_and_an_ema_resumes_exactly(data, tmp_path):
    options = dict(BASE, te_learning_rate=5e-3, ema_decay=0.9)
    whole = train(TrainConfig(steps=12, **options), ToyDenoiser(), data, text_encoder=ToyTextEncoder())
    config = TrainConfig(steps=12, checkpoint_every=6, checkpoint_dir=str(tmp_path / "ckpt"), **options)
    calls = []
    train(config, ToyDenoiser(), data, text_encoder=ToyTextEncoder(), on_step=calls.append,
          should_stop=lambda: len(calls) >= 6)
    resumed = train(config, ToyDenoiser(), data, text_encoder=ToyTextEncoder(), resume_from=str(tmp_path / "ckpt"))
    assert max((resumed.lora[k].up - whole.lora[k].up).abs().max().item() for k in whole.lora) <= 1e-6


def test_prodigy_takes_one_learning_rate_for_both():
    with pytest.raises(ValueError, match="prodigy finds its own step size .* set te_learning_rate to learning_rate"):
        TrainConfig(optimizer="prodigy", learning_rate=1.0, te_learning_rate=0.5)
    assert TrainConfig(optimizer="prodigy", learning_rate=1.0, te_learning_rate=1.0).te_learning_rate == 1.0


def test_text_encoder_settings_without_a_text_encoder_or_its_layers_without_the_rate_are_refused(data):
    with pytest.raises(ValueError, match="connect the CLIP"):
        train(TrainConfig(steps=2, te_learning_rate=1e-4, **BASE), ToyDenoiser(), data)
    both = train(TrainConfig(steps=2, te_learning_rate=1e-4, **BASE), ToyDenoiser(), data,
                 text_encoder=ToyTextEncoder())
    with pytest.raises(ValueError, match="2 text-encoder layers; to train them on, set te_learning_rate"):
        train(TrainConfig(steps=2, **BASE), ToyDenoiser(), data, initial_lora=both.lora)
    again = train(TrainConfig(steps=2, te_learning_rate=1e-4, **BASE), ToyDenoiser(), data,
                  text_encoder=ToyTextEncoder(), initial_lora=both.lora)
    assert again.probe[0][1] == pytest.approx(both.probe[-1][1], rel=1e-6)  # it starts where the first one ended
