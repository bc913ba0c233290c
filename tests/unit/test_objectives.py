"""Objectives against the formulas and against diffusers' own schedulers and helpers."""

import dataclasses
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from training.objectives import (
    DDPMObjective,
    FlowObjective,
    denoising_loss,
    flux_mu,
    huber_threshold,
    make_objective,
    shift_sigmas,
)


def _x0_noise(shape=(4, 4, 8, 8)):
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_ddpm_eps_and_v_targets_follow_the_formulas():
    x0, noise = _x0_noise()
    t = torch.tensor([0, 10, 500, 999])
    for prediction in ("eps", "v"):
        objective = DDPMObjective(prediction)
        abar = objective.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        batch = objective.make(x0, noise, t)
        torch.testing.assert_close(batch.noisy, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
        expected = noise if prediction == "eps" else abar.sqrt() * noise - (1 - abar).sqrt() * x0
        torch.testing.assert_close(batch.target, expected)
        assert batch.timestep.tolist() == [0.0, 10.0, 500.0, 999.0]
        assert torch.equal(batch.weight, torch.ones(4))


def test_min_snr_weights_match_the_paper():
    x0, noise = _x0_noise()
    t = torch.tensor([1, 100, 400, 900])
    gamma = 5.0
    for prediction, denominator in (("eps", 0.0), ("v", 1.0)):
        objective = DDPMObjective(prediction, min_snr_gamma=gamma)
        abar = objective.scheduler.alphas_cumprod[t]
        snr = abar / (1 - abar)
        expected = torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + denominator)
        torch.testing.assert_close(objective.make(x0, noise, t).weight, expected.float())
    # low noise has a high SNR, so min-SNR down-weights it
    weights = DDPMObjective("eps", min_snr_gamma=gamma).make(x0, noise, t).weight
    assert weights[0] < weights[-1]


def test_noise_offset_shifts_each_channel_mean():
    x0 = torch.zeros(64, 4, 16, 16)
    plain = DDPMObjective("eps").sample_noise(x0, torch.Generator().manual_seed(1))
    offset = DDPMObjective("eps", noise_offset=0.5).sample_noise(x0, torch.Generator().manual_seed(1))
    channel_means = offset.mean(dim=(2, 3)).std()
    assert channel_means > 3 * plain.mean(dim=(2, 3)).std()


def test_flow_interpolates_and_targets_velocity():
    x0, noise = _x0_noise()
    sigma = torch.tensor([0.0, 0.25, 0.5, 1.0])
    batch = FlowObjective().make(x0, noise, sigma)
    torch.testing.assert_close(batch.noisy[0], x0[0])
    torch.testing.assert_close(batch.noisy[3], noise[3])
    torch.testing.assert_close(batch.noisy[1], 0.75 * x0[1] + 0.25 * noise[1])
    torch.testing.assert_close(batch.target, noise - x0)


def test_shift_matches_diffusers_flow_scheduler():
    shift = 3.0
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    unshifted = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).sigmas
    torch.testing.assert_close(shift_sigmas(unshifted, shift), scheduler.sigmas)


def test_dynamic_shift_matches_flux_calculate_shift():
    for h, w in ((64, 64), (128, 128), (96, 160)):
        seq = (h // 2) * (w // 2)
        assert flux_mu(seq) == pytest.approx(calculate_shift(seq))
        assert FlowObjective(dynamic_shift=True).shift_for((h, w)) == pytest.approx(math.exp(calculate_shift(seq)))


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "mode"])
def test_flow_timesteps_are_in_range_and_seeded(sampling):
    x0 = torch.zeros(4096, 1, 2, 2)
    objective = FlowObjective(sampling=sampling)
    a = objective.sample_timesteps(x0, torch.Generator().manual_seed(3))
    b = objective.sample_timesteps(x0, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert 0 <= a.min() and a.max() <= 1
    assert abs(a.median().item() - 0.5) < 0.05  # all three densities are symmetric around 0.5


def test_logit_normal_concentrates_in_the_middle_and_shift_moves_it_up():
    x0 = torch.zeros(8192, 1, 2, 2)
    g = torch.Generator().manual_seed(0)
    uniform = FlowObjective(sampling="uniform").sample_timesteps(x0, g)
    logit = FlowObjective(sampling="logit_normal").sample_timesteps(x0, g)
    shifted = FlowObjective(sampling="logit_normal", shift=3.0).sample_timesteps(x0, g)
    middle = lambda s: ((s > 0.25) & (s < 0.75)).float().mean()  # noqa: E731
    assert middle(logit) > middle(uniform) + 0.1
    assert shifted.mean() > logit.mean() + 0.1


def test_sd3_weightings():
    x0, noise = _x0_noise()
    sigma = torch.tensor([0.1, 0.3, 0.6, 0.9])
    weight = FlowObjective(weighting="sigma_sqrt").make(x0, noise, sigma).weight
    torch.testing.assert_close(weight, sigma**-2)
    cosmap = FlowObjective(weighting="cosmap").make(x0, noise, sigma).weight
    torch.testing.assert_close(cosmap, 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2)))


