"""Latent and text-embedding cache on disk, and the dataset the loop reads from it.

Every entry is one safetensors file named by a hash of what it was made from: the image bytes, the
transform (bucket, crop, flip) and the encoder's identity for latents; the caption and the encoder's
identity for text. A later run finds the same name and skips the encoder; a changed image, caption
or encoder gives a new name, so only what changed is encoded again. Each file carries the hash of
its tensors in its metadata: a damaged entry is detected when the dataset is built and re-encoded.

Caption policy: a few rendered variants per caption (trigger word, tag shuffle) are encoded, plus the
empty caption; at training time each sample picks a variant, or the empty caption with the dropout
probability. So dropout and shuffle keep working with cached embeddings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .batching import Batch, stack_conditioning
from .buckets import image_to_tensor, make_buckets, nearest_bucket, resize_and_crop
from .captions import CaptionPolicy
from .dataset import Sample, load_image, load_mask
from .files import atomic_path, changed, file_state, remove_temp_files, temp_name

log = logging.getLogger(__name__)
CACHE_VERSION = "1"


class Encoders(Protocol):
    """The VAE and text encoder(s) of one model, as the cache needs them."""

    identity: str  # changes whenever the encoders would give other outputs (model hash, dtype, ...)
    latent_multiple: int  # pixel sides must be multiples of this (VAE factor × patch size)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """[1, 3, H, W] in [-1, 1] -> latents [C, h, w], already scaled the way the denoiser expects."""

    def encode_text(self, caption: str, image: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One caption -> unbatched conditioning: ``context`` [L, D], optional ``mask`` [L], ``pooled`` [D].
        ``image`` ([1, 3, H, W] in [-1, 1]): an edit pair's control image, for text encoders that see it
        (Qwen-Image-Edit's vision-language encoder); others ignore it."""


@dataclass(frozen=True)
class CacheSettings:
    resolution: int = 512  # bucket area = resolution²
    bucket_multiple: int = 64
    random_crop: bool = False  # fixed per sample (seeded) once cached
    flip: bool = False  # both orientations are cached; one is picked per step
    caption_variants: int = 1  # rendered captions cached per sample (more with tag shuffle)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.resolution < 64:
            raise ValueError(f"resolution must be >= 64 pixels, got {self.resolution}")
        if self.bucket_multiple < 1 or self.bucket_multiple > self.resolution:
            raise ValueError(f"bucket_multiple must be between 1 and resolution ({self.resolution}), got "
                             f"{self.bucket_multiple}; lower bucket_multiple or raise resolution")
        if self.caption_variants < 1:
            raise ValueError(f"caption_variants must be >= 1, got {self.caption_variants}")


@dataclass(frozen=True)
class EncodedSample:
    latent: Path
    flipped: Path | None
    control: Path | None
    texts: tuple[Path, ...]
    size: tuple[int, int]  # latent (h, w)
    empty: Path | None = None  # edit pairs: the empty caption encoded with this control image
    mask: Path | None = None  # masked loss: the mask at latent resolution, and mirrored with the flipped latent
    mask_flipped: Path | None = None
    loss_weight: float = 1.0
    captions: tuple[str, ...] = ()  # what ``texts`` encode, in order: a live text encoder encodes these instead


@dataclass
class CacheStats:
    encoded_images: int = 0
    encoded_texts: int = 0
    reused: int = 0
    rebuilt_corrupt: int = 0


