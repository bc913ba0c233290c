"""The nodes in ComfyUI's own process: dataset -> dropout -> cache -> train -> save / apply."""

from __future__ import annotations

import torch

from tests.comfy.conftest import run_node

TRAIN = dict(steps=6, learning_rate=1e-3, rank=4, alpha=0.0, targets="attention", objective="auto",
             batch_size=2, seed=0, name="tests/tiny")


def _encoded(comfy, sd15, demo_folder, **dropout):
    _, clip, vae = sd15
    dataset, report = run_node(comfy, "LoraTrainerLoadDataset", folder="rings", resolution=128,
                               bucket_multiple=64, strict=True, edit_pairs=False, random_crop=False, flip=False)
    assert "4 images" in report
    options = dict(dropout=0.1, trigger_word="zkx", shuffle_tags=False, keep_tokens=1, shuffle_variants=1)
    (dataset,) = run_node(comfy, "LoraTrainerCaptionDropout", dataset=dataset, **{**options, **dropout})
    encoded, report = run_node(comfy, "LoraTrainerEncodeLatentsCache", dataset=dataset, vae=vae, clip=clip,
                               cache_dir="cache")
    return encoded, report


def test_train_save_and_the_file_loads_in_comfyui_with_every_key(comfy, sd15, demo_folder):
    model, _, _ = sd15
    encoded, report = _encoded(comfy, sd15, demo_folder)
    assert "encoded" in report
    lora, curve, report = run_node(comfy, "LoraTrainerTrain", model=model, encoded=encoded, **TRAIN)
    assert lora.steps == 6 and not lora.cancelled and lora.config["objective"] == "ddpm-eps"
    assert curve.shape[0] == 1 and curve.shape[-1] == 3
    (path,) = run_node(comfy, "LoraTrainerSave", lora=lora, name="tests/tiny", format="auto", precision="fp32")
    import comfy.lora
    import comfy.utils

    sd = comfy.utils.load_torch_file(path, safe_load=True)
    assert all(k.startswith("lora_unet_down_blocks_") or k.startswith("lora_unet_up_blocks_")
               or k.startswith("lora_unet_mid_block") for k in sd)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(sd, key_map)
    consumed = {k for k in sd if any(k.startswith(p + ".") for p in _prefixes(key_map, patches))}
    assert consumed == set(sd), f"not loaded: {sorted(set(sd) - consumed)[:5]}"
    assert len(patches) == len(lora.layers)


def _prefixes(key_map, patches):
    return [file_key for file_key, model_key in key_map.items() if model_key in patches]


def test_model_is_unchanged_after_training(comfy, sd15, demo_folder):
    model, _, _ = sd15
    encoded, _ = _encoded(comfy, sd15, demo_folder)
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    modules = [type(m) for m in model.model.diffusion_model.modules()]
    run_node(comfy, "LoraTrainerTrain", model=model, encoded=encoded, **TRAIN)
    after = model.model.diffusion_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in model.model.diffusion_model.modules()] == modules
