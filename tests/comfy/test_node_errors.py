"""Bad input through the nodes: errors name the problem, and nothing lands outside ComfyUI's folders."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from tests.comfy.conftest import run_node

DATASET = dict(resolution=128, bucket_multiple=64, strict=True, edit_pairs=False, random_crop=False, flip=False)


def test_missing_folder(comfy):
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        run_node(comfy, "LoraTrainerLoadDataset", folder="no_such_folder", **DATASET)


def test_folder_without_images(comfy):
    empty = comfy.base / "input" / "empty_set"
    empty.mkdir(exist_ok=True)
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="No images found in .*empty_set"):
        run_node(comfy, "LoraTrainerLoadDataset", folder=str(empty), **DATASET)


def test_images_without_captions_train_unless_captions_are_insisted_on(comfy):
    folder = comfy.base / "input" / "uncaptioned"
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (128, 128), "red").save(folder / "lonely.png")
    Image.new("RGB", (128, 128), "blue").save(folder / "fine.png")
    (folder / "fine.txt").write_text("a blue square")
    insist = dict(DATASET, caption_if_missing="")
    with pytest.raises(ValueError, match=r"lonely\.png.*caption"):
        run_node(comfy, "LoraTrainerLoadDataset", folder=str(folder), **insist)
    dataset, report = run_node(comfy, "LoraTrainerLoadDataset", folder=str(folder), **{**insist, "strict": False})
    assert [s.image.name for s in dataset.samples] == ["fine.png"] and "lonely.png" in report
    dataset, report = run_node(comfy, "LoraTrainerLoadDataset", folder=str(folder), **DATASET)
    assert sorted(s.image.name for s in dataset.samples) == ["fine.png", "lonely.png"]
    assert "1 images have no caption file" in report, report


def test_unwritable_cache_dir(comfy, sd15, demo_folder):
    _, clip, vae = sd15
    dataset, _ = run_node(comfy, "LoraTrainerLoadDataset", folder=str(demo_folder), **DATASET)
    blocker = comfy.base / "output" / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="a_file/cache.*not writable"):
        run_node(comfy, "LoraTrainerEncodeLatentsCache", dataset=dataset, vae=vae, clip=clip,
                 cache_dir=str(blocker / "cache"))


@pytest.fixture(scope="module")
def tiny_lora(comfy, sd15, demo_folder):
    model, clip, vae = sd15
    dataset, _ = run_node(comfy, "LoraTrainerLoadDataset", folder=str(demo_folder), **DATASET)
    encoded, _ = run_node(comfy, "LoraTrainerEncodeLatentsCache", dataset=dataset, vae=vae, clip=clip,
                          cache_dir="cache")
    lora, _, _, _ = run_node(comfy, "LoraTrainerTrain", model=model, encoded=encoded, steps=1, learning_rate=1e-3,
                          rank=2, alpha=0.0, targets="attention", objective="auto", batch_size=1, seed=0,
                          name="tests/one_step")
    return lora


@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "/tmp/escape_abs", "..", "  ", "bad|name"])
def test_save_names_cannot_leave_the_loras_folder(comfy, tiny_lora, name):
    before = _files_outside(comfy)
    with pytest.raises(ValueError, match="Save LoRA: name"):
        run_node(comfy, "LoraTrainerSave", lora=tiny_lora, name=name, format="auto", precision="fp32")
    assert _files_outside(comfy) == before
    assert not os.path.exists("/tmp/escape_abs.safetensors")


def test_subfolders_are_fine(comfy, tiny_lora):
    (path,) = run_node(comfy, "LoraTrainerSave", lora=tiny_lora, name="team/run 1/v2", format="comfy",
                       precision="fp16")
    assert path == str(comfy.base / "loras" / "team" / "run 1" / "v2.safetensors") and os.path.isfile(path)


def test_train_with_a_bad_name_fails_before_training(comfy, sd15, tiny_lora):
    model, _, _ = sd15
    with pytest.raises(ValueError, match="Train LoRA: name '../x'"):
        run_node(comfy, "LoraTrainerTrain", model=model, encoded=None, steps=1, learning_rate=1e-3, rank=2,
                 alpha=0.0, targets="attention", objective="auto", batch_size=1, seed=0, name="../x")


def _files_outside(comfy):
    return sorted(p for p in comfy.base.parent.rglob("*escape*"))


def test_nan_is_refused_by_name(comfy, sd15, tiny_lora):
    model, _, _ = sd15
    with pytest.raises(ValueError, match="Apply LoRA: strength must be a finite number, got nan"):
        run_node(comfy, "LoraTrainerApply", model=model, lora=tiny_lora, strength=float("nan"))


def test_engine_errors_reach_users_as_plain_types_naming_the_node(comfy):
    folder = comfy.base / "input" / "only_captions"
    folder.mkdir(exist_ok=True)
    (folder / "a.txt").write_text("a caption without its image")
    with pytest.raises(ValueError, match="^Load LoRA Dataset: No images found") as caught:
        run_node(comfy, "LoraTrainerLoadDataset", folder=str(folder), **DATASET)
    assert type(caught.value) is ValueError  # not the engine's DatasetError, shown with its install path


def test_a_cache_changed_after_encoding_is_found_before_training(comfy, sd15, demo_folder):
    model, clip, vae = sd15
    dataset, _ = run_node(comfy, "LoraTrainerLoadDataset", folder=str(demo_folder), **DATASET)
    encoded, _ = run_node(comfy, "LoraTrainerEncodeLatentsCache", dataset=dataset, vae=vae, clip=clip,
                          cache_dir="cache_changed")
    node = comfy.NODE_CLASS_MAPPINGS["LoraTrainerEncodeLatentsCache"]
    intact = node.fingerprint_inputs(cache_dir="cache_changed")
    encoded.data.samples[0].latent.unlink()
    with pytest.raises(RuntimeError, match="Train LoRA: 1 files of the latent cache .* were changed or removed .*"
                                           "queue the prompt again"):
        run_node(comfy, "LoraTrainerTrain", model=model, encoded=encoded, steps=1, learning_rate=1e-3, rank=2,
                 alpha=0.0, targets="attention", objective="auto", batch_size=1, seed=0, name="tests/changed")
    # ComfyUI asks Encode Latents Cache whether its result still holds: not any more, so it runs again; asked
    # again before that run, the answer stays (no endless re-runs)
    changed = node.fingerprint_inputs(cache_dir="cache_changed")
    assert changed != intact and node.fingerprint_inputs(cache_dir="cache_changed") == changed
