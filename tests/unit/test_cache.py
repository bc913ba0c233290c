"""The encoder cache: encode once, reuse, re-encode only what changed, never trust a damaged entry."""

import random

import pytest
import torch
from PIL import Image

from tests.unit.toy import ToyEncoders
from training.cache import CacheSettings, encode_dataset
from training.captions import CaptionPolicy
from training.dataset import scan_folder


def _dataset(folder, captions=("red square", "blue sky, clouds, sun", "green"), sizes=((96, 96),) * 3):
    folder.mkdir(parents=True, exist_ok=True)
    for i, (caption, size) in enumerate(zip(captions, sizes)):
        Image.new("RGB", size, (40 * i, 200 - 40 * i, 90)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption)
    return scan_folder(folder).samples


SETTINGS = CacheSettings(resolution=64, bucket_multiple=16)


def test_second_run_reuses_everything_and_a_changed_image_alone_is_encoded_again(tmp_path):
    samples = _dataset(tmp_path / "data")
    first = ToyEncoders()
    data = encode_dataset(samples, first, tmp_path / "cache", SETTINGS)
    assert (first.image_calls, first.text_calls) == (3, 4)  # 3 captions + the empty one
    again = ToyEncoders()
    encode_dataset(samples, again, tmp_path / "cache", SETTINGS)
    assert (again.image_calls, again.text_calls) == (0, 0)
    Image.new("RGB", (96, 96), (1, 2, 3)).save(tmp_path / "data" / "img1.png")
    changed = ToyEncoders()
    encode_dataset(samples, changed, tmp_path / "cache", SETTINGS)
    assert (changed.image_calls, changed.text_calls) == (1, 0)
    assert len(data) == 3 and data.sizes == [(8, 8)] * 3


def test_another_encoder_identity_encodes_again(tmp_path):
    samples = _dataset(tmp_path / "data")
    encode_dataset(samples, ToyEncoders("vae-a"), tmp_path / "cache", SETTINGS)
    other = ToyEncoders("vae-b")
    encode_dataset(samples, other, tmp_path / "cache", SETTINGS)
    assert (other.image_calls, other.text_calls) == (3, 4)


