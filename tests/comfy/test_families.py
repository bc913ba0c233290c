"""Every family through the nodes, on tiny models built from ComfyUI's own classes (scripts/tiny_families.py):
Encode Latents Cache runs the family's own ComfyUI text encoders (CLIP-L/H/G, T5, Qwen2.5-VL, small) and VAE
(SD's autoencoder, Qwen's Wan VAE), Train LoRA picks the family's objective and learns, Save LoRA writes the
family's portable format with its metadata, ComfyUI's own key map loads every tensor of the file, and the stock
loader's patched model equals Apply LoRA's.
"""

from __future__ import annotations

import functools
import math
import random
import re

import pytest
import torch

from scripts.make_demo_assets import make_demo_dataset, make_edit_pairs
from scripts.tiny_families import FLUX_FULL_WIDTH, TINY, tiny_clip, tiny_model, tiny_vae, unbuildable
from tests.comfy.conftest import run_node
from tests.families import EXPECTED

STEPS = 50


@functools.cache
def _encoders(family: str) -> tuple:
    """(CLIP, VAE) of the family, tiny, made once per module."""
    reason = unbuildable(family)
    if reason:
        pytest.skip(reason)
    return tiny_clip(family), tiny_vae(family)


@pytest.fixture(scope="module", autouse=True)
def _free_encoders():
    yield
    _encoders.cache_clear()  # before interpreter exit, where ComfyUI's patchers cannot be torn down


def _encoded(comfy, family: str):
    """The family's tiny dataset through Load LoRA Dataset and Encode Latents Cache with its CLIP and VAE."""
    folder = comfy.base / "input" / f"family_{family}"
    if not folder.exists():  # edit pairs: the control image is the target's negative; the caption says so
        (make_edit_pairs if TINY[family].edit else make_demo_dataset)(folder, count=4, size=64, seed=1)
    dataset, report = run_node(comfy, "LoraTrainerLoadDataset", folder=folder.name, resolution=64, bucket_multiple=64,
                               strict=True, edit_pairs=TINY[family].edit, random_crop=False, flip=False)
    assert "4 images" in report
    clip, vae = _encoders(family)
    encoded, _ = run_node(comfy, "LoraTrainerEncodeLatentsCache", dataset=dataset, vae=vae, clip=clip,
                          cache_dir=f"cache_{family}")
    return encoded


def loaded_entirely(model, sd: dict) -> dict:
    """ComfyUI's patches from the LoRA state dict ``sd`` for ``model``, after checking that its own key map consumed
    every tensor of it."""
    from comfy import lora as comfy_lora

    key_map = comfy_lora.model_lora_keys_unet(model.model, {})
    patches = comfy_lora.load_lora(sd, key_map)
    loaded = {k for k in sd for file_key, model_key in key_map.items()
              if model_key in patches and k.startswith(file_key + ".")}
    assert loaded == set(sd), f"not loaded: {sorted(set(sd) - loaded)[:5]}"
    return patches


def _probe_loss(pack, model, batch, config, guidance):
    """The engine's probe loss (4 fixed draws) with ``model`` loaded (and patched) the way ComfyUI does."""
    from comfy import model_management as mm

    mm.load_models_gpu([model], force_full_load=True)
    denoiser = pack.glue.bridge.ComfyDenoiser(model, guidance=guidance)
    batch = pack.training.batching.Batch(model.model.process_latent_in(batch.latents), batch.cond)
    return pack.training.loop.probe_loss(config, denoiser, pack.training.loop.objective_for(config), [batch], draws=4)


