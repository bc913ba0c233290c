"""The loop's promises: exact resume, cancel keeps the work, NaN guard, progress, no side effects."""

import math
import shutil

import pytest
import torch

from tests.unit.toy import ToyDenoiser, toy_data
from training.checkpoint import list_checkpoints
from training.config import TrainConfig
from training.loop import TrainingDiverged, TrainingFailed, train

BASE = dict(objective="ddpm-eps", targets=("to_q", "to_k"), rank=4, learning_rate=1e-2, batch_size=2,
            log_every=5, seed=7)


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(max((a[k].down - b[k].down).abs().max().item(), (a[k].up - b[k].up).abs().max().item())
               for k in a)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_killed_at_50_and_resumed_equals_an_uninterrupted_100(tmp_path, schedule):
    options = dict(BASE, lr_schedule=schedule, warmup_steps=10, lora_dropout=0.1, grad_accum=2)
    whole = train(TrainConfig(steps=100, **options), ToyDenoiser(), toy_data(5))
    config = TrainConfig(steps=100, checkpoint_every=25, checkpoint_dir=str(tmp_path / "ckpt"), **options)
    stop_at_50 = lambda info: None  # noqa: E731
    calls = []

    def should_stop():  # "killed" right after the checkpoint of step 50
        return len(calls) >= 50

    first = train(config, ToyDenoiser(), toy_data(5), on_step=lambda info: calls.append(info),
                  should_stop=should_stop)
    assert first.steps_done == 50 and first.cancelled
    assert [p.name for p in list_checkpoints(tmp_path / "ckpt")] == ["step_000025", "step_000050"]
    resumed = train(config, ToyDenoiser(), toy_data(5), resume_from=str(tmp_path / "ckpt"), on_step=stop_at_50)
    assert resumed.steps_done == 100
    assert _max_diff(resumed.lora, whole.lora) <= 1e-6
    assert _max_diff(first.lora, whole.lora) > 1e-3  # the comparison is not vacuous
    # the probe: the same draws on every run, measured where a run starts and where it ends (a cancelled run: only
    # where it started)
    assert first.probe == whole.probe[:1] and [s for s, _ in whole.probe] == [0, 100]
    assert [s for s, _ in resumed.probe] == [50, 100] and resumed.probe[-1][1] == pytest.approx(whole.probe[-1][1])
    assert whole.probe_drop > 0.1, whole.probe


def test_resume_refuses_a_checkpoint_made_with_other_settings(tmp_path):
    config = TrainConfig(steps=10, checkpoint_every=5, checkpoint_dir=str(tmp_path), **BASE)
    train(config, ToyDenoiser(), toy_data())
    changed = TrainConfig(**{**config.to_dict(), "learning_rate": 1e-3, "steps": 20})
    with pytest.raises(ValueError, match=r"different settings: \['learning_rate'\]"):
        train(changed, ToyDenoiser(), toy_data(), resume_from=str(tmp_path))
    longer = TrainConfig(**{**config.to_dict(), "steps": 15})
    assert train(longer, ToyDenoiser(), toy_data(), resume_from=str(tmp_path)).steps_done == 15


def test_a_checkpoint_from_before_a_setting_existed_resumes_with_its_default(tmp_path):
    """A pack update adds settings; a checkpoint written before them knows none, and they had their defaults."""
    config = TrainConfig(steps=10, checkpoint_every=5, checkpoint_dir=str(tmp_path), **BASE)
    whole = train(config, ToyDenoiser(), toy_data())
    state_file = list_checkpoints(tmp_path)[0] / "state.pt"
    state = torch.load(state_file, weights_only=True)
    for added in ("loss", "huber_c", "huber_schedule", "ema_decay", "ema_start", "unmasked_weight"):
        del state["config"][added]
    state["trajectory_hash"] = "from-an-older-pack"
    torch.save(state, state_file)
    for newer in list_checkpoints(tmp_path)[1:]:
        shutil.rmtree(newer)
    resumed = train(config, ToyDenoiser(), toy_data(), resume_from=str(tmp_path))
    assert resumed.first_step == 5 and _max_diff(resumed.lora, whole.lora) <= 1e-6
    with pytest.raises(ValueError, match=r"different settings: \['loss'\]"):
        train(TrainConfig(**{**config.to_dict(), "loss": "l1"}), ToyDenoiser(), toy_data(), resume_from=str(tmp_path))


