"""Aspect buckets: sizes, nearest bucket, resize + crop, tensors, and the per-epoch batch plan."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch
from PIL import Image

from training.buckets import image_to_tensor, make_buckets, nearest_bucket, plan_batches, resize_and_crop

# make_buckets ------------------------------------------------------------------------------------


def test_buckets_for_512():
    assert make_buckets(512 * 512) == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]


@pytest.mark.parametrize("area,multiple,max_aspect", [(1024 * 1024, 64, 2.0), (1024 * 1024, 16, 2.0),
                                                      (768 * 768, 32, 3.0), (1000 * 1000, 64, 1.5)])
def test_bucket_properties(area, multiple, max_aspect):
    buckets = make_buckets(area, multiple, max_aspect)
    side = math.isqrt(area) // multiple * multiple
    assert (side, side) in buckets
    assert buckets == sorted(set(buckets))
    assert set(buckets) == {(h, w) for w, h in buckets}  # symmetric
    for w, h in buckets:
        assert w % multiple == 0 and h % multiple == 0
        assert w * h <= area
        assert 1 / max_aspect - 1e-9 <= w / h <= max_aspect + 1e-9
        assert w * h > area - multiple * (w + h + multiple)  # as close as the grid allows


def test_max_aspect_one_gives_only_the_square():
    assert make_buckets(1024 * 1024, 16, 1.0) == [(1024, 1024)]


@pytest.mark.parametrize("kwargs,name", [
    ({"area": 0}, "area"), ({"area": 32 * 32}, "area"), ({"area": 512.0 * 512}, "area"),
    ({"area": 512 * 512, "multiple": 0}, "multiple"), ({"area": 512 * 512, "max_aspect": 0.5}, "max_aspect"),
])
def test_bad_bucket_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} must be"):
        make_buckets(**kwargs)


# nearest_bucket ----------------------------------------------------------------------------------


def test_nearest_bucket_by_aspect():
    buckets = make_buckets(512 * 512)
    assert nearest_bucket(3000, 3000, buckets) == (512, 512)
    assert nearest_bucket(100, 100, buckets) == (512, 512)
    assert nearest_bucket(1600, 900, buckets) == (640, 384)
    assert nearest_bucket(900, 1600, buckets) == (384, 640)
    assert nearest_bucket(10000, 100, buckets) == (640, 384)  # beyond max_aspect: the widest
    assert nearest_bucket(1200, 1000, buckets) == (576, 448)


def test_nearest_bucket_uses_log_ratio_distance():
    # 1.45 is nearer 1.0 than 2.0 on a linear scale but nearer 2.0 in log space (0.32 vs 0.37)
    assert nearest_bucket(145, 100, [(100, 100), (200, 100)]) == (200, 100)
    assert nearest_bucket(140, 100, [(100, 100), (200, 100)]) == (100, 100)
    # tall and wide mirror each other exactly
    assert nearest_bucket(100, 145, [(100, 100), (100, 200)]) == (100, 200)


def test_nearest_bucket_rejects_bad_input():
    with pytest.raises(ValueError, match="0x10"):
        nearest_bucket(0, 10, [(64, 64)])
    with pytest.raises(ValueError, match="buckets is empty"):
        nearest_bucket(10, 10, [])


# resize_and_crop ---------------------------------------------------------------------------------


def striped(width: int, height: int) -> Image.Image:
    """Left third red, middle green, right third blue."""
    image = Image.new("RGB", (width, height), (255, 0, 0))
    image.paste((0, 255, 0), (width // 3, 0, 2 * width // 3, height))
    image.paste((0, 0, 255), (2 * width // 3, 0, width, height))
    return image


def test_centre_crop_of_a_wide_image():
    out, (top, left) = resize_and_crop(striped(300, 100), (64, 64))
    assert out.size == (64, 64)
    assert (top, left) == (0, 64)  # scaled to 192x64, centre window starts at x=64
    assert out.getpixel((32, 32)) == (0, 255, 0)


def test_centre_crop_of_a_tall_image():
    out, (top, left) = resize_and_crop(Image.new("RGB", (100, 400)), (128, 256))
    assert out.size == (128, 256)
    assert (top, left) == (128, 0)  # scaled to 128x512


def test_upscales_to_cover_the_bucket():
    out, crop = resize_and_crop(Image.new("RGB", (32, 16), (9, 9, 9)), (128, 64))
    assert out.size == (128, 64) and crop == (0, 0)
    assert out.getpixel((64, 32)) == (9, 9, 9)


def test_exact_size_is_untouched():
    image = striped(96, 64)
    out, crop = resize_and_crop(image, (96, 64))
    assert crop == (0, 0)
    assert out.tobytes() == image.tobytes()


def test_random_crop_is_reproducible_and_in_range():
    image = striped(300, 100)
    crops = [resize_and_crop(image, (64, 64), random_crop=True, rng=random.Random(s))[1] for s in range(20)]
    again = [resize_and_crop(image, (64, 64), random_crop=True, rng=random.Random(s))[1] for s in range(20)]
    assert crops == again
    assert all(top == 0 and 0 <= left <= 128 for top, left in crops)
    assert len(set(crops)) > 5


def test_random_crop_needs_rng():
    with pytest.raises(ValueError, match="random_crop=True needs rng"):
        resize_and_crop(striped(300, 100), (64, 64), random_crop=True)


def test_bad_size():
    with pytest.raises(ValueError, match="size must be a positive"):
        resize_and_crop(striped(30, 30), (0, 64))


# image_to_tensor ---------------------------------------------------------------------------------


def test_image_to_tensor_range_and_layout():
    image = Image.new("RGB", (3, 2), (255, 255, 255))
    image.putpixel((0, 0), (255, 0, 0))
    image.putpixel((2, 1), (0, 0, 0))
    tensor = image_to_tensor(image)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 2, 3)
    assert tensor[:, 0, 0].tolist() == [1.0, -1.0, -1.0]
    assert tensor[:, 1, 2].tolist() == [-1.0, -1.0, -1.0]
    assert tensor[:, 0, 1].tolist() == [1.0, 1.0, 1.0]
    assert tensor.min() >= -1 and tensor.max() <= 1


def test_image_to_tensor_needs_rgb():
    with pytest.raises(ValueError, match="mode 'RGBA'.*load_image"):
        image_to_tensor(Image.new("RGBA", (2, 2)))


# plan_batches ------------------------------------------------------------------------------------


BUCKETS_OF = [(512, 512)] * 7 + [(640, 384)] * 4 + [(384, 640)] * 1


def test_plan_covers_every_index_once_with_one_bucket_per_batch():
    plan = plan_batches(BUCKETS_OF, batch_size=3, seed=0, epoch=0)
    flat = [i for batch in plan for i in batch]
    assert sorted(flat) == list(range(len(BUCKETS_OF)))
    assert all(len({BUCKETS_OF[i] for i in batch}) == 1 for batch in plan)
    sizes = Counter((BUCKETS_OF[batch[0]], len(batch)) for batch in plan)
    assert sizes == {((512, 512), 3): 2, ((512, 512), 1): 1, ((640, 384), 3): 1, ((640, 384), 1): 1,
                     ((384, 640), 1): 1}


def test_plan_is_deterministic_per_seed_and_epoch():
    plan = plan_batches(BUCKETS_OF, 2, seed=7, epoch=3)
    assert plan == plan_batches(BUCKETS_OF, 2, seed=7, epoch=3)
    assert plan != plan_batches(BUCKETS_OF, 2, seed=7, epoch=4)
    assert plan != plan_batches(BUCKETS_OF, 2, seed=8, epoch=3)


def test_plan_does_not_touch_the_global_rng():
    random.seed(123)
    state = random.getstate()
    plan_batches(BUCKETS_OF, 2, seed=1, epoch=0)
    assert random.getstate() == state


def test_plan_shuffles_within_and_across_buckets():
    plans = {tuple(map(tuple, plan_batches([(64, 64)] * 8, 1, seed=0, epoch=e))) for e in range(10)}
    assert len(plans) > 5


@pytest.mark.parametrize("args,match", [
    (([(64, 64)], 0, 0, 0), "batch_size must be >= 1"),
    (([(64, 64)], 1, 0, -1), "epoch must be >= 0"),
    (([], 1, 0, 0), "buckets_of is empty"),
])
def test_plan_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        plan_batches(*args)