class EncodedDataset:
    """The loop's view of a cached dataset (implements batching.TrainData). Tensors are read from disk
    per batch, never held for the whole dataset; repeats become repeated indices."""

    def __init__(self, samples: Sequence[EncodedSample], repeats: Sequence[int], empty_text: Path,
                 policy: CaptionPolicy, stats: CacheStats):
        self.samples = [s for s, n in zip(samples, repeats) for _ in range(n)]
        self.sizes = [s.size for s in self.samples]
        self.empty_text, self.policy, self.stats = empty_text, policy, stats
        paths = {empty_text}
        for sample in samples:
            paths.update(p for p in (sample.latent, sample.flipped, sample.control, sample.empty, sample.mask,
                                     sample.mask_flipped, *sample.texts) if p)
        self.files = {path: file_state(path) for path in sorted(paths)}  # as verified when encoded

    def changed_files(self) -> list[Path]:
        """Cache files changed or removed on disk since they were verified (cheap: no file is read)."""
        return changed(self.files)

    def __len__(self) -> int:
        return len(self.samples)

    def collate(self, indices: Sequence[int], rng: random.Random) -> Batch:
        latents, conds, masks, captions = [], [], [], []
        for i in indices:
            sample = self.samples[i]
            use_flip = sample.flipped is not None and rng.random() < 0.5
            image = load_file(sample.flipped if use_flip else sample.latent)
            mask = sample.mask_flipped if use_flip else sample.mask
            masks.append(load_file(mask)["mask"] if mask else torch.ones(1, *image["latent"].shape[-2:]))
            drawn = None if self.policy.drops(rng) else rng.randrange(len(sample.texts))  # what rng.choice draws
            cond = load_file((sample.empty or self.empty_text) if drawn is None else sample.texts[drawn])
            captions.append("" if drawn is None else sample.captions[drawn] if sample.captions else None)
            if sample.control is not None:
                cond["control"] = load_file(sample.control)["latent"]
            latents.append(image["latent"])
            conds.append(cond)
        masked = any(self.samples[i].mask for i in indices)
        weights = [self.samples[i].loss_weight for i in indices]
        return Batch(torch.stack(latents), stack_conditioning(conds), torch.stack(masks) if masked else None,
                     torch.tensor(weights) if any(w != 1 for w in weights) else None,
                     captions=None if None in captions else captions)


def encode_dataset(samples: Sequence[Sample], encoders: Encoders, cache_dir: str | Path,
                   settings: CacheSettings, policy: CaptionPolicy = CaptionPolicy(),
                   on_progress: Callable[[int, int], None] | None = None) -> EncodedDataset:
    """Encode what the cache lacks, then return the dataset over the cache files."""
    cache = _Cache(Path(cache_dir), encoders.identity)
    multiple = math.lcm(settings.bucket_multiple, encoders.latent_multiple)
    buckets = make_buckets(settings.resolution**2, multiple=multiple)
    encoded = []
    for number, sample in enumerate(samples):
        rng = random.Random(f"{settings.seed}:{sample.image}")
        image = load_image(sample.image)
        bucket = nearest_bucket(*image.size, buckets)
        crop_seed = rng.random()
        transform = {"bucket": bucket, "random_crop": settings.random_crop, "seed": settings.seed}
        latent, flipped, size, _ = _encode_image(cache, encoders, sample.image, image, transform, settings.flip,
                                                 random.Random(crop_seed))
        masks = (_encode_mask(cache, sample.mask, sample.image, image.size, transform, settings.flip, crop_seed,
                              size)
                 if sample.mask is not None else (None, None))
        control = seen = empty = None
        if sample.control is not None:  # the text encoder sees the control crop its reference latent is made of
            control, _, _, seen = _encode_image(cache, encoders, sample.control, load_image(sample.control),
                                                transform, False, random.Random(rng.random()))
            empty = _encode_text(cache, encoders, "", seen)
        own = dataclasses.replace(policy, trigger="") if sample.regularization else policy  # a class image: no trigger
        variants = own.variants(sample.caption, settings.caption_variants, seed=settings.seed + number)
        texts = tuple(_encode_text(cache, encoders, caption, seen) for caption in variants)
        encoded.append(EncodedSample(latent, flipped, control, texts, size, empty, *masks, sample.loss_weight,
                                     tuple(variants)))
        if on_progress is not None:
            on_progress(number + 1, len(samples))
    empty = _encode_text(cache, encoders, "")
    log.info("latent cache %s: %s", cache.root, cache.stats)
    return EncodedDataset(encoded, [s.repeats for s in samples], empty, policy, cache.stats)


def _encode_image(cache: _Cache, encoders: Encoders, path: Path, image, transform: Mapping[str, object],
                  flip: bool, crop_rng: random.Random
                  ) -> tuple[Path, Path | None, tuple[int, int], tuple[dict, torch.Tensor]]:
    """(latent file, flipped latent file, latent size, (cache key: image hash + transform, the crop encoded))."""
    key = {"image": hashlib.sha256(path.read_bytes()).hexdigest(), **transform}
    cropped, _ = resize_and_crop(image, transform["bucket"], random_crop=bool(transform["random_crop"]),
                                           rng=crop_rng)
    pixels = image_to_tensor(cropped).unsqueeze(0)
    paths = []
    for flipped in ([False, True] if flip else [False]):
        def make(flipped: bool = flipped) -> dict[str, torch.Tensor]:
            source = torch.flip(pixels, dims=[-1]) if flipped else pixels
            cache.stats.encoded_images += 1
            return {"latent": encoders.encode_image(source).float().contiguous()}

        paths.append(cache.entry("latents", {**key, "flip": flipped}, make))
    size = tuple(load_file(paths[0])["latent"].shape[-2:])
    return paths[0], paths[1] if flip else None, size, (key, pixels)