def test_checkpoints_are_pruned_to_the_newest(tmp_path):
    config = TrainConfig(steps=20, checkpoint_every=4, keep_checkpoints=2, checkpoint_dir=str(tmp_path), **BASE)
    train(config, ToyDenoiser(), toy_data())
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000016", "step_000020"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_cancel_returns_the_adapter_trained_so_far():
    denoiser = ToyDenoiser()
    infos = []
    result = train(TrainConfig(steps=100, **BASE), denoiser, toy_data(), on_step=infos.append,
                   should_stop=lambda: len(infos) >= 12)
    assert result.cancelled and result.steps_done == 12
    assert any(t.up.abs().max() > 0 for t in result.lora.values())  # it learned something


def test_progress_reports_every_step_with_loss_lr_speed_and_eta():
    infos = []
    train(TrainConfig(steps=12, warmup_steps=4, lr_schedule="constant_with_warmup", **BASE), ToyDenoiser(),
          toy_data(), on_step=infos.append)
    assert [i.step for i in infos] == list(range(1, 13))
    assert all(i.total == 12 for i in infos)
    assert infos[0].loss is None and infos[4].loss is not None and math.isfinite(infos[-1].smoothed_loss)
    assert infos[0].lr == pytest.approx(BASE["learning_rate"] / 4) and infos[-1].lr == BASE["learning_rate"]
    assert infos[-1].it_per_s > 0 and infos[-1].eta_s == 0


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_adapter():
    denoiser = ToyDenoiser()
    original_call = denoiser.__call__
    calls = []

    class Exploding(ToyDenoiser):
        def __call__(self, noisy, timestep, cond):
            calls.extend([1] * torch.is_grad_enabled())  # training steps only, not the probe
            out = original_call(noisy, timestep, cond)
            return out * float("nan") if len(calls) > 7 else out

    exploding = Exploding()
    exploding.module = denoiser.module
    with pytest.raises(TrainingDiverged, match="Loss became nan between steps 5 and 10") as caught:
        train(TrainConfig(steps=30, **BASE), exploding, toy_data())
    result = caught.value.result
    assert result.steps_done == 5
    assert all(torch.isfinite(t.up).all() and torch.isfinite(t.down).all() for t in result.lora.values())


def test_training_leaves_the_model_and_the_host_rng_as_they_were():
    denoiser = ToyDenoiser()
    before = {k: v.clone() for k, v in denoiser.module.state_dict().items()}
    denoiser.module.eval()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    train(TrainConfig(steps=5, **BASE), denoiser, toy_data())
    assert torch.equal(torch.rand(3), expected_next)
    after = denoiser.module.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not denoiser.module.training
    assert all(p.requires_grad for p in denoiser.module.parameters())


def test_same_seed_same_adapter_and_another_seed_differs():
    a = train(TrainConfig(steps=10, **BASE), ToyDenoiser(), toy_data())
    b = train(TrainConfig(steps=10, **BASE), ToyDenoiser(), toy_data())
    c = train(TrainConfig(steps=10, **{**BASE, "seed": 8}), ToyDenoiser(), toy_data())
    assert _max_diff(a.lora, b.lora) == 0
    assert _max_diff(a.lora, c.lora) > 0


def test_objective_must_fit_the_model():
    with pytest.raises(ValueError, match="does not fit a model that predicts 'flow'"):
        train(TrainConfig(steps=1, **BASE), ToyDenoiser(prediction="flow"), toy_data())


def test_config_errors_name_the_option():
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        TrainConfig(lr_schedule="onecycle")
    with pytest.raises(ValueError, match="checkpoint_dir"):
        TrainConfig(checkpoint_every=10)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="Unknown training settings \\['stepz'\\]"):
        TrainConfig.from_dict({"stepz": 3})
    for bad in (float("nan"), float("inf")):  # NaN passes every range check; it must not pass this one
        with pytest.raises(ValueError, match="learning_rate must be a finite number"):
            TrainConfig(learning_rate=bad)


class HostInterrupt(Exception):
    """Stands for an exception a host raises from inside the model (ComfyUI's Cancel)."""