@pytest.mark.parametrize("family", list(TINY))
def test_family_trains_with_its_objective_and_saves_a_file_comfyui_loads_entirely(comfy, pack, family):
    import folder_paths
    from comfy import model_management as mm
    from comfy import model_sampling
    from comfy import utils as comfy_utils

    objective, base_version, architecture, first_key = EXPECTED[family]
    model = tiny_model(family)
    encoded = _encoded(comfy, family)
    lora, _, report, _ = run_node(comfy, "LoraTrainerTrain", model=model, encoded=encoded, steps=STEPS,
                               learning_rate=2e-3, rank=8, alpha=0.0, targets="all-linear", objective="auto",
                               batch_size=2, seed=0, name=f"tests/{family}")
    assert lora.config["objective"] == objective, report
    unused = ("min_snr_gamma", "noise_offset") if objective == "flow" else ("timestep_sampling",)
    unused += () if lora.family.guidance is not None else ("flux_guidance",)  # FLUX.1-dev's guidance embedding
    assert f"not used by {lora.family.name} ({objective}): {', '.join(unused)}" in report, report
    probe = re.search(r"probe loss ([\d.]+) -> ([\d.]+) \(-\d+%: 4 training images at fixed noise, steps 0 and "
                      rf"{STEPS}\)", report)
    assert probe and float(probe[2]) < 0.9 * float(probe[1]), report  # the run's own probe saw it learn
    if objective == "flow":  # the model's own shift, as the SD3-style factor (FLUX's model_sampling states log s)
        sampling = model.model.model_sampling
        flux = isinstance(sampling, model_sampling.ModelSamplingFlux)
        assert lora.config["shift"] == pytest.approx(math.exp(sampling.shift) if flux else sampling.shift)
    family_info = lora.family
    assert family_info.base_model_version == base_version

    # the loss at fixed probes falls: base model vs the same model with Apply LoRA's patches
    config = pack.training.config.TrainConfig.from_dict(lora.config)
    batch = encoded.data.collate(list(range(4)), random.Random(0))
    before = _probe_loss(pack, model, batch, config, family_info.guidance)
    applied, _ = run_node(comfy, "LoraTrainerApply", model=model, lora=lora, strength=1.0)
    after = _probe_loss(pack, applied, batch, config, family_info.guidance)
    assert after < 0.9 * before, f"{family}: probe loss {before:.4f} -> {after:.4f}"

    (path,) = run_node(comfy, "LoraTrainerSave", lora=lora, name=f"tests/{family}", format="auto",
                       precision="fp32")
    sd, metadata = comfy_utils.load_torch_file(path, safe_load=True, return_metadata=True)
    assert metadata["ss_base_model_version"] == base_version
    assert metadata["modelspec.architecture"] == architecture
    assert any(k.startswith(first_key) for k in sd), sorted(sd)[:4]
    if family_info.file_format == "diffusers":  # Qwen: lora_A/B with alpha baked in, no alpha keys
        assert not any(k.endswith(".alpha") for k in sd) and all(".lora_A." in k or ".lora_B." in k for k in sd)
    patches = loaded_entirely(model, sd)
    assert len(patches) == len(lora.layers)

    # the stock loader's model from the file gives exactly Apply LoRA's output
    name = f"tests/{family}.safetensors"
    assert name in folder_paths.get_filename_list("loras")
    (stock,) = run_node(comfy, "LoraLoaderModelOnly", model=model, lora_name=name, strength_model=1.0)
    assert _probe_loss(pack, stock, batch, config, family_info.guidance) == after
    mm.unload_all_models()


@pytest.mark.parametrize("family, inputs", [("SDXL", {"y"}), ("SD3", {"y"}), ("FLUX.1-dev", {"y", "guidance"}),
                                            ("Qwen-Image-Edit", {"ref_latents"})])
def test_the_family_conditioning_reaches_the_model(comfy, pack, family, inputs):
    """SDXL's pooled + size vector, SD3/FLUX's pooled vector, FLUX's guidance, the edit's reference latent."""
    bridge = pack.glue.bridge
    model = tiny_model(family)
    spec = TINY[family]
    shape = (2, spec.latent_channels, *((1,) if spec.frames else ()), 8, 8)
    noisy = torch.randn(shape)
    encoders = bridge.ComfyEncoders(*reversed(_encoders(family)))
    with torch.inference_mode():
        text = encoders.encode_text("zkx pattern")
    cond = {name: torch.stack([value, value]).clone() for name, value in text.items()}
    if spec.edit:
        cond["control"] = torch.randn(shape)
    denoiser = bridge.ComfyDenoiser(model, guidance=1.0 if "guidance" in inputs else None)
    assert inputs <= set(denoiser.model_inputs(noisy, cond))
    out = denoiser(noisy, torch.full((2,), 0.5 if denoiser.prediction == "flow" else 500.0), cond)
    assert out.shape == noisy.shape
    if spec.edit:  # the reference latent changes the prediction
        other = dict(cond, control=torch.randn(shape))
        assert not torch.equal(out, denoiser(noisy, torch.full((2,), 0.5), other))


# layers a family's presets name that its tiny model lacks: SD3.5-medium's second (MMDiT-X) self-attention
ABSENT_FROM_TINY = {"SD3": {"attn2.qkv", "attn2.proj"}}


