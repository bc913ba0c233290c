"""Encode Latents Cache: VAE latents and text embeddings once, on disk, reused across runs."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..training.cache import CacheSettings, EncodedDataset, encode_dataset
from ..training.files import changed
from .bridge import ComfyEncoders
from .dataset_nodes import CATEGORY, DATASET, LoraDataset
from .inputs import errors_named
from .paths import DEFAULT_CACHE, writable

ENCODED = io.Custom("LORA_ENCODED")


@dataclass
class LoraEncoded:
    """LORA_ENCODED: the cached dataset and where it came from."""

    data: EncodedDataset
    dataset: LoraDataset
    cache_dir: str


# Per cache folder: the state of every file this node verified or made there in this server, and how often a
# change on disk made its earlier results stale (see EncodeLatentsCache.fingerprint_inputs).
_verified: dict[str, dict[Path, tuple[int, int] | None]] = {}
_generation: dict[str, int] = {}


def resolve_cache_dir(cache_dir: str) -> str:
    """A folder inside ComfyUI's output folder (kept across restarts)."""
    return writable(folder_paths.get_output_directory(), cache_dir.strip() or DEFAULT_CACHE,
                    what="Encode Latents Cache: cache_dir")


class EncodeLatentsCache(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraTrainerEncodeLatentsCache", display_name="Encode Latents Cache", category=CATEGORY,
            description="Encode every image (VAE) and caption (CLIP, plus the empty caption for dropout) once; "
                        "later runs reuse the cache and re-encode only what changed. Frees the encoders after.",
            inputs=[
                DATASET.Input("dataset", tooltip="From Load LoRA Dataset or Caption Dropout."),
                io.Vae.Input("vae", tooltip="The VAE of the model you will train (e.g. from Load Checkpoint)."),
                io.Clip.Input("clip", tooltip="The text encoder(s) of that model, as used by CLIP Text Encode."),
                io.String.Input("cache_dir", default=DEFAULT_CACHE, tooltip="Where encodings are kept: a folder "
                                "inside ComfyUI's output folder ('/' makes subfolders)."),
            ],
            outputs=[ENCODED.Output("encoded", display_name="encoded"),
                     io.String.Output("report", display_name="report")],
        )

    @classmethod
    def fingerprint_inputs(cls, cache_dir, **_) -> str:
        """ComfyUI re-uses this node's last result while its inputs stay the same. When a cache file that result
        points to was changed or removed on disk since, the answer changes, so the node runs again and rebuilds
        what was damaged before Train LoRA reads it."""
        try:
            folder = resolve_cache_dir(cache_dir)
        except ValueError:
            return cache_dir  # execute reports it
        if changed(_verified.get(folder, {})):
            del _verified[folder]
            _generation[folder] = _generation.get(folder, 0) + 1
        return f"{folder}#{_generation.get(folder, 0)}"

    @classmethod
    def execute(cls, dataset, vae, clip, cache_dir) -> io.NodeOutput:
        encoders = ComfyEncoders(vae, clip)
        try:
            with errors_named("Encode Latents Cache"):
                return io.NodeOutput(*encode(dataset, encoders, cache_dir))
        finally:
            encoders.release()


def encode(dataset, encoders, cache_dir: str) -> tuple[LoraEncoded, str]:
    """Encode ``dataset`` with any engine Encoders into the cache; ComfyUI's progress bar follows it."""
    folder = resolve_cache_dir(cache_dir)
    settings = CacheSettings(resolution=dataset.resolution, bucket_multiple=dataset.bucket_multiple,
                             random_crop=dataset.random_crop, flip=dataset.flip,
                             caption_variants=dataset.caption_variants)
    bar = comfy.utils.ProgressBar(len(dataset.samples))
    data = encode_dataset(dataset.samples, encoders, folder, settings, dataset.policy,
                          on_progress=lambda done, total: bar.update_absolute(done, total))
    _verified.setdefault(folder, {}).update(data.files)
    stats = data.stats
    report = (f"{len(dataset.samples)} images ({len(data)} with repeats) in {folder}: encoded "
              f"{stats.encoded_images} images and {stats.encoded_texts} captions, reused {stats.reused}, "
              f"rebuilt {stats.rebuilt_corrupt} damaged")
    uncaptioned = [sample for sample in dataset.samples if sample.uncaptioned and not sample.regularization]
    if uncaptioned:
        caption = dataset.policy.render(uncaptioned[0].caption, random.Random(0))
        report += (f"; {len(uncaptioned)} images without a caption file train on "
                   + (repr(caption) if caption else "the empty caption (give Caption Dropout a trigger word)"))
    return LoraEncoded(data, dataset, folder), report
