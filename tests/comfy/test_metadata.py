"""The metadata of a LoRA file the nodes write, read back the way A1111 / Forge read it: every key they, Civitai and
kohya show, in their formats, and hashes equal to the ones those tools compute from the file's bytes."""

from __future__ import annotations

import hashlib
import json
import time

import safetensors.torch
from PIL import Image
from safetensors import safe_open

from tests.comfy.conftest import run_node
from tests.conftest import TINY_CKPT_NAME

TRAIN = dict(steps=4, learning_rate=2e-3, rank=16, alpha=0.0, targets="attention", objective="auto", batch_size=1,
             seed=7, name="tests/metadata")
# The keys issue 16 asks for, beyond the ones every file had before.
KEYS = ("ss_sd_model_name", "ss_clip_skip", "ss_num_train_images", "ss_bucket_info", "ss_dataset_dirs",
        "ss_training_started_at", "ss_training_finished_at", "ss_learning_rate", "ss_unet_lr", "ss_optimizer",
        "ss_seed", "ss_lr_scheduler", "ss_lr_warmup_steps", "ss_gradient_accumulation_steps", "ss_max_train_steps",
        "ss_batch_size_per_device", "ss_total_batch_size", "ss_min_snr_gamma", "ss_noise_offset", "ss_max_grad_norm",
        "ss_mixed_precision", "ss_network_dropout", "ss_caption_dropout_rate", "ss_shuffle_caption", "ss_keep_tokens",
        "ss_flip_aug", "ss_random_crop", "ss_num_epochs", "ss_epoch", "ss_session_id", "ss_training_comment",
        "modelspec.prediction_type", "modelspec.trigger_phrase", "lora_trainer.config", "lora_trainer.run",
        "ss_tag_frequency", "ss_output_name", "ss_base_model_version", "ss_network_dim", "ss_network_alpha",
        "sshs_model_hash", "sshs_legacy_hash")
INTEGERS = ("ss_num_train_images", "ss_seed", "ss_lr_warmup_steps", "ss_gradient_accumulation_steps",
            "ss_max_train_steps", "ss_batch_size_per_device", "ss_total_batch_size", "ss_keep_tokens", "ss_num_epochs",
            "ss_epoch", "ss_session_id", "ss_steps", "ss_network_dim")
FLOATS = ("ss_training_started_at", "ss_training_finished_at", "ss_learning_rate", "ss_unet_lr", "ss_min_snr_gamma",
          "ss_noise_offset", "ss_max_grad_norm", "ss_network_dropout", "ss_caption_dropout_rate", "ss_network_alpha")


def _dataset(comfy, demo_folder):
    """2 square images in the folder itself and, in a kohya "2_zkx" folder, a square and a 3:2 one (repeated twice)."""
    folder = comfy.base / "input" / "meta_set"
    kohya = folder / "2_zkx"
    kohya.mkdir(parents=True, exist_ok=True)
    images = sorted(demo_folder.glob("*.png"))
    for image, target in zip(images[:3], (folder / "a.png", folder / "b.png", kohya / "c.png")):
        Image.open(image).resize((192, 192)).save(target)
        target.with_suffix(".txt").write_text("zkx pattern, rings")
    Image.open(images[3]).resize((288, 192)).save(kohya / "wide.png")
    (kohya / "wide.txt").write_text("zkx pattern, wide rings")
    return folder


def _a1111_metadata(data: bytes) -> dict:
    """sd_models.read_metadata_from_safetensors (A1111 / Forge): the header's __metadata__, values that start
    with '{' parsed as JSON."""
    length = int.from_bytes(data[:8], "little")
    assert data[8:10] in (b'{"', b"{'"), "A1111 refuses a header that does not start like this"
    metadata = {}
    for key, value in json.loads(data[8:8 + length]).get("__metadata__", {}).items():
        metadata[key] = json.loads(value) if isinstance(value, str) and value[:1] == "{" else value
    return metadata