@pytest.mark.parametrize("family", list(TINY))
def test_every_preset_of_the_family_record_names_layers_of_the_model(comfy, pack, family):
    model = tiny_model(family)
    record = pack.glue.families.family_of(model, edit=TINY[family].edit)
    assert record.presets, f"{family}: the record has no presets"
    linears = [name for name, module in model.model.diffusion_model.named_modules()
               if isinstance(module, torch.nn.Linear)]
    for preset, suffixes in record.presets.items():
        for suffix in set(suffixes) - ABSENT_FROM_TINY.get(family, set()):
            assert any(name == suffix or name.endswith(f".{suffix}") for name in linears), f"{preset}: {suffix}"


def test_padded_captions_in_a_batch_give_each_image_what_it_gets_alone(comfy, pack):
    """Captions of unequal length are padded to one length in a batch; the padding mask reaches the model (as
    ComfyUI's integer attention_mask), so an image's prediction does not depend on its batch neighbours."""
    bridge = pack.glue.bridge
    model = tiny_model("Qwen-Image")
    encoders = bridge.ComfyEncoders(*reversed(_encoders("Qwen-Image")))
    with torch.inference_mode():
        short, long = encoders.encode_text("zkx"), encoders.encode_text("zkx pattern of rings, blue and gold, bold")
    assert short["context"].shape[0] < long["context"].shape[0]
    batch = pack.training.batching.stack_conditioning([short, long])
    assert batch["mask"].shape == (2, long["context"].shape[0]) and not batch["mask"][0].all()
    denoiser = bridge.ComfyDenoiser(model)
    noisy, sigma = torch.randn(2, 16, 1, 8, 8), torch.full((2,), 0.5)
    if "attention_mask" not in denoiser.model_inputs(noisy, batch):
        pytest.skip("this ComfyUI's Qwen-Image takes no text mask (0.3.75): its sampler attends to padding too")
    with torch.no_grad():
        together = denoiser(noisy, sigma, batch)
        alone = denoiser(noisy[:1], sigma[:1], pack.training.batching.stack_conditioning([short]))
    torch.testing.assert_close(together[:1], alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", list(TINY))
def test_gradient_checkpointing_gives_the_same_lora_in_every_family(comfy, family):
    model = tiny_model(family)
    encoded = _encoded(comfy, family)
    settings = dict(model=model, encoded=encoded, steps=2, learning_rate=1e-3, rank=4, alpha=0.0,
                    targets="attention", objective="auto", batch_size=2, seed=0, name=f"tests/gc_{family}")
    off, _, _, _ = run_node(comfy, "LoraTrainerTrain", gradient_checkpointing="off", **settings)
    on, _, report, _ = run_node(comfy, "LoraTrainerTrain", gradient_checkpointing="on", **settings)
    assert "gradient checkpointing on" in report
    for name, tensors in off.layers.items():
        torch.testing.assert_close(on.layers[name].up, tensors.up, atol=1e-5, rtol=1e-4)


def _diffusers_model(family: str):
    """The diffusers model of the same tiny architecture as TINY[family], and its LoRA loader mixin."""
    from diffusers import (
        Flux2Transformer2DModel,
        FluxTransformer2DModel,
        QwenImageTransformer2DModel,
        UNet2DConditionModel,
        ZImageTransformer2DModel,
    )
    from diffusers.loaders import lora_pipeline

    torch.manual_seed(0)
    unet = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
                cross_attention_dim=64)
    if family == "SD15":
        return UNet2DConditionModel(**unet, attention_head_dim=8), lora_pipeline.StableDiffusionLoraLoaderMixin
    if family == "SDXL":
        return (UNet2DConditionModel(**unet, attention_head_dim=(1, 2), use_linear_projection=True,
                                     addition_embed_type="text_time", addition_time_embed_dim=256,
                                     projection_class_embeddings_input_dim=32 + 6 * 256),
                lora_pipeline.StableDiffusionXLLoraLoaderMixin)
    if family == "FLUX.1-dev":  # FLUX_FULL_WIDTH
        return (FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                       attention_head_dim=128, num_attention_heads=24, joint_attention_dim=64,
                                       pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
                lora_pipeline.FluxLoraLoaderMixin)
    if family == "FLUX.2":
        return (Flux2Transformer2DModel(in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=128,
                                        num_attention_heads=2, joint_attention_dim=192),
                lora_pipeline.Flux2LoraLoaderMixin)
    if family == "Z-Image":
        return (ZImageTransformer2DModel(dim=384, n_layers=1, n_heads=3, n_kv_heads=3, cap_feat_dim=64,
                                         axes_lens=[1536, 512, 512]),
                lora_pipeline.ZImageLoraLoaderMixin)
    return (QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                        attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64,
                                        axes_dims_rope=(8, 12, 12)),
            lora_pipeline.QwenImageLoraLoaderMixin)


