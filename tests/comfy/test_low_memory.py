"""Training on the model as ComfyUI loaded it: fp8-stored weights (cast per layer, remade for the backward pass),
weights ComfyUI keeps in CPU memory under a memory budget, and weight formats that cannot train."""

from __future__ import annotations

import random

import pytest
import torch

from scripts.tiny_families import TINY, load_diffusion_file, scaled_fp8_file, tiny_model
from tests.comfy.conftest import run_node
from tests.comfy.test_families import _encoded, _probe_loss

FP8 = torch.float8_e4m3fn


def _probe(pack, model, batch, config, guidance) -> float:
    """The probe loss with the model loaded the way ComfyUI's executor loads it (in inference mode: 0.3.75 rounds
    patched fp8 weights with ops that autograd refuses outside it)."""
    with torch.inference_mode():
        return _probe_loss(pack, model, batch, config, guidance)


def _train(comfy, model, encoded, name, **extra):
    settings = dict(steps=30, learning_rate=2e-3, rank=8, alpha=0.0, targets="attention", objective="auto",
                    batch_size=2, seed=0, name=name) | extra
    return run_node(comfy, "LoraTrainerTrain", model=model, encoded=encoded, **settings)


@pytest.mark.parametrize("family, dtype", [(family, FP8) for family in TINY] + [("FLUX.1-dev", torch.float8_e5m2)])
def test_an_fp8_stored_model_trains_and_its_lora_loads_on_the_full_precision_model(comfy, pack, family, dtype):
    import comfy.lora as comfy_lora
    import comfy.model_management as mm
    import comfy.utils as comfy_utils

    stored = tiny_model(family, dtype=dtype)
    assert any(t.dtype == dtype for t in stored.model.diffusion_model.state_dict().values())
    encoded = _encoded(comfy, family)
    lora, _, report, _ = _train(comfy, stored, encoded, f"tests/fp8_{family}", steps=50, targets="all-linear")
    guidance = lora.family.guidance
    config = pack.training.config.TrainConfig.from_dict(lora.config)
    batch = encoded.data.collate(list(range(4)), random.Random(0))
    before = _probe(pack, stored, batch, config, guidance)
    applied, _ = run_node(comfy, "LoraTrainerApply", model=stored, lora=lora, strength=1.0)
    after = _probe(pack, applied, batch, config, guidance)
    assert after < 0.9 * before, f"{family} stored as {dtype}: probe loss {before:.4f} -> {after:.4f} ({report})"
    assert all(t.down.dtype == torch.float32 for t in lora.layers.values())  # the adapter kept its own precision

    # the file loads, every tensor of it, on the same model in full precision
    (path,) = run_node(comfy, "LoraTrainerSave", lora=lora, name=f"tests/fp8_{family}", format="auto",
                       precision="fp32")
    full = tiny_model(family)
    sd = comfy_utils.load_torch_file(path, safe_load=True)
    key_map = comfy_lora.model_lora_keys_unet(full.model, {})
    patches = comfy_lora.load_lora(sd, key_map)
    assert len(patches) == len(lora.layers)
    (stock,) = run_node(comfy, "LoraLoaderModelOnly", model=full, lora_name=f"tests/fp8_{family}.safetensors",
                        strength_model=1.0)
    assert _probe(pack, stock, batch, config, guidance) < 0.9 * _probe(pack, full, batch, config, guidance)
    mm.unload_all_models()


@pytest.mark.parametrize("family", ["FLUX.1-dev", "Qwen-Image"])
def test_a_scaled_fp8_file_loaded_by_comfyuis_loader_trains_and_its_lora_loads_on_the_full_model(comfy, pack, family):
    """ComfyUI's fp8 releases store a scale per matrix: 0.3.75 multiplies it in after the cast, 0.33 makes the
    layers quantised tensors (its mixed-precision ops, which are not torch Linear layers)."""
    import comfy.model_management as mm

    full = tiny_model(family)
    stored = load_diffusion_file(family, scaled_fp8_file(full))
    encoded = _encoded(comfy, family)
    lora, _, report, _ = _train(comfy, stored, encoded, f"tests/scaled_fp8_{family}", steps=50, targets="all-linear")
    config = pack.training.config.TrainConfig.from_dict(lora.config)
    batch = encoded.data.collate(list(range(4)), random.Random(0))
    guidance = lora.family.guidance
    applied, _ = run_node(comfy, "LoraTrainerApply", model=stored, lora=lora, strength=1.0)
    before, after = _probe(pack, stored, batch, config, guidance), _probe(pack, applied, batch, config, guidance)
    assert after < 0.9 * before, f"{family}, scaled fp8: probe loss {before:.4f} -> {after:.4f} ({report})"
    (path,) = run_node(comfy, "LoraTrainerSave", lora=lora, name=f"tests/scaled_fp8_{family}", format="auto",
                       precision="fp32")
    (stock,) = run_node(comfy, "LoraLoaderModelOnly", model=full, lora_name=f"tests/scaled_fp8_{family}.safetensors",
                        strength_model=1.0)
    assert _probe(pack, stock, batch, config, guidance) < 0.9 * _probe(pack, full, batch, config, guidance)
    mm.unload_all_models()


