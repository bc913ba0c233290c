"""Training on the model as ComfyUI loaded it: fp8-stored weights (cast per layer, remade for the backward pass),
weights ComfyUI keeps in CPU memory under a memory budget, and weight formats that cannot train."""

from __future__ import annotations

import random

import pytest
import torch

from scripts.tiny_families import TINY, tiny_model
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
    lora, _, report = _train(comfy, stored, encoded, f"tests/fp8_{family}", steps=50, targets="all-linear")
    guidance = lora.family.guidance
    config = pack.training.config.TrainConfig.from_dict(lora.config)
    batch = encoded.data.collate(list(range(4)), random.Random(0))
    before = _probe(pack, stored, batch, config, guidance)
    (applied,) = run_node(comfy, "LoraTrainerApply", model=stored, lora=lora, strength=1.0)
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


@pytest.mark.parametrize("family", ["FLUX.1-dev", "SDXL", "Qwen-Image"])
def test_training_with_weights_kept_in_cpu_memory_gives_the_same_lora(comfy, family):
    """A budget far below the model's size: ComfyUI's partial unloading leaves most layers to be cast per call
    (the path an offloaded layer takes on a GPU), and the LoRA is the fully loaded run's (fp32)."""
    import comfy.model_management as mm

    encoded = _encoded(comfy, family)
    model = tiny_model(family)
    full, _, _ = _train(comfy, model, encoded, f"tests/full_{family}", steps=3, gradient_checkpointing="off")
    mm.unload_all_models()
    model = tiny_model(family)
    offloaded, _, _ = _train(comfy, model, encoded, f"tests/offload_{family}", steps=3, gradient_checkpointing="off",
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
    _, _, roomy = _train(comfy, tiny_model("FLUX.1-dev"), encoded, "tests/budget_roomy", steps=1,
                         memory_budget_gb=64.0)
    _, _, tight = _train(comfy, tiny_model("FLUX.1-dev"), encoded, "tests/budget_tight", steps=1,
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