def test_a_saved_lora_holds_the_metadata_a1111_civitai_and_kohya_show(comfy, pack, sd15, demo_folder):
    model, clip, vae = sd15
    _dataset(comfy, demo_folder)
    dataset, _ = run_node(comfy, "LoraTrainerLoadDataset", folder="meta_set", resolution=192, bucket_multiple=64,
                          strict=True, edit_pairs=False, random_crop=False, flip=False)
    (dataset,) = run_node(comfy, "LoraTrainerCaptionDropout", dataset=dataset, dropout=0.1, trigger_word="zkx",
                          shuffle_tags=True, keep_tokens=1, shuffle_variants=2)
    encoded, _ = run_node(comfy, "LoraTrainerEncodeLatentsCache", dataset=dataset, vae=vae, clip=clip,
                          cache_dir="cache_metadata")
    before = time.time()
    lora, _, _, _ = run_node(comfy, "LoraTrainerTrain", model=model, encoded=encoded, **TRAIN)
    (path,) = run_node(comfy, "LoraTrainerSave", lora=lora, name="tests/metadata", format="auto", precision="fp32")
    data = open(path, "rb").read()
    metadata = _a1111_metadata(data)

    assert [key for key in KEYS if key not in metadata] == []
    for key in INTEGERS:
        int(metadata[key])
    for key in FLOATS:
        float(metadata[key])
    assert metadata["ss_clip_skip"] == "None"  # ComfyUI's CLIP does not say; kohya's "not set"
    # the checkpoint's file where the host records it (0.33's loaders), else the model family
    recorded = hasattr(model, "cached_patcher_init")
    assert metadata["ss_sd_model_name"] == (TINY_CKPT_NAME if recorded else lora.family.name)
    assert pack.glue.bridge.checkpoint_name(model.clone()) == (TINY_CKPT_NAME if recorded else "")

    # the dataset as kohya describes it: folders, images with repeats, buckets (A1111's "Dataset size",
    # "Resolutions")
    assert metadata["ss_dataset_dirs"] == {"meta_set": {"n_repeats": 1, "img_count": 2},
                                           "2_zkx": {"n_repeats": 2, "img_count": 2}}
    assert sum(int(d["img_count"]) for d in metadata["ss_dataset_dirs"].values()) == 4
    assert metadata["ss_num_train_images"] == "6"
    buckets = metadata["ss_bucket_info"]["buckets"]
    assert sorted(buckets) == [str(i) for i in range(len(buckets))]
    assert sum(int(b["count"]) for b in buckets.values()) == 6
    assert {tuple(b["resolution"]): b["count"] for b in buckets.values()} == {(192, 192): 4, (256, 128): 2}
    error = metadata["ss_bucket_info"]["mean_img_ar_error"]
    assert abs(error - (2 - 1.5) / 4) < 1e-9  # one image of four, 3:2, trains in the 2:1 bucket
    assert metadata["ss_tag_frequency"]["2_zkx"]["zkx pattern"] == 2

    # the settings, as kohya writes its own
    assert metadata["ss_learning_rate"] == metadata["ss_unet_lr"] == "0.002"
    assert metadata["ss_seed"] == "7" and metadata["ss_steps"] == metadata["ss_max_train_steps"] == "4"
    assert metadata["ss_network_dim"] == "16" and metadata["ss_network_alpha"] == "16.0"
    assert metadata["ss_optimizer"].startswith("torch.optim.adamw.AdamW(")
    assert metadata["ss_lr_scheduler"] == "constant" and metadata["ss_mixed_precision"] in ("no", "fp16", "bf16")
    assert metadata["ss_total_batch_size"] == "1" and metadata["ss_num_epochs"] == metadata["ss_epoch"] == "1"
    assert (metadata["ss_caption_dropout_rate"], metadata["ss_shuffle_caption"], metadata["ss_keep_tokens"]) == \
        ("0.1", "True", "2")
    assert (metadata["ss_flip_aug"], metadata["ss_random_crop"]) == ("False", "False")
    assert metadata["modelspec.prediction_type"] == "epsilon"
    assert metadata["modelspec.trigger_phrase"] == "zkx" and metadata["ss_training_comment"] == "trigger: zkx"
    started, finished = float(metadata["ss_training_started_at"]), float(metadata["ss_training_finished_at"])
    assert before <= started <= finished <= time.time()
    assert metadata["lora_trainer.config"]["learning_rate"] == 2e-3
    assert metadata["lora_trainer.run"]["dataset"] == "meta_set"  # relative to the input folder: no home path
    assert metadata["lora_trainer.run"]["caption"] == {"trigger": "zkx", "dropout": 0.1, "shuffle": True,
                                                       "keep_tokens": 1, "variants": 2}

    # A1111's hash of a LoRA (addnet_hash_safetensors): SHA-256 of the bytes after the length and the header
    header_end = 8 + int.from_bytes(data[:8], "little")
    assert metadata["sshs_model_hash"] == hashlib.sha256(data[header_end:]).hexdigest()
    # kohya's legacy hash (addnet_hash_legacy): 64 KiB at 1 MiB of the file written with the ss_* keys only
    with safe_open(path, framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        stored = handle.metadata()
    training_only = safetensors.torch.save(tensors, {k: v for k, v in stored.items() if k.startswith("ss_")})
    assert len(training_only) > 0x110000  # rank 16 makes the file large enough for the bytes it hashes
    assert metadata["sshs_legacy_hash"] == hashlib.sha256(training_only[0x100000:0x110000]).hexdigest()[:8]
