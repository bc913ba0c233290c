"""Aspect-ratio buckets: sizes near one pixel area, the nearest bucket for an image, the crop into
it, and one epoch's batch plan where every batch holds a single bucket."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

_ASPECT_TOLERANCE = 1e-9


def make_buckets(area: int, multiple: int = 64, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) sizes, both multiples of ``multiple``: for each width the largest height with
    width * height <= area, aspect within [1/max_aspect, max_aspect], plus the square and every
    bucket turned sideways. Sorted, no duplicates."""
    if not isinstance(multiple, int) or multiple <= 0:
        raise ValueError(f"multiple must be a positive int (e.g. 64, or 16 for FLUX), got {multiple!r}")
    if not isinstance(area, int) or area < multiple * multiple:
        raise ValueError(f"area must be an int of at least multiple**2 = {multiple * multiple} pixels "
                         f"(e.g. 1024 * 1024), got {area!r}")
    if not max_aspect >= 1.0:
        raise ValueError(f"max_aspect must be >= 1.0 (2.0 allows 2:1 and 1:2), got {max_aspect!r}")
    side = math.isqrt(area) // multiple * multiple
    buckets = {(side, side)}
    widest = math.isqrt(int(area * max_aspect)) + multiple
    for width in range(multiple, widest + 1, multiple):
        height = area // width // multiple * multiple
        if height >= multiple and 1 / max_aspect - _ASPECT_TOLERANCE <= width / height <= max_aspect + _ASPECT_TOLERANCE:
            buckets |= {(width, height), (height, width)}  # both orientations, so the set is symmetric
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width/height in log space (ties: the larger area)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"Image size must be positive, got {width}x{height}")
    if not buckets:
        raise ValueError("buckets is empty; build them with make_buckets(area)")
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1], b))


def resize_and_crop(image: Image.Image, size: tuple[int, int], *, random_crop: bool = False,
                    rng: random.Random | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Scale (LANCZOS) so the image covers ``size`` = (width, height), then crop the centre (or a
    random window from ``rng``). Returns the crop and its (top, left) in the scaled image, which SDXL
    takes as crop conditioning."""
    target_w, target_h = size
    if target_w <= 0 or target_h <= 0:
        raise ValueError(f"size must be a positive (width, height), got {size}")
    scale = max(target_w / image.width, target_h / image.height)
    scaled_w = max(target_w, round(image.width * scale))
    scaled_h = max(target_h, round(image.height * scale))
    if (scaled_w, scaled_h) != image.size:
        image = image.resize((scaled_w, scaled_h), Image.Resampling.LANCZOS)
    if not random_crop:
        top, left = (scaled_h - target_h) // 2, (scaled_w - target_w) // 2
    elif rng is None:
        raise ValueError("random_crop=True needs rng (a random.Random) so crops are reproducible")
    else:
        top, left = rng.randint(0, scaled_h - target_h), rng.randint(0, scaled_w - target_w)
    return image.crop((left, top, left + target_w, top + target_h)), (top, left)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> float32 [3, H, W] in [-1, 1] (the range VAEs expect)."""
    if image.mode != "RGB":
        raise ValueError(f"Expected an RGB image, got mode {image.mode!r}; load it with dataset.load_image")
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    return pixels.float() / 127.5 - 1.0


def plan_batches(buckets_of: Sequence[tuple[int, int]], batch_size: int, seed: int,
                 epoch: int) -> list[list[int]]:
    """One epoch's batches of sample indices; ``buckets_of[i]`` is sample i's bucket. Each batch holds
    one bucket; each index appears once (a bucket's last batch may be short). The order depends only
    on (seed, epoch), through a local RNG, so a resumed run replays the same plan."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if not buckets_of:
        raise ValueError("No samples to batch: buckets_of is empty")
    rng = random.Random(f"plan_batches:{seed}:{epoch}")  # str seeds hash with sha512: stable across runs
    groups: dict[tuple[int, int], list[int]] = {}
    for index, bucket in enumerate(buckets_of):
        groups.setdefault(tuple(bucket), []).append(index)
    batches: list[list[int]] = []
    for bucket in sorted(groups):
        indices = groups[bucket]
        rng.shuffle(indices)
        batches += [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    rng.shuffle(batches)
    return batches
