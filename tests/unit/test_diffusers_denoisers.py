"""Denoiser adapters on tiny diffusers models: shapes, exact packing, the same call the diffusers
pipelines make, masks and edit controls that matter, gradients, determinism."""

import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline

from tests.unit.tiny_models import (
    LATENT_CHANNELS,
    tiny_cond,
    tiny_flux,
    tiny_qwen_image,
    tiny_sdxl_unet,
    tiny_unet,
)
from training.diffusers_denoisers import (
    FluxDenoiser,
    QwenImageDenoiser,
    UNetDenoiser,
    pack_latents,
    unpack_latents,
)

FAMILIES = {
    "unet": lambda: UNetDenoiser(tiny_unet()),
    "sdxl": lambda: UNetDenoiser(tiny_sdxl_unet()),
    "flux": lambda: FluxDenoiser(tiny_flux()),
    "qwen": lambda: QwenImageDenoiser(tiny_qwen_image()),
}


def _inputs(family, batch=2, height=32, width=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    noisy = torch.randn(batch, LATENT_CHANNELS[family], height, width, generator=g)
    if family in ("unet", "sdxl"):
        timestep = torch.tensor([999.0, 10.0, 500.0, 250.0][:batch])
    else:
        timestep = torch.tensor([0.9, 0.1, 0.5, 0.25][:batch])
    return noisy, timestep, tiny_cond(family, batch, generator=g)


def _latents(family, batch, height, width, seed):
    return torch.randn(batch, LATENT_CHANNELS[family], height, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", [(32, 32), (32, 16), (16, 24)])
def test_output_has_the_latent_shape(family, size):
    denoiser = FAMILIES[family]()
    noisy, timestep, cond = _inputs(family, 2, *size)
    with torch.no_grad():
        out = denoiser(noisy, timestep, cond)
    assert out.shape == noisy.shape and out.dtype == noisy.dtype
    assert torch.isfinite(out).all()
    assert denoiser.prediction == ("flow" if family in ("flux", "qwen") else "eps")


def test_packing_round_trips_exactly_and_matches_the_pipelines():
    x = _latents("flux", 2, 8, 6, seed=1)
    tokens = pack_latents(x)
    assert tokens.shape == (2, 4 * 3, 16 * 4)
    assert torch.equal(unpack_latents(tokens, 8, 6), x)
    assert torch.equal(tokens, QwenImagePipeline._pack_latents(x, 2, 16, 8, 6))
    # The pipelines unpack from pixel sizes (latent size x VAE factor 8); Qwen's adds a frame axis.
    assert torch.equal(FluxPipeline._unpack_latents(tokens, 8 * 8, 6 * 8, 8), x)
    assert torch.equal(QwenImagePipeline._unpack_latents(tokens, 8 * 8, 6 * 8, 8)[:, :, 0], x)
    # Token 1 is the second 2x2 patch of the first row, channel-major inside: (c, dy, dx).
    assert torch.equal(tokens[0, 1], x[0, :, 0:2, 2:4].reshape(-1))


@torch.no_grad()
def test_flux_makes_the_call_flux_pipeline_makes():
    transformer = tiny_flux()
    noisy, sigma, cond = _inputs("flux", 2, 16, 24)
    timestep = sigma * 1000  # FlowMatchEulerDiscreteScheduler's timesteps; the pipeline passes t / 1000
    reference = transformer(
        hidden_states=FluxPipeline._pack_latents(noisy, 2, 16, 16, 24),
        timestep=timestep / 1000,
        guidance=torch.full([1], 1.0, dtype=torch.float32).expand(2),
        pooled_projections=cond["pooled"],
        encoder_hidden_states=cond["context"],
        txt_ids=torch.zeros(8, 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(2, 8, 12, "cpu", torch.float32),
        return_dict=False,
    )[0]
    out = FluxDenoiser(transformer)(noisy, sigma, cond)
    assert torch.equal(out, FluxPipeline._unpack_latents(reference, 16 * 8, 24 * 8, 8))


@torch.no_grad()
def test_flux_guidance_reaches_the_model_and_mask_is_ignored():
    transformer = tiny_flux()
    noisy, sigma, cond = _inputs("flux")
    base = FluxDenoiser(transformer)(noisy, sigma, cond)
    assert not torch.allclose(FluxDenoiser(transformer, guidance=3.5)(noisy, sigma, cond), base)
    # FLUX attends to T5 padding (FluxPipeline passes no mask), so a mask must not change anything.
    masked = dict(cond, mask=torch.tensor([[1] * 4 + [0] * 4] * 2))
    assert torch.equal(FluxDenoiser(transformer)(noisy, sigma, masked), base)


@torch.no_grad()
def test_flux_kontext_control_is_appended_with_frame_id_1():
    transformer = tiny_flux()
    noisy, sigma, cond = _inputs("flux", 2, 16, 16)
    control = _latents("flux", 2, 8, 12, seed=5)  # reference image at its own size
    out = FluxDenoiser(transformer)(noisy, sigma, dict(cond, control=control))
    assert out.shape == noisy.shape
    assert not torch.allclose(out, FluxDenoiser(transformer)(noisy, sigma, cond))

    # FluxKontextPipeline.prepare_latents / __call__: ids (0, r, c) for the target, (1, r, c) for the image.
    image_ids = FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32)
    image_ids[..., 0] = 1
    reference = transformer(
        hidden_states=torch.cat([pack_latents(noisy), pack_latents(control)], dim=1),
        timestep=sigma,
        guidance=torch.ones(2),
        pooled_projections=cond["pooled"],
        encoder_hidden_states=cond["context"],
        txt_ids=torch.zeros(8, 3),
        img_ids=torch.cat([FluxPipeline._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32), image_ids]),
    ).sample[:, :64]
    assert torch.equal(out, unpack_latents(reference, 16, 16))


@torch.no_grad()
@pytest.mark.parametrize("with_control", [False, True])
def test_qwen_makes_the_call_qwen_pipelines_make(with_control):
    transformer = tiny_qwen_image()
    noisy, sigma, cond = _inputs("qwen", 2, 16, 24)
    hidden, shapes = QwenImagePipeline._pack_latents(noisy, 2, 16, 16, 24), [(1, 8, 12)]
    if with_control:  # QwenImageEditPipeline: image latents after the target, both in img_shapes
        cond["control"] = _latents("qwen", 2, 12, 12, seed=7)
        hidden = torch.cat([hidden, QwenImagePipeline._pack_latents(cond["control"], 2, 16, 12, 12)], dim=1)
        shapes.append((1, 6, 6))
    reference = transformer(
        hidden_states=hidden,
        timestep=sigma * 1000 / 1000,
        guidance=None,
        encoder_hidden_states_mask=cond["mask"],
        encoder_hidden_states=cond["context"],
        img_shapes=[shapes] * 2,
        return_dict=False,
    )[0][:, : 8 * 12]
    out = QwenImageDenoiser(transformer)(noisy, sigma, cond)
    assert torch.equal(out, QwenImagePipeline._unpack_latents(reference, 16 * 8, 24 * 8, 8)[:, :, 0])


@torch.no_grad()
def test_qwen_edit_control_changes_the_prediction():
    denoiser = QwenImageDenoiser(tiny_qwen_image())
    noisy, sigma, cond = _inputs("qwen")
    plain = denoiser(noisy, sigma, cond)
    edits = [denoiser(noisy, sigma, dict(cond, control=_latents("qwen", 2, 32, 32, seed=s))) for s in (1, 2)]
    assert edits[0].shape == noisy.shape
    assert not torch.allclose(edits[0], plain)
    assert not torch.allclose(edits[0], edits[1])


@torch.no_grad()
@pytest.mark.parametrize("family", ["qwen", "unet"])
def test_padding_is_invisible_when_the_mask_says_so(family):
    denoiser = FAMILIES[family]()
    noisy, timestep, cond = _inputs(family)
    if family == "unet":
        cond["mask"] = torch.tensor([[1] * 6 + [0] * 2, [1] * 4 + [0] * 4])
    padding = (cond["mask"] == 0)[..., None]
    assert padding.any(dim=1).all()  # every sample has padding
    changed = dict(cond, context=torch.where(padding, 5 * torch.randn_like(cond["context"]), cond["context"]))
    torch.testing.assert_close(denoiser(noisy, timestep, changed), denoiser(noisy, timestep, cond),
                               rtol=0, atol=1e-6)
    # ...and without the mask the same change is visible, so the assertion above is not vacuous.
    unmasked, unmasked_changed = ({k: v for k, v in c.items() if k != "mask"} for c in (cond, changed))
    assert not torch.allclose(denoiser(noisy, timestep, unmasked_changed), denoiser(noisy, timestep, unmasked))


@torch.no_grad()
def test_sdxl_time_ids_default_to_the_latent_size_uncropped():
    denoiser = UNetDenoiser(tiny_sdxl_unet())
    noisy, timestep, cond = _inputs("sdxl", 2, 32, 16)
    explicit = dict(cond, time_ids=torch.tensor([[256.0, 128, 0, 0, 256, 128]] * 2))
    assert torch.equal(denoiser(noisy, timestep, cond), denoiser(noisy, timestep, explicit))
    cropped = dict(cond, time_ids=torch.tensor([[512.0, 256, 64, 0, 256, 128]] * 2))
    assert not torch.allclose(denoiser(noisy, timestep, cond), denoiser(noisy, timestep, cropped))


# In Qwen-Image's last block the text stream's output is never read, so its output projections get no
# gradient (true of the real 60-layer model too). Everything else must.
UNUSED = {
    "qwen": ("transformer_blocks.1.attn.to_add_out.", "transformer_blocks.1.txt_mlp."),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_backward_reaches_every_used_parameter(family):
    denoiser = FAMILIES[family]()
    noisy, timestep, cond = _inputs(family)
    denoiser(noisy, timestep, cond).square().mean().backward()
    unused = UNUSED.get(family, ())
    for name, param in denoiser.module.named_parameters():
        if name.startswith(unused):
            assert param.grad is None, name
        else:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
    attention = [p.grad for n, p in denoiser.module.named_parameters() if n.endswith(("to_q.weight", "to_v.weight"))]
    assert attention and all(g.abs().sum() > 0 for g in attention)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_gives_the_same_gradients(family):
    grads = []
    for enabled in (False, True):
        denoiser = FAMILIES[family]()
        denoiser.set_gradient_checkpointing(enabled)
        noisy, timestep, cond = _inputs(family)
        denoiser(noisy, timestep, cond).square().mean().backward()
        grads.append({n: p.grad for n, p in denoiser.module.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_same_inputs_give_identical_outputs(family):
    first, second = FAMILIES[family](), FAMILIES[family]()
    assert all(torch.equal(a, b) for a, b in zip(first.module.state_dict().values(),
                                                  second.module.state_dict().values()))
    noisy, timestep, cond = _inputs(family)
    with torch.no_grad():
        assert torch.equal(first(noisy, timestep, cond), first(noisy, timestep, cond))
        assert torch.equal(first(noisy, timestep, cond), second(noisy, timestep, cond))


def test_bad_inputs_are_refused_with_the_fix():
    flux, qwen, unet = FAMILIES["flux"](), FAMILIES["qwen"](), FAMILIES["unet"]()
    noisy, sigma, cond = _inputs("flux")
    with pytest.raises(ValueError, match="expects 16 latent channels, got 4"):
        flux(noisy[:, :4], sigma, cond)
    with pytest.raises(ValueError, match="must be even; got 32x31"):
        flux(noisy[..., :31], sigma, cond)
    with pytest.raises(ValueError, match=r"needs cond\['pooled'\]"):
        flux(noisy, sigma, {"context": cond["context"]})
    with pytest.raises(ValueError, match=r"cond\['control'\] as \[B, C, h, w\] with B=2"):
        qwen(noisy, sigma, dict(tiny_cond("qwen", 2), control=noisy[:1]))
    with pytest.raises(ValueError, match=r"latents \[B, C, H, W\]"):
        unet(torch.zeros(2, 4, 1, 8, 8), torch.zeros(2), tiny_cond("unet", 2))
    with pytest.raises(ValueError, match="'eps' or 'v'"):
        UNetDenoiser(tiny_unet(), prediction="flow")