def _encode_mask(cache: _Cache, path: Path, image: Path, image_size: tuple[int, int],
                 transform: Mapping[str, object], flip: bool, crop_seed: float,
                 latent_size: tuple[int, int]) -> tuple[Path, Path | None]:
    """The mask at ``path`` (``image`` itself: its alpha channel) cropped as its image was (same bucket, same crop window), then averaged down to the
    latent's size: (mask file, mirrored mask file when ``flip``), each ``{"mask": [1, h, w]}`` in [0, 1]."""
    alpha = path == image
    key = {"mask": hashlib.sha256(path.read_bytes()).hexdigest(), "alpha": alpha, "image_size": image_size,
           **transform, "latent_size": latent_size, "crop": crop_seed if transform["random_crop"] else None}
    cropped, _ = resize_and_crop(load_mask(path, image_size, alpha), transform["bucket"],
                                 random_crop=bool(transform["random_crop"]), rng=random.Random(crop_seed))
    pixels = torch.from_numpy(np.array(cropped, dtype=np.uint8)).float().div(255)[None, None]
    mask = torch.nn.functional.interpolate(pixels, size=latent_size, mode="area")[0]
    paths = [cache.entry("masks", {**key, "flip": flipped},
                         lambda flipped=flipped: {"mask": (torch.flip(mask, dims=[-1]) if flipped else mask).contiguous()})
             for flipped in ([False, True] if flip else [False])]
    return paths[0], paths[1] if flip else None


def _encode_text(cache: _Cache, encoders: Encoders, caption: str,
                 image: tuple[dict, torch.Tensor] | None = None) -> Path:
    """``image``: (cache key, pixels) of the control crop the text encoder also sees (edit pairs)."""
    def make() -> dict[str, torch.Tensor]:
        cache.stats.encoded_texts += 1
        out = encoders.encode_text(caption, image[1]) if image is not None else encoders.encode_text(caption)
        return {k: v.float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in out.items()}

    key = {"caption": caption} if image is None else {"caption": caption, "image": image[0]}
    return cache.entry("text", key, make)


class _Cache:
    def __init__(self, root: Path, identity: str):
        self.root, self.identity, self.stats = root, identity, CacheStats()
        try:
            root.mkdir(parents=True, exist_ok=True)
            removed = remove_temp_files(root)  # left by a killed run
            probe = root / temp_name("write_test", secrets.token_hex(4))
            probe.touch()
            probe.unlink()
        except OSError as error:
            raise PermissionError(f"Cache folder {root} is not writable ({error.strerror}); "
                                  "choose another cache_dir") from error
        if removed:
            log.info("removed %d temporary files left in %s by an interrupted run", removed, root)

    def entry(self, kind: str, key: Mapping[str, object], make: Callable[[], dict[str, torch.Tensor]]) -> Path:
        """The cache file for ``key``; made with ``make()`` when missing or damaged."""
        blob = json.dumps({"v": CACHE_VERSION, "encoder": self.identity, **key}, sort_keys=True, default=str)
        digest = hashlib.sha256(blob.encode()).hexdigest()
        path = self.root / kind / digest[:2] / f"{digest}.safetensors"
        if path.exists():
            if _intact(path):
                self.stats.reused += 1
                return path
            log.warning("cache entry %s is damaged; encoding it again", path)
            self.stats.rebuilt_corrupt += 1
        tensors = make()
        with atomic_path(path, durable=False) as temp:  # a damaged entry is found by its hash and made again
            save_file(tensors, temp, metadata={"sha256": _digest(tensors)})
        return path


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _intact(path: Path) -> bool:
    try:
        with safe_open(path, "pt") as f:
            expected = (f.metadata() or {}).get("sha256")
        return expected is not None and _digest(load_file(path)) == expected
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return False