def test_the_loss_weights_each_sample():
    x0, noise = _x0_noise((2, 1, 2, 2))
    batch = DDPMObjective("eps").make(x0, noise, torch.tensor([5, 5]))
    pred = batch.target.clone()
    pred[0] += 1.0
    assert denoising_loss(pred, batch).item() == pytest.approx(0.5)
    weighted = DDPMObjective("eps", min_snr_gamma=1.0).make(x0, noise, torch.tensor([900, 900]))
    pred = weighted.target + 1.0
    for loss in ("mse", "l1", "huber", "smooth_l1"):  # every loss comes after the objective's weighting
        assert denoising_loss(pred, weighted, loss).item() == pytest.approx(
            denoising_loss(pred, dataclasses.replace(weighted, weight=torch.ones(2)), loss).item()
            * weighted.weight[0].item())


@pytest.mark.parametrize("objective", [DDPMObjective("eps"), FlowObjective()])
def test_losses_by_their_formulas(objective):
    x0, noise = _x0_noise((3, 2, 4, 4))
    timestep = torch.tensor([100, 500, 900]) if isinstance(objective, DDPMObjective) else torch.tensor([.1, .5, .9])
    batch = objective.make(x0, noise, timestep)
    pred = batch.target + torch.linspace(-3, 3, batch.target.numel()).view_as(batch.target)
    error = (pred - batch.target).flatten(1)
    assert denoising_loss(pred, batch, "mse").item() == pytest.approx((error**2).mean().item(), rel=1e-5)
    assert denoising_loss(pred, batch, "l1").item() == pytest.approx(error.abs().mean().item(), rel=1e-5)
    c = huber_threshold(batch, 0.1, "constant")
    torch.testing.assert_close(c, torch.full((3,), 0.1))
    pseudo_huber = 2 * c[:, None] * (torch.sqrt(error**2 + c[:, None] ** 2) - c[:, None])
    assert denoising_loss(pred, batch, "huber", 0.1, "constant").item() == pytest.approx(
        pseudo_huber.mean().item(), rel=1e-5)
    assert denoising_loss(pred, batch, "smooth_l1", 0.1, "constant").item() == pytest.approx(
        (pseudo_huber / c[:, None]).mean().item(), rel=1e-5)
    # small errors: huber ~ mse; large: ~ 2c|e| (linear, robust)
    tiny = batch.target + 1e-3
    assert denoising_loss(tiny, batch, "huber", 0.1, "constant").item() == pytest.approx(1e-6, rel=1e-2)


@pytest.mark.parametrize("objective", [DDPMObjective("eps"), FlowObjective()])
def test_huber_schedules_run_from_one_without_noise_to_c_at_full_noise(objective):
    x0, noise = _x0_noise((3, 1, 2, 2))
    timestep = torch.tensor([0, 500, 999]) if isinstance(objective, DDPMObjective) else torch.tensor([0, .5, .999])
    batch = objective.make(x0, noise, timestep)
    for schedule in ("snr", "exponential"):
        c = huber_threshold(batch, 0.1, schedule)
        assert c[0].item() == pytest.approx(1.0, abs=0.06) and c[2].item() == pytest.approx(0.1, abs=0.02)
        assert c[0] > c[1] > c[2], schedule
    expected = 0.1 ** (timestep.float() / (1000 if isinstance(objective, DDPMObjective) else 1))
    torch.testing.assert_close(huber_threshold(batch, 0.1, "exponential"), expected)
    with pytest.raises(ValueError, match="snr"):
        huber_threshold(batch, 0.1, "linear")
    with pytest.raises(ValueError, match="smooth_l1"):
        denoising_loss(batch.target, batch, "l3")


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="ddpm-eps"):
        make_objective("x0")
    with pytest.raises(ValueError, match="logit_normal"):
        FlowObjective(sampling="sigmoid")
    with pytest.raises(ValueError, match="cosmap"):
        FlowObjective(weighting="snr")


def test_ddpm_trains_with_the_models_own_schedule():
    """The schedule comes from the model (ᾱ_t); SD's, given as ᾱ, is the default one exactly."""
    x0, noise = _x0_noise()
    t = torch.tensor([0, 10, 500, 999])
    default = DDPMObjective("v")
    same = DDPMObjective("v", alphas_cumprod=default.scheduler.alphas_cumprod)
    torch.testing.assert_close(same.make(x0, noise, t).noisy, default.make(x0, noise, t).noisy)
    linear = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)  # another model's
    own = DDPMObjective("v", alphas_cumprod=linear).make(x0, noise, t)
    abar = linear[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(own.noisy, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)


def test_auto_settings_become_the_models_own_once():
    from training.config import TrainConfig
    from training.denoiser import NoiseSchedule

    flow = TrainConfig(noise_offset=0.1).for_model("flow", NoiseSchedule(shift=3.0), torch.bfloat16)
    assert (flow.objective, flow.shift, flow.precision, flow.min_snr_gamma, flow.noise_offset) == \
        ("flow", 3.0, "bf16", 0.0, 0.0)
    assert TrainConfig(shift=2.0).for_model("flow", NoiseSchedule(shift=3.0), torch.float32).shift == 2.0
    v = TrainConfig(precision="fp16").for_model("v", NoiseSchedule(), torch.float32)
    assert (v.objective, v.shift, v.precision, v.min_snr_gamma) == ("ddpm-v", None, "fp16", 5.0)
    with pytest.raises(ValueError, match="does not fit a model that predicts 'eps'"):
        TrainConfig(objective="flow").for_model("eps", NoiseSchedule(), torch.float32)
