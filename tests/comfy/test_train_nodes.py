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
    lora, curve, report, _ = run_node(comfy, "LoraTrainerTrain", model=model, encoded=encoded, **TRAIN)
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


def _sample(comfy, model, clip, seed=3):
    (positive,) = run_node(comfy, "CLIPTextEncode", clip=clip, text="zkx pattern")
    (negative,) = run_node(comfy, "CLIPTextEncode", clip=clip, text="")
    (latent,) = run_node(comfy, "EmptyLatentImage", width=64, height=64, batch_size=1)
    (out,) = run_node(comfy, "KSampler", model=model, seed=seed, steps=2, cfg=4.0, sampler_name="euler",
                      scheduler="normal", positive=positive, negative=negative, latent_image=latent, denoise=1.0)
    return out["samples"]


def test_no_side_effects_and_apply_lora_equals_the_stock_lora_loader(comfy, sd15, demo_folder):
    model, clip, _ = sd15
    base_before = _sample(comfy, model, clip)
    encoded, _ = _encoded(comfy, sd15, demo_folder)
    lora, _, _, _ = run_node(comfy, "LoraTrainerTrain", model=model, encoded=encoded, **{**TRAIN, "steps": 8,
                                                                                    "learning_rate": 1e-2})
    # the MODEL given to Train LoRA still samples the base model's images, bit for bit
    assert torch.equal(_sample(comfy, model, clip), base_before)
    (applied,) = run_node(comfy, "LoraTrainerApply", model=model, lora=lora, strength=1.0)
    with_apply = _sample(comfy, applied, clip)
    assert not torch.equal(with_apply, base_before)  # the LoRA does something
    (path,) = run_node(comfy, "LoraTrainerSave", lora=lora, name="tests/apply_check", format="auto",
                       precision="fp32")
    import folder_paths

    assert "tests/apply_check.safetensors" in folder_paths.get_filename_list("loras")  # listed at once
    loaded, _ = run_node(comfy, "LoraLoader", model=model, clip=clip, lora_name="tests/apply_check.safetensors",
                         strength_model=1.0, strength_clip=0.0)
    assert torch.equal(_sample(comfy, loaded, clip), with_apply)
    assert torch.equal(_sample(comfy, model, clip), base_before)  # and still the base afterwards


def test_a_warm_cache_never_calls_the_vae_or_text_encoder(comfy, sd15, demo_folder):
    _, clip, vae = sd15
    calls = {"vae": 0, "clip": 0}
    # ComfyUI calls encode methods rather than forward(): count the VAE's encode and the text model's token
    # embedding lookups (one per caption encoded)
    vae.first_stage_model.encode = _counting(vae.first_stage_model.encode, calls, "vae")
    embedding = next(m for m in clip.cond_stage_model.modules() if isinstance(m, torch.nn.Embedding))
    hooks = [embedding.register_forward_pre_hook(lambda *a: calls.__setitem__("clip", calls["clip"] + 1))]
    try:
        dataset, _ = run_node(comfy, "LoraTrainerLoadDataset", folder=str(demo_folder), resolution=128,
                              bucket_multiple=64, strict=True, edit_pairs=False, random_crop=False, flip=True)
        run_node(comfy, "LoraTrainerEncodeLatentsCache", dataset=dataset, vae=vae, clip=clip, cache_dir="warm")
        assert calls["vae"] >= 8 and calls["clip"] >= 5  # 4 images × 2 flips; 4 captions + the empty one
        calls.update(vae=0, clip=0)
        _, report = run_node(comfy, "LoraTrainerEncodeLatentsCache", dataset=dataset, vae=vae, clip=clip,
                             cache_dir="warm")
        assert calls == {"vae": 0, "clip": 0} and "encoded 0 images and 0 captions" in report
    finally:
        for hook in hooks:
            hook.remove()
        del vae.first_stage_model.encode


def _counting(function, calls, key):
    def counted(*args, **kwargs):
        calls[key] += 1
        return function(*args, **kwargs)

    return counted


def test_gradient_checkpointing_learns_the_same_lora_and_comes_off_again(comfy, sd15, demo_folder, monkeypatch):
    model, _, _ = sd15
    encoded, _ = _encoded(comfy, sd15, demo_folder)
    recomputed = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda *a, **k: recomputed.append(1) or checkpoint(*a, **k))
    off, _, _, _ = run_node(comfy, "LoraTrainerTrain", model=model, encoded=encoded, gradient_checkpointing="off",
                         **TRAIN)
    assert not recomputed
    on, _, report, _ = run_node(comfy, "LoraTrainerTrain", model=model, encoded=encoded, gradient_checkpointing="on",
                             **TRAIN)
    assert "gradient checkpointing on" in report and recomputed
    assert off.layers.keys() == on.layers.keys()
    for name, tensors in off.layers.items():
        torch.testing.assert_close(on.layers[name].up, tensors.up, atol=1e-5, rtol=1e-4)
    blocks = [m for m in model.model.diffusion_model.modules() if "forward" in vars(m)]
    assert not blocks, "checkpointing wrappers were left on the model"


def test_the_encoder_identity_is_the_same_for_every_load_of_a_checkpoint(comfy, pack, sd15):
    """Else a restarted ComfyUI would never find its latent cache warm."""
    from tests.conftest import TINY_CKPT_NAME

    bridge = pack.glue.bridge
    _, clip, vae = sd15
    identities = {bridge.ComfyEncoders(vae, clip).identity}
    for _ in range(2):
        _, clip_again, vae_again = run_node(comfy, "CheckpointLoaderSimple", ckpt_name=TINY_CKPT_NAME)[:3]
        identities.add(bridge.ComfyEncoders(vae_again, clip_again).identity)
    assert len(identities) == 1
