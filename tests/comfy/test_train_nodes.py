"""The nodes in ComfyUI's own process: dataset -> dropout -> cache -> train -> save / apply."""

from __future__ import annotations

import pytest
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
    applied, _ = run_node(comfy, "LoraTrainerApply", model=model, lora=lora, strength=1.0)
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


def test_a_folder_of_photos_without_captions_trains_on_the_trigger_word(comfy, sd15, demo_folder):
    """The most common first dataset: photos and nothing else. Each trains on the trigger word (the default
    stand-in), and the reports say how many did."""
    import shutil

    model, clip, vae = sd15
    photos = comfy.base / "input" / "photos"
    photos.mkdir(exist_ok=True)
    for image in sorted(demo_folder.glob("*.png"))[:3]:
        shutil.copy(image, photos / image.name)
    dataset, report = run_node(comfy, "LoraTrainerLoadDataset", folder="photos", resolution=128, bucket_multiple=64,
                               strict=True, edit_pairs=False, random_crop=False, flip=False)
    assert "3 images found" in report and "3 images have no caption file" in report
    (dataset,) = run_node(comfy, "LoraTrainerCaptionDropout", dataset=dataset, dropout=0.0, trigger_word="zkx",
                          shuffle_tags=False, keep_tokens=1, shuffle_variants=1)
    encoded, report = run_node(comfy, "LoraTrainerEncodeLatentsCache", dataset=dataset, vae=vae, clip=clip,
                               cache_dir="cache_photos")
    assert "3 images without a caption file train on 'zkx'" in report
    lora, _, _, _ = run_node(comfy, "LoraTrainerTrain", model=model, encoded=encoded, **{**TRAIN, "steps": 2})
    assert lora.steps == 2
    with pytest.raises(Exception, match="(?s)Load LoRA Dataset.*missing caption"):
        run_node(comfy, "LoraTrainerLoadDataset", folder="photos", resolution=128, bucket_multiple=64, strict=True,
                 edit_pairs=False, random_crop=False, flip=False, caption_if_missing="")


def test_optimizer_loss_and_ema_through_the_node_and_into_the_file(comfy, sd15, demo_folder):
    """The recipe options as a user sets them on the node: they train, the report says them, the EMA is the LORA
    output (it differs from the run without it), and the saved file's kohya keys name them."""
    from safetensors import safe_open

    model, _, _ = sd15
    encoded, _ = _encoded(comfy, sd15, demo_folder)
    recipe = dict(TRAIN, steps=4, optimizer="adafactor", loss="huber", huber_schedule="constant", ema_start=0)
    plain, _, _, _ = run_node(comfy, "LoraTrainerTrain", model=model, encoded=encoded, **recipe, ema_decay=0.0)
    lora, _, report, _ = run_node(comfy, "LoraTrainerTrain", model=model, encoded=encoded, **recipe, ema_decay=0.5)
    assert "adafactor, huber loss, the EMA of the adapter (decay 0.5 from step 0)" in report
    layer = next(iter(lora.layers))
    assert (lora.layers[layer].up - plain.layers[layer].up).abs().max() > 0
    (path,) = run_node(comfy, "LoraTrainerSave", lora=lora, name="tests/recipe", format="auto", precision="fp32")
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_optimizer"].startswith("transformers.optimization.Adafactor(scale_parameter=False")
    assert (metadata["ss_loss_type"], metadata["ss_huber_schedule"]) == ("huber", "constant")


def test_masked_loss_through_the_nodes(comfy, sd15, demo_folder):
    """Masks in a masks/ folder: the dataset report counts them; on ComfyUI's own SD1.5, black masks (nothing
    counts) leave the adapter untouched while white ones train it."""
    import shutil

    from PIL import Image

    model, clip, vae = sd15
    trained = {}
    for fill in (0, 255):
        folder = comfy.base / "input" / f"masked{fill}"
        (folder / "masks").mkdir(parents=True, exist_ok=True)
        for image in sorted(demo_folder.glob("*.png"))[:2]:
            shutil.copy(image, folder / image.name)
            shutil.copy(image.with_suffix(".txt"), folder / f"{image.stem}.txt")
            Image.new("L", Image.open(image).size, fill).save(folder / "masks" / image.name)
        dataset, report = run_node(comfy, "LoraTrainerLoadDataset", folder=folder.name, resolution=128,
                                   bucket_multiple=64, strict=True, edit_pairs=False, random_crop=False, flip=True,
                                   masks=True)
        assert "2 images have a mask (0 from their alpha channel)" in report
        encoded, _ = run_node(comfy, "LoraTrainerEncodeLatentsCache", dataset=dataset, vae=vae, clip=clip,
                              cache_dir="cache_masks")
        lora, _, _, _ = run_node(comfy, "LoraTrainerTrain", model=model, encoded=encoded,
                                 **{**TRAIN, "steps": 2, "name": f"tests/masked{fill}"}, unmasked_weight=0.0,
                                 weight_decay=0.0)
        trained[fill] = max(layer.up.abs().max().item() for layer in lora.layers.values())
    assert trained[0] == 0 and trained[255] > 0


def test_regularisation_images_through_the_nodes_and_into_the_metadata(comfy, sd15, demo_folder):
    """A second Load LoRA Dataset of class images mixed in at 1:1: the report counts them, the LoRA trains, and
    the saved file counts training and class images apart."""
    import json
    import shutil

    from safetensors import safe_open

    model, clip, vae = sd15
    dogs = comfy.base / "input" / "class_dogs"
    dogs.mkdir(exist_ok=True)
    for image in sorted(demo_folder.glob("*.png"))[:3]:
        shutil.copy(image, dogs / f"dog_{image.name}")
        (dogs / f"dog_{image.stem}.txt").write_text("a pattern")
    load = dict(resolution=128, bucket_multiple=64, strict=True, edit_pairs=False, random_crop=False, flip=False)
    dataset, _ = run_node(comfy, "LoraTrainerLoadDataset", folder="rings", **load)
    class_images, _ = run_node(comfy, "LoraTrainerLoadDataset", folder="class_dogs", **load)
    mixed, report = run_node(comfy, "LoraTrainerRegularization", dataset=dataset, class_images=class_images,
                             share=0.5, loss_weight=0.5)
    assert report == "4 training images and 4 class images per epoch (3 of the 3 class images, at loss weight 0.5)"
    (mixed,) = run_node(comfy, "LoraTrainerCaptionDropout", dataset=mixed, dropout=0.0, trigger_word="zkx",
                        shuffle_tags=False, keep_tokens=1, shuffle_variants=1)
    encoded, _ = run_node(comfy, "LoraTrainerEncodeLatentsCache", dataset=mixed, vae=vae, clip=clip,
                          cache_dir="cache_reg")
    assert len(encoded.data) == 8
    lora, _, _, _ = run_node(comfy, "LoraTrainerTrain", model=model, encoded=encoded,
                             **{**TRAIN, "steps": 2, "name": "tests/reg"})
    (path,) = run_node(comfy, "LoraTrainerSave", lora=lora, name="tests/reg", format="auto", precision="fp32")
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    assert (metadata["ss_num_train_images"], metadata["ss_num_reg_images"]) == ("4", "4")
    assert "a pattern" not in json.loads(metadata["ss_tag_frequency"]).get("class_dogs", {})
    with pytest.raises(Exception, match="Regularisation Images: share must be a finite number"):
        run_node(comfy, "LoraTrainerRegularization", dataset=dataset, class_images=class_images, share=float("nan"),
                 loss_weight=1.0)
