"""Load LoRA Dataset and Caption Dropout: a scanned, validated folder plus the caption policy."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import folder_paths
from comfy_api.latest import io, ui

from ..training.captions import TRIGGER, CaptionPolicy
from ..training.dataset import Sample, folder_fingerprint, mix_regularization, scan_folder
from .inputs import errors_named, finite
from .paths import readable

CATEGORY = "LoRA Trainer"
DATASET = io.Custom("LORA_DATASET")


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
    return readable(folder_paths.get_input_directory(), folder, what="Load LoRA Dataset: folder")


def existing_folder(folder: str) -> str:
    path = resolve_folder(folder)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Load LoRA Dataset: folder {folder!r} is not a folder ({path} "
                                f"{'is a file' if os.path.exists(path) else 'does not exist'}); give the path of "
                                "a folder of images with captions, or a name inside ComfyUI's input folder")
    return path


class LoadLoraDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraTrainerLoadDataset", display_name="Load LoRA Dataset", category=CATEGORY,
            description="Scan a folder of images with caption sidecars (.txt/.caption), validate it, plan buckets.",
            inputs=[
                io.String.Input("folder", default="", tooltip="Folder of images + same-name .txt/.caption captions. "
                                "Relative paths are inside ComfyUI's input folder. kohya 'N_name' subfolders repeat "
                                "their images N times."),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=64,
                             tooltip="Training area: buckets hold about resolution² pixels."),
                io.Int.Input("bucket_multiple", default=64, min=8, max=256, step=8,
                             tooltip="Bucket sides are multiples of this (64 suits every family)."),
                io.Boolean.Input("strict", default=True, tooltip="On: any problem (missing caption, unreadable or "
                                 "too-small image, ...) stops with a report. Off: skip those images."),
                io.Boolean.Input("edit_pairs", default=False, tooltip="Edit-model datasets: each image has a "
                                 "same-name control image in a 'control' subfolder; the caption is the instruction."),
                io.Boolean.Input("random_crop", default=False, tooltip="Crop a random window instead of the centre "
                                 "when an image is wider/taller than its bucket (fixed per image once cached)."),
                io.Boolean.Input("flip", default=False, tooltip="Also learn mirrored images (both are cached)."),
                io.String.Input("caption_if_missing", default=TRIGGER, optional=True, tooltip="The caption of an "
                                f"image without a caption file: {TRIGGER} is Caption Dropout's trigger word, so "
                                f"'a photo of {TRIGGER}' also works. Empty: a missing caption is a problem (strict "
                                "stops, otherwise the image is skipped)."),
                io.Boolean.Input("masks", default=False, optional=True, tooltip="Masked loss: each image's loss "
                                 "counts where its mask is white: a same-name image in a 'masks' subfolder, or else "
                                 "its alpha channel (Train LoRA's unmasked_weight sets the rest's weight)."),
            ],
            outputs=[DATASET.Output("dataset", display_name="dataset"),
                     io.String.Output("report", display_name="report")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder, **_) -> str:
        """Follows the folder's contents, not only its name: added, removed, renamed or edited images and captions
        make ComfyUI scan again instead of re-using the last scan."""
        try:
            return folder_fingerprint(resolve_folder(folder))
        except ValueError:
            return folder  # execute reports it

    @classmethod
    def execute(cls, folder, resolution, bucket_multiple, strict, edit_pairs, random_crop, flip,
                caption_if_missing=TRIGGER, masks=False) -> io.NodeOutput:
        if bucket_multiple > resolution:
            raise ValueError(f"Load LoRA Dataset: bucket_multiple ({bucket_multiple}) is larger than resolution "
                             f"({resolution}), so no bucket fits; lower bucket_multiple or raise resolution")
        path = existing_folder(folder)
        with errors_named("Load LoRA Dataset"):
            report = scan_folder(path, resolution=resolution, strict=strict, edit_pairs=edit_pairs,
                                 missing_caption=caption_if_missing.strip() or None, masks=masks)
        text = report.text()
        dataset = LoraDataset(path, tuple(report.samples), text, resolution, bucket_multiple, random_crop, flip)
        return io.NodeOutput(dataset, text, ui=ui.PreviewText(text))


class CaptionDropout(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraTrainerCaptionDropout", display_name="Caption Dropout", category=CATEGORY,
            description="Caption policy applied per sample at training time; works with cached text embeddings.",
            inputs=[
                DATASET.Input("dataset", tooltip="From Load LoRA Dataset."),
                io.Float.Input("dropout", default=0.1, min=0.0, max=0.95, step=0.01,
                               tooltip="Chance of training a sample with the empty caption (helps the LoRA work "
                               "without its trigger; 0.05-0.1 is usual)."),
                io.String.Input("trigger_word", default="", tooltip="Put first in every caption, e.g. 'zkx style' "
                                f"(or where a caption says {TRIGGER}); images without a caption file train on it."),
                io.Boolean.Input("shuffle_tags", default=False, tooltip="Shuffle comma-separated tags."),
                io.Int.Input("keep_tokens", default=1, min=0, max=32, tooltip="With shuffle: this many leading tags "
                             "stay in place (the trigger word always stays first)."),
                io.Int.Input("shuffle_variants", default=4, min=1, max=32, tooltip="With shuffle: shuffled captions "
                             "encoded per image; one is picked at each step."),
            ],
            # output ids must differ from input ids (0.3.75 checks); the socket still reads "dataset"
            outputs=[DATASET.Output("dataset_out", display_name="dataset")],
        )

    @classmethod
    def execute(cls, dataset, dropout, trigger_word, shuffle_tags, keep_tokens, shuffle_variants) -> io.NodeOutput:
        policy = CaptionPolicy(dropout=finite("Caption Dropout: dropout", dropout), trigger=trigger_word.strip(),
                               shuffle=shuffle_tags, keep_tokens=keep_tokens)
        variants = shuffle_variants if shuffle_tags else 1
        return io.NodeOutput(dataclasses.replace(dataset, policy=policy, caption_variants=variants))


class RegularizationImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraTrainerRegularization", display_name="Regularisation Images", category=CATEGORY,
            description="Prior preservation (kohya's regularisation images): mix images of the class (e.g. other "
                        "dogs, for a LoRA of one dog) into every epoch, trained on their own captions without the "
                        "trigger, so the LoRA keeps what the class looks like.",
            inputs=[
                DATASET.Input("dataset", tooltip="The training images (from Load LoRA Dataset or Caption Dropout)."),
                DATASET.Input("class_images", tooltip="A second Load LoRA Dataset: the class images with their "
                              "captions ('a photo of a dog'); its repeats count."),
                io.Float.Input("share", default=0.5, min=0.05, max=0.95, step=0.05, tooltip="The class images' "
                               "share of every epoch: 0.5 is as many as the training images with their repeats "
                               "(kohya's 1:1). Too few repeat evenly; of too many, a seeded choice is used."),
                io.Float.Input("loss_weight", default=1.0, min=0.0, max=10.0, step=0.05, tooltip="Their loss "
                               "weight (kohya's prior_loss_weight): lower it if the LoRA learns too little of the "
                               "subject."),
            ],
            outputs=[DATASET.Output("dataset_out", display_name="dataset"),
                     io.String.Output("report", display_name="report")],
        )

    @classmethod
    def execute(cls, dataset, class_images, share, loss_weight) -> io.NodeOutput:
        with errors_named("Regularisation Images"):
            training = [s for s in dataset.samples if not s.regularization]
            mixed = mix_regularization(training, class_images.samples, finite("share", share),
                                       finite("loss_weight", loss_weight))
        added = [s for s in mixed if s.regularization]
        report = (f"{sum(s.repeats for s in training)} training images and {sum(s.repeats for s in added)} class "
                  f"images per epoch ({len(added)} of the {len(class_images.samples)} class images, at loss weight "
                  f"{loss_weight})")
        return io.NodeOutput(dataclasses.replace(dataset, samples=tuple(mixed)), report, ui=ui.PreviewText(report))
