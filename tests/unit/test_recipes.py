"""Issue 16's recipe options in the loop: every optimizer and loss trains and resumes exactly; the EMA of the
adapter is what the run gives, differs from the trained weights and resumes exactly."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.unit.toy import ToyDenoiser, toy_data
from training.config import TrainConfig
from training.loop import train
from training.optim import OPTIMIZERS, make_optimizer

BASE = dict(objective="ddpm-eps", targets=("to_q", "to_k"), rank=4, batch_size=2, log_every=5, seed=3,
            lora_dropout=0.1, grad_accum=2, lr_schedule="constant", warmup_steps=4)
# a learning rate each optimizer learns with in 60 steps (prodigy sets its own step size from lr 1.0)
LEARNING_RATES = {"adamw": 3e-2, "adamw8bit": 3e-2, "prodigy": 1.0, "adafactor": 3e-2, "lion": 1e-2, "adam": 3e-2,
                  "sgd": 1.0, "rmsprop": 1e-2}


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(max((a[k].down - b[k].down).abs().max().item(), (a[k].up - b[k].up).abs().max().item())
               for k in a)


def _stopped_and_resumed(config: TrainConfig, stop_after: int):
    """A run stopped after ``stop_after`` steps (its last checkpoint), then resumed to the end."""
    done = []
    first = train(config, ToyDenoiser(), toy_data(5), on_step=done.append,
                  should_stop=lambda: len(done) >= stop_after)
    assert first.steps_done == stop_after and first.cancelled
    return first, train(config, ToyDenoiser(), toy_data(5), resume_from=config.checkpoint_dir)


def test_every_optimizer_is_listed_with_a_learning_rate_here():
    assert set(LEARNING_RATES) == set(OPTIMIZERS)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_each_optimizer_learns_and_resumes_exactly(tmp_path, optimizer):
    spec = OPTIMIZERS[optimizer]
    if spec.missing():
        pytest.skip(f"{spec.pip} is not installed (requirements-dev.txt installs it)")
    options = dict(BASE, optimizer=optimizer, learning_rate=LEARNING_RATES[optimizer], steps=60)
    whole = train(TrainConfig(**options), ToyDenoiser(), toy_data(5))
    assert whole.probe_drop > 0.05, whole.probe  # measured: 6.5% (sgd) to 22% (adafactor)
    config = TrainConfig(**options, checkpoint_every=20, checkpoint_dir=str(tmp_path))
    first, resumed = _stopped_and_resumed(config, 40)
    assert _max_diff(resumed.lora, whole.lora) <= 1e-6
    assert _max_diff(first.lora, whole.lora) > 1e-4


def test_the_optional_optimizers_are_installed_for_the_tests():
    """requirements-dev.txt installs them, so the test above runs every optimizer here and in CI."""
    assert {name: spec.missing() for name, spec in OPTIMIZERS.items() if spec.missing()} == {}


def test_adamw8bit_keeps_8_bit_moments():
    """bitsandbytes keeps tensors under 4096 elements in 32 bits (the toy's), a real LoRA layer's in 8."""
    layer = torch.nn.Parameter(torch.randn(16, 3072))
    optimizer = make_optimizer("adamw8bit", [layer], 1e-4, 0.0)
    layer.grad = torch.randn_like(layer)
    optimizer.step()
    assert optimizer.state[layer]["state1"].dtype == torch.uint8


def test_a_missing_optimizer_package_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "prodigyopt" else real(name, *a))
    with pytest.raises(ValueError, match=r"'prodigy' needs prodigyopt.*pip install prodigyopt.*or choose adamw"):
        make_optimizer("prodigy", [torch.nn.Parameter(torch.zeros(2))], 1.0, 0.0)
    assert "prodigy: finds its own step size: set learning_rate 1.0 (not installed: pip install prodigyopt" in (
        __import__("training.optim", fromlist=["optimizer_help"]).optimizer_help())


@pytest.mark.parametrize("loss,schedule", [("mse", "snr"), ("l1", "snr"), ("huber", "snr"), ("huber", "exponential"),
                                           ("huber", "constant"), ("smooth_l1", "snr")])
def test_each_loss_learns_and_resumes_exactly(tmp_path, loss, schedule):
    options = dict(BASE, loss=loss, huber_schedule=schedule, learning_rate=3e-2, steps=40)
    whole = train(TrainConfig(**options), ToyDenoiser(), toy_data(5))
    assert whole.probe_drop > 0.05, whole.probe  # the probe is measured with the run's own loss
    first, resumed = _stopped_and_resumed(TrainConfig(**options, checkpoint_every=20, checkpoint_dir=str(tmp_path)),
                                          20)
    assert _max_diff(resumed.lora, whole.lora) <= 1e-6


def test_the_losses_train_different_adapters():
    adapters = {loss: train(TrainConfig(**BASE, loss=loss, learning_rate=1e-2, steps=10), ToyDenoiser(),
                            toy_data(5)).lora for loss in ("mse", "l1", "huber")}
    assert _max_diff(adapters["mse"], adapters["l1"]) > 1e-4 and _max_diff(adapters["mse"], adapters["huber"]) > 1e-4


def test_the_ema_is_the_output_differs_from_the_trained_weights_and_resumes_exactly(tmp_path):
    options = dict(BASE, learning_rate=3e-2, steps=60, ema_decay=0.9, ema_start=10)
    raw = train(TrainConfig(**{**options, "ema_decay": 0.0}), ToyDenoiser(), toy_data(5))
    ema = train(TrainConfig(**options), ToyDenoiser(), toy_data(5))
    assert _max_diff(ema.lora, raw.lora) > 1e-4  # the same trajectory, averaged
    assert ema.probe[0] == raw.probe[0] and ema.probe_drop > 0.05
    first, resumed = _stopped_and_resumed(TrainConfig(**options, checkpoint_every=20, checkpoint_dir=str(tmp_path)),
                                          40)
    assert _max_diff(resumed.lora, ema.lora) <= 1e-6
    assert _max_diff(first.lora, ema.lora) > 1e-4


def test_the_ema_averages_the_trained_weights_from_its_start_step():
    """Against the formula, from the trained weights of each step (diffusers' EMAModel: decay min(d, (1+n)/(10+n))
    at the n-th update after the start step; until then it copies the weights)."""
    options = dict(BASE, learning_rate=1e-2, steps=8, lora_dropout=0.0)
    weights = []
    for steps in range(1, 9):  # the trained adapter after each step (the run is the same up to there)
        weights.append(train(TrainConfig(**{**options, "steps": steps, "lr_schedule": "constant"}), ToyDenoiser(),
                             toy_data(5)).lora)
    ema = train(TrainConfig(**{**options, "lr_schedule": "constant"}, ema_decay=0.5, ema_start=3), ToyDenoiser(),
                toy_data(5)).lora
    expected = {name: [weights[0][name].down.clone(), weights[0][name].up.clone()] for name in ema}
    for number, adapter in enumerate(weights, start=1):
        n = max(0, number - 3 - 1)
        decay = 0.0 if n <= 0 else min(0.5, (1 + n) / (10 + n))
        for name in ema:
            for i, part in enumerate((adapter[name].down, adapter[name].up)):
                expected[name][i] = decay * expected[name][i] + (1 - decay) * part
    assert max((ema[n].up - expected[n][1]).abs().max().item() for n in ema) < 1e-5
    assert max((ema[n].down - expected[n][0]).abs().max().item() for n in ema) < 1e-5