def _diffusers_output(family: str, model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    context = torch.randn(1, 7, 64, generator=g)
    with torch.no_grad():
        if family in ("SD15", "SDXL"):
            added = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
            return model(torch.randn(1, 4, 8, 8, generator=g), 500, context,
                         added_cond_kwargs=added if family == "SDXL" else None).sample
        if family == "FLUX.1-dev":
            ids = torch.zeros(16, 3)
            ids[:, 1], ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
            return model(torch.randn(1, 16, 64, generator=g), context, torch.randn(1, 32, generator=g),
                         torch.tensor([0.5]), ids, torch.zeros(7, 3), torch.tensor([1.0])).sample
        if family == "FLUX.2":
            ids = torch.zeros(1, 16, 4)
            ids[0, :, 1], ids[0, :, 2] = torch.arange(16) // 4, torch.arange(16) % 4
            return model(torch.randn(1, 16, 128, generator=g), torch.randn(1, 7, 192, generator=g),
                         torch.tensor([0.5]), ids, torch.zeros(1, 7, 4), torch.tensor([1.0])).sample
        if family == "Z-Image":
            return model([torch.randn(16, 1, 8, 8, generator=g)], torch.tensor([0.5]), [context[0]])[0][0]
        return model(torch.randn(1, 16, 64, generator=g), context, torch.ones(1, 7, dtype=torch.bool),
                     torch.tensor([0.5]), img_shapes=[[(1, 4, 4)]]).sample


@pytest.mark.parametrize("family", ["SD15", "SDXL", "FLUX.1-dev", "Qwen-Image", "Z-Image", "FLUX.2"])
def test_the_saved_file_loads_in_diffusers_with_every_key(comfy, family, caplog):
    """The same file, through diffusers' own LoRA loader for that family, into the same tiny architecture."""
    import diffusers.utils.logging

    model = tiny_model(FLUX_FULL_WIDTH if family == "FLUX.1-dev" else family)
    encoded = _encoded(comfy, family)
    lora, _, _, _ = run_node(comfy, "LoraTrainerTrain", model=model, encoded=encoded, steps=2, learning_rate=1e-2,
                          rank=4, alpha=2.0, targets="attention+mlp", objective="auto", batch_size=2, seed=0,
                          name=f"tests/diffusers_{family}")
    (path,) = run_node(comfy, "LoraTrainerSave", lora=lora, name=f"tests/diffusers_{family}", format="auto",
                       precision="fp32")

    target, loader = _diffusers_model(family)
    before = _diffusers_output(family, target)
    diffusers.utils.logging.enable_propagation()
    with caplog.at_level("WARNING"):
        loaded = loader.lora_state_dict(path, **({"unet_config": target.config} if family == "SDXL" else {}))
        state_dict, alphas = loaded[:2] if isinstance(loaded, tuple) else (loaded, None)
        if family in ("SD15", "SDXL"):
            loader.load_lora_into_unet(state_dict, alphas, target)
        elif family == "FLUX.1-dev":
            loader.load_lora_into_transformer(state_dict, alphas, target)
        else:
            loader.load_lora_into_transformer(state_dict, target)
    problems = [r.getMessage() for r in caplog.records if "key" in r.getMessage().lower()]
    assert not problems, problems[:3]
    adapted = {name for name, module in target.named_modules() if hasattr(module, "lora_A") and module.lora_A}
    # FLUX's fused layers become several diffusers layers: qkv -> to_q/k/v, linear1 -> to_q/k/v + proj_mlp
    # (FLUX.2's diffusers single blocks keep linear1 fused: to_qkv_mlp_proj)
    fused = {"qkv": 3, "linear1": 1 if family == "FLUX.2" else 4}
    expected = sum(fused.get(path.rsplit(".", 1)[-1], 1) for path in lora.layers)
    assert len(adapted) == expected, (len(adapted), expected)
    assert not torch.allclose(_diffusers_output(family, target), before)
    del model, target
