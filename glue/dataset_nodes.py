"""Load LoRA Dataset and Caption Dropout: a scanned, validated folder plus the caption policy."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import folder_paths

from ..training.captions import CaptionPolicy
from ..training.dataset import Sample, scan_folder
from .paths import under

CATEGORY = "LoRA Trainer"


@dataclass(frozen=True)
class LoraDataset:
    """LORA_DATASET: what was found, and how to turn it into training inputs."""

    folder: str
    samples: tuple[Sample, ...]
    report: str
    resolution: int
    bucket_multiple: int
    random_crop: bool
    flip: bool
    policy: CaptionPolicy = CaptionPolicy()
    caption_variants: int = 1


def resolve_folder(folder: str) -> str:
    """Absolute paths as given; relative ones inside ComfyUI's input folder."""
    if not folder.strip().strip('"'):
        raise ValueError("Load LoRA Dataset: 'folder' is empty; give the path of a folder of images + captions")
    return under(folder_paths.get_input_directory(), folder, what="Load LoRA Dataset: folder", absolute=True)


class LoadLoraDataset:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LORA_DATASET", "STRING")
    RETURN_NAMES = ("dataset", "report")
    FUNCTION = "execute"
    DESCRIPTION = "Scan a folder of images with caption sidecars (.txt/.caption), validate it, plan buckets."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "folder": ("STRING", {"default": "", "tooltip": "Folder of images + same-name .txt/.caption captions. "
                                  "Relative paths are inside ComfyUI's input folder. kohya 'N_name' subfolders "
                                  "repeat their images N times."}),
            "resolution": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 64,
                                   "tooltip": "Training area: buckets hold about resolution² pixels."}),
            "bucket_multiple": ("INT", {"default": 64, "min": 8, "max": 256, "step": 8,
                                        "tooltip": "Bucket sides are multiples of this (64 suits every family)."}),
            "strict": ("BOOLEAN", {"default": True, "tooltip": "On: any problem (missing caption, unreadable or "
                                   "too-small image, ...) stops with a report. Off: skip those images."}),
            "edit_pairs": ("BOOLEAN", {"default": False, "tooltip": "Edit-model datasets: each image has a "
                                       "same-name control image in a 'control' subfolder; the caption is "
                                       "the instruction."}),
            "random_crop": ("BOOLEAN", {"default": False, "tooltip": "Crop a random window instead of the "
                                        "centre when an image is wider/taller than its bucket (fixed per "
                                        "image once cached)."}),
            "flip": ("BOOLEAN", {"default": False, "tooltip": "Also learn mirrored images (both are cached)."}),
        }}

    def execute(self, folder, resolution, bucket_multiple, strict, edit_pairs, random_crop, flip):
        path = resolve_folder(folder)
        report = scan_folder(path, resolution=resolution, strict=strict, edit_pairs=edit_pairs)
        text = report.text()
        dataset = LoraDataset(path, tuple(report.samples), text, resolution, bucket_multiple, random_crop, flip)
        return (dataset, text)


class CaptionDropout:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LORA_DATASET",)
    RETURN_NAMES = ("dataset",)
    FUNCTION = "execute"
    DESCRIPTION = "Caption policy applied per sample at training time; works with cached text embeddings."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dataset": ("LORA_DATASET", {"tooltip": "From Load LoRA Dataset."}),
            "dropout": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 0.95, "step": 0.01,
                                  "tooltip": "Chance of training a sample with the empty caption "
                                  "(helps the LoRA work without its trigger; 0.05-0.1 is usual)."}),
            "trigger_word": ("STRING", {"default": "", "tooltip": "Put first in every caption, e.g. 'zkx style'."}),
            "shuffle_tags": ("BOOLEAN", {"default": False, "tooltip": "Shuffle comma-separated tags."}),
            "keep_tokens": ("INT", {"default": 1, "min": 0, "max": 32, "tooltip": "With shuffle: this many "
                                    "leading tags stay in place (the trigger word always stays first)."}),
            "shuffle_variants": ("INT", {"default": 4, "min": 1, "max": 32, "tooltip": "With shuffle: shuffled "
                                         "captions encoded per image; one is picked at each step."}),
        }}

    def execute(self, dataset, dropout, trigger_word, shuffle_tags, keep_tokens, shuffle_variants):
        policy = CaptionPolicy(dropout=dropout, trigger=trigger_word.strip(), shuffle=shuffle_tags,
                               keep_tokens=keep_tokens)
        variants = shuffle_variants if shuffle_tags else 1
        return (dataclasses.replace(dataset, policy=policy, caption_variants=variants),)