def test_an_interrupt_raised_mid_step_keeps_the_last_completed_step():
    calls = []

    class Interrupting(ToyDenoiser):
        def __call__(self, noisy, timestep, cond):
            calls.extend([1] * torch.is_grad_enabled())  # training steps only, not the probe
            if len(calls) == 8:  # the 8th forward: step 8 never completes
                raise HostInterrupt()
            return super().__call__(noisy, timestep, cond)

    seven = train(TrainConfig(steps=7, **BASE), ToyDenoiser(), toy_data())
    result = train(TrainConfig(steps=30, **BASE), Interrupting(), toy_data(), interrupts=(HostInterrupt,))
    assert result.cancelled and result.steps_done == 7
    assert _max_diff(result.lora, seven.lora) == 0
    with pytest.raises(TrainingFailed, match="HostInterrupt after step 7") as caught:  # not declared: an error
        calls.clear()
        train(TrainConfig(steps=30, **BASE), Interrupting(), toy_data())
    # which still keeps what the completed steps learned, for the caller to save
    assert isinstance(caught.value.__cause__, HostInterrupt) and caught.value.result.steps_done == 7
    assert _max_diff(caught.value.result.lora, seven.lora) == 0


class MemoryHungry(ToyDenoiser):
    """Runs out of memory on its 3rd training forward unless gradient checkpointing is on, like a GPU that is too
    small (the probe's forwards, without gradients, fit)."""

    def __init__(self):
        super().__init__()
        self.forwards, self.checkpointing = 0, []

    def set_gradient_checkpointing(self, enabled):
        self.checkpointing.append(enabled)

    def __call__(self, noisy, timestep, cond):
        self.forwards += torch.is_grad_enabled()
        if self.forwards == 3 and not self.checkpointing[-1]:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().__call__(noisy, timestep, cond)


def test_auto_gradient_checkpointing_turns_on_only_when_a_step_runs_out_of_memory():
    plain = train(TrainConfig(steps=6, **BASE), ToyDenoiser(), toy_data())
    assert not plain.gradient_checkpointing

    hungry = MemoryHungry()
    result = train(TrainConfig(steps=6, gradient_checkpointing="auto", **BASE), hungry, toy_data())
    assert result.gradient_checkpointing and result.steps_done == 6
    assert hungry.checkpointing == [False, True, False]  # off at first, on after the failure, off at the end
    assert _max_diff(result.lora, plain.lora) < 1e-6  # the failed step was redone with the same batch and noise

    with pytest.raises(TrainingFailed, match="OutOfMemoryError after step 2") as caught:  # "off" means off: the
        train(TrainConfig(steps=6, gradient_checkpointing="off", **BASE), MemoryHungry(), toy_data())  # user sees it
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)
    assert TrainConfig(gradient_checkpointing=True).gradient_checkpointing == "on"


def test_samples_run_before_every_n_steps_and_after_the_last_without_changing_the_run():
    options = dict(BASE, lora_dropout=0.1)  # dropout draws from the global RNG, which samplers reseed
    plain = train(TrainConfig(steps=12, **options), ToyDenoiser(), toy_data(5))
    seen = []

    def sample(step):
        module = denoiser.module
        seen.append((step, module.training, torch.is_grad_enabled()))
        torch.manual_seed(step)  # as ComfyUI's prepare_noise does
        torch.randn(100)

    denoiser = ToyDenoiser()
    sampled = train(TrainConfig(steps=12, **options), denoiser, toy_data(5), sample=sample, sample_every=5)
    assert seen == [(0, False, False), (5, False, False), (10, False, False), (12, False, False)]
    assert sampled.sample_steps == [0, 5, 10, 12]
    assert _max_diff(sampled.lora, plain.lora) == 0.0
    assert sampled.sampling_s > 0 and sampled.train_s > 0


def test_sampling_time_is_left_out_of_the_training_time_and_speed():
    import time

    speeds = []
    result = train(TrainConfig(steps=4, **{**BASE, "log_every": 1}), ToyDenoiser(), toy_data(),
                   sample=lambda step: time.sleep(0.3), sample_every=1, on_step=lambda info: speeds.append(info))
    assert result.sampling_s >= 5 * 0.3
    assert result.train_s < result.sampling_s / 2  # the toy's steps take milliseconds
    assert min(info.it_per_s for info in speeds) > 1 / 0.3  # a sleep inside the interval would cap it at 3.3 it/s


def test_cancel_during_sampling_keeps_the_steps_trained():
    class Interrupted(Exception):
        pass

    def sample(step):
        if step == 4:
            raise Interrupted()

    result = train(TrainConfig(steps=10, **BASE), ToyDenoiser(), toy_data(), sample=sample, sample_every=2,
                   interrupts=(Interrupted,))
    assert result.cancelled and result.steps_done == 4 and result.sample_steps == [0, 2]