@pytest.mark.parametrize("fp8", ["plain", "scaled", "scaled, input pre-scaled"])
def test_the_input_gradient_through_remade_fp8_weights_is_autograds(comfy, pack, fp8):
    """What every LoRA upstream of a frozen layer learns from: ∂loss/∂input, with each casting layer's weight
    remade in the backward pass, equals autograd's through ComfyUI's own forward (which keeps the cast weights).
    Pre-scaled: 0.33's quantised layers scale their input by a ``pre_quant_scale`` where the file has one (AWQ)."""
    bridge, memory = pack.glue.bridge, pack.training.memory
    full = tiny_model("FLUX.1-dev")
    model = tiny_model("FLUX.1-dev", dtype=FP8) if fp8 == "plain" else load_diffusion_file("FLUX.1-dev",
                                                                                           scaled_fp8_file(full))
    if fp8.endswith("pre-scaled"):
        quantised = [m for m in model.model.diffusion_model.modules()
                     if type(getattr(m, "weight", None)).__name__ == "QuantizedTensor"]
        if not quantised:
            pytest.skip("this ComfyUI's scaled-fp8 layers hold plain fp8 weights and take no pre_quant_scale")
        for layer in quantised:
            layer.pre_quant_scale = torch.rand(layer.in_features, generator=torch.Generator().manual_seed(0)) + 0.5
    bridge.load_for_training(model)
    with torch.inference_mode(False):  # quantised weights stay inference tensors, which autograd cannot save
        for layer in model.model.diffusion_model.modules():
            for name, param in list(layer._parameters.items()):
                if param is not None and param.is_inference():
                    layer._parameters[name] = torch.nn.Parameter(param.clone())
        model.model.diffusion_model.requires_grad_(False)  # frozen, as under a LoRA
    denoiser = bridge.ComfyDenoiser(model, guidance=3.5)
    batch = _encoded(comfy, "FLUX.1-dev").data.collate([0, 1], random.Random(0))

    def input_gradient() -> torch.Tensor:
        latents = batch.latents.clone().requires_grad_()
        denoiser(latents, torch.full((2,), 0.5), batch.cond).square().sum().backward()
        return latents.grad

    with torch.inference_mode(False), torch.enable_grad(), bridge.training_mode():
        expected = input_gradient()
        layers = list(bridge.frozen_layers(denoiser.module))
        assert sum(needs_cast() for _, _, needs_cast in layers) > 10
        with memory.remade_weights(layers):
            remade = input_gradient()
    error = ((remade - expected).norm() / expected.norm()).item()
    assert error < 1e-5, f"{fp8} fp8: the remade input gradient is {error:.2e} off autograd's (relative norm)"


@pytest.mark.parametrize("family", ["FLUX.1-dev", "SDXL", "Qwen-Image"])
def test_training_with_weights_kept_in_cpu_memory_gives_the_same_lora(comfy, family):
    """A budget far below the model's size: ComfyUI's partial unloading leaves most layers to be cast per call
    (the path an offloaded layer takes on a GPU), and the LoRA is the fully loaded run's (fp32)."""
    import comfy.model_management as mm

    encoded = _encoded(comfy, family)
    model = tiny_model(family)
    full, _, _, _ = _train(comfy, model, encoded, f"tests/full_{family}", steps=3, gradient_checkpointing="off")
    mm.unload_all_models()
    model = tiny_model(family)
    offloaded, _, _, _ = _train(comfy, model, encoded, f"tests/offload_{family}", steps=3, gradient_checkpointing="off",
                             memory_budget_gb=0.0005)
    casting = [m for m in model.model.diffusion_model.modules() if getattr(m, "comfy_cast_weights", False)]
    assert len(casting) > 10, "the budget left the model fully loaded"
    for name, tensors in full.layers.items():
        torch.testing.assert_close(offloaded.layers[name].down, tensors.down, atol=1e-6, rtol=0)
        torch.testing.assert_close(offloaded.layers[name].up, tensors.up, atol=1e-6, rtol=0)
    mm.unload_all_models()


def test_gradient_checkpointing_auto_turns_on_before_the_first_step_when_the_step_exceeds_the_budget(comfy):
    import comfy.model_management as mm

    encoded = _encoded(comfy, "FLUX.1-dev")
    _, _, roomy, _ = _train(comfy, tiny_model("FLUX.1-dev"), encoded, "tests/budget_roomy", steps=1,
                         memory_budget_gb=64.0)
    _, _, tight, _ = _train(comfy, tiny_model("FLUX.1-dev"), encoded, "tests/budget_tight", steps=1,
                         memory_budget_gb=0.0005)
    assert "gradient checkpointing on" not in roomy and "gradient checkpointing on" in tight
    mm.unload_all_models()


def test_a_weight_format_that_cannot_train_is_named_with_what_to_load_instead(comfy):
    model = tiny_model("FLUX.1-dev")
    layer = model.model.diffusion_model.img_in
    layer.weight = torch.nn.Parameter(torch.zeros(layer.weight.shape, dtype=torch.int8), requires_grad=False)
    encoded = _encoded(comfy, "FLUX.1-dev")
    with pytest.raises(TypeError, match=r"^Train LoRA: layer img_in stores its weight as .*int8.*ComfyUI's own loader"):
        _train(comfy, model, encoded, "tests/int8", steps=1)