@pytest.mark.parametrize("damage", ["truncate", "flip_byte"])
def test_a_damaged_entry_is_detected_and_rebuilt(tmp_path, damage):
    samples = _dataset(tmp_path / "data")
    encode_dataset(samples, ToyEncoders(), tmp_path / "cache", SETTINGS)
    entry = sorted((tmp_path / "cache" / "latents").rglob("*.safetensors"))[0]
    raw = bytearray(entry.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw[-3] ^= 0xFF  # inside the tensor payload: the header still parses
    entry.write_bytes(bytes(raw))
    encoders = ToyEncoders()
    data = encode_dataset(samples, encoders, tmp_path / "cache", SETTINGS)
    assert encoders.image_calls == 1 and data.stats.rebuilt_corrupt == 1
    again = ToyEncoders()
    encode_dataset(samples, again, tmp_path / "cache", SETTINGS)
    assert again.image_calls == 0


def test_batches_pad_text_with_masks_and_use_the_empty_caption_for_dropout(tmp_path):
    samples = _dataset(tmp_path / "data")
    encoders = ToyEncoders()
    data = encode_dataset(samples, encoders, tmp_path / "cache", SETTINGS, CaptionPolicy(dropout=0.5))
    batch = data.collate([0, 1, 2], random.Random(3))
    assert batch.latents.shape == (3, 4, 8, 8)
    lengths = batch.cond["mask"].sum(dim=1).tolist()
    assert batch.cond["context"].shape[1] == max(lengths)
    for row, n in enumerate(lengths):
        assert torch.all(batch.cond["context"][row, int(n):] == 0)
    empty = encoders.encode_text("")["context"]
    dropped = 0
    for seed in range(40):
        cond = data.collate([1], random.Random(seed)).cond
        length = int(cond["mask"][0].sum()) if "mask" in cond else cond["context"].shape[1]
        if length == 1 and torch.equal(cond["context"][0, :1], empty):
            dropped += 1
    assert 8 < dropped < 32  # about half


def test_shuffled_caption_variants_are_cached_and_picked_per_step(tmp_path):
    samples = _dataset(tmp_path / "data")
    policy = CaptionPolicy(trigger="zkx", shuffle=True)
    encoders = ToyEncoders()
    data = encode_dataset(samples, encoders, tmp_path / "cache",
                          CacheSettings(resolution=64, bucket_multiple=16, caption_variants=4), policy)
    assert len(data.samples[1].texts) == 4  # "blue sky, clouds, sun" has 3! = 6 orders
    seen = {tuple(data.collate([1], random.Random(s)).cond["context"][0, :, 0].tolist()) for s in range(30)}
    assert len(seen) > 1


def test_flip_caches_both_orientations_and_repeats_expand(tmp_path):
    folder = tmp_path / "data" / "3_thing"
    _dataset(folder, captions=("a",), sizes=((64, 128),))
    gradient = Image.linear_gradient("L").rotate(90, expand=True).resize((64, 128)).convert("RGB")
    gradient.save(folder / "img0.png")
    samples = scan_folder(tmp_path / "data").samples
    encoders = ToyEncoders()
    data = encode_dataset(samples, encoders, tmp_path / "cache",
                          CacheSettings(resolution=64, bucket_multiple=16, flip=True))
    assert encoders.image_calls == 2 and len(data) == 3
    assert data.sizes[0][0] > data.sizes[0][1]  # a tall image gets a tall bucket
    picks = {tuple(data.collate([0], random.Random(s)).latents[0, 0, 0].tolist()) for s in range(20)}
    assert len(picks) == 2


def test_edit_pairs_carry_the_control_latent(tmp_path):
    folder = tmp_path / "data"
    _dataset(folder, captions=("make it blue",), sizes=((64, 64),))
    (folder / "control").mkdir()
    Image.new("RGB", (64, 64), (0, 0, 255)).save(folder / "control" / "img0.png")
    samples = scan_folder(folder, edit_pairs=True).samples
    data = encode_dataset(samples, ToyEncoders(), tmp_path / "cache", SETTINGS)
    batch = data.collate([0], random.Random(0))
    assert batch.cond["control"].shape == batch.latents.shape
    assert not torch.equal(batch.cond["control"], batch.latents)
    # the text encoder saw the control image (Qwen-Image-Edit style), also for the dropout caption
    assert batch.cond["context"].shape[1] == len("make it blue".split()) + 1
    dropping = encode_dataset(samples, ToyEncoders(), tmp_path / "cache", SETTINGS, CaptionPolicy(dropout=0.5))
    lengths = {dropping.collate([0], random.Random(seed)).cond["context"].shape[1] for seed in range(20)}
    assert lengths == {4, 2}  # the caption + image, or the empty caption's token + the image

    Image.new("RGB", (64, 64), (255, 0, 0)).save(folder / "control" / "img0.png")  # another control image
    encoders = ToyEncoders()
    again = encode_dataset(samples, encoders, tmp_path / "cache", SETTINGS)
    assert encoders.text_calls == 2  # its caption and its empty caption are encoded again, with the new image
    assert not torch.equal(again.collate([0], random.Random(0)).cond["context"], batch.cond["context"])


def test_an_unwritable_cache_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match=str(blocker / "cache")):
        encode_dataset(_dataset(tmp_path / "data"), ToyEncoders(), blocker / "cache", SETTINGS)


def test_changed_files_names_what_changed_on_disk_since_encoding(tmp_path):
    data = encode_dataset(_dataset(tmp_path / "data"), ToyEncoders(), tmp_path / "cache", SETTINGS)
    assert data.changed_files() == []
    latent, text = data.samples[0].latent, data.samples[1].texts[0]
    latent.write_bytes(latent.read_bytes()[:50])
    text.unlink()
    assert sorted(data.changed_files()) == sorted([latent, text])


def test_killed_writes_are_swept_when_the_cache_is_opened(tmp_path):
    encode_dataset(_dataset(tmp_path / "data"), ToyEncoders(), tmp_path / "cache", SETTINGS)
    entry = next((tmp_path / "cache" / "latents").rglob("*.safetensors"))
    left = entry.with_name(f".{entry.name}.0123abcd.tmp")
    left.write_bytes(b"half a file")
    unrelated = entry.with_name("notes.tmp")
    unrelated.write_text("not ours")
    encode_dataset(_dataset(tmp_path / "data"), ToyEncoders(), tmp_path / "cache", SETTINGS)
    assert not left.exists() and unrelated.exists()
