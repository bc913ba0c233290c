"""Scan a dataset folder: images, caption sidecars, kohya repeat folders, edit pairs; report problems.

Layout::

    dataset/
        a.png  a.txt            # top-level images repeat once
        10_cat/ b.jpg b.caption # kohya folder: repeats = 10, group "10_cat"
        10_cat/close/ c.png     # plain subfolders inherit repeats and group from above
        control/ a.png          # edit pairs only: the control image for a.png
        masks/ a.png            # masked loss only: where a.png's loss counts (white), or the image's alpha
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .captions import TRIGGER
from .files import file_state

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTENSIONS = (".txt", ".caption")  # .txt wins when both exist and agree
CONTROL_DIR = "control"
MASK_DIR = "masks"
# An image is too small when it has fewer than half the pixels of a resolution x resolution square:
# it would need more than ~1.41x upscaling per side to fill a bucket of the training area.
MIN_AREA_FRACTION = 0.5

_KOHYA_DIR = re.compile(r"^(\d+)_(.+)$")
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Sample:
    image: Path
    caption: str
    control: Path | None = None
    repeats: int = 1
    group: str = ""  # kohya folder ("10_cat") or the dataset folder's name; keys ss_tag_frequency
    uncaptioned: bool = False  # no caption file: ``caption`` is the scan's ``missing_caption``
    mask: Path | None = None  # masked loss: a grayscale mask file, or the image itself for its alpha channel
    loss_weight: float = 1.0
    regularization: bool = False  # a class image (prior preservation): trained on its own caption, no trigger


@dataclass(frozen=True)
class Problem:
    path: Path
    message: str


@dataclass
class ScanReport:
    samples: list[Sample]
    problems: list[Problem]
    skipped: list[Path]
    folder: Path | None = None

    def text(self) -> str:
        """A human report: counts, each problem as ``path: message``, what was skipped."""
        steps = sum(s.repeats for s in self.samples)
        where = f" in {self.folder}" if self.folder else ""
        lines = [f"{len(self.samples)} images found{where} ({steps} per epoch with repeats), "
                 f"{len(self.problems)} problems, {len(self.skipped)} skipped."]
        masked = sum(1 for s in self.samples if s.mask is not None)
        if masked:
            lines.append(f"{masked} images have a mask ({sum(1 for s in self.samples if s.mask == s.image)} from "
                         "their alpha channel): their loss counts where the mask is white.")
        uncaptioned = [s for s in self.samples if s.uncaptioned]
        if uncaptioned:
            lines.append(f"{len(uncaptioned)} images have no caption file and train on the caption "
                         f"{uncaptioned[0].caption!r}.")
        if self.problems:
            lines.append("Problems:")
            lines += [f"  {p.path}: {p.message}" for p in self.problems]
        if self.skipped:
            lines.append("Skipped:")
            lines += [f"  {path}" for path in self.skipped]
        return "\n".join(lines)


class DatasetError(ValueError):
    """The dataset cannot be trained on as it is; ``report`` says why, file by file."""

    def __init__(self, message: str, report: ScanReport):
        super().__init__(message)
        self.report = report


def load_image(path: str | Path) -> Image.Image:
    """Open an image as fully loaded RGB: EXIF orientation applied, alpha composited on white,
    CMYK / palette / 16-bit converted. Raises ValueError naming the file if it cannot be decoded."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image not found: {path}")
    try:
        with Image.open(path) as opened:
            opened.load()  # decode everything now, so a truncated file fails here
            image = ImageOps.exif_transpose(opened)
            return to_rgb(image)
    except _IMAGE_ERRORS as err:
        raise ValueError(f"Cannot read image {path}: {err}. Re-export it or remove it from the dataset.") from err


def load_mask(path: str | Path, size: tuple[int, int], alpha: bool = False) -> Image.Image:
    """A loss mask as an 8-bit grayscale image of ``size`` (the image's (width, height) after ``load_image``): a mask
    file's brightness (white counts), or with ``alpha`` an image's own alpha channel. EXIF orientation applied."""
    path = Path(path)
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
            mask = image.convert("RGBA").getchannel("A") if alpha else image.convert("L")
    except _IMAGE_ERRORS as err:
        raise ValueError(f"Cannot read mask {path}: {err}. Re-export it or remove it from the dataset.") from err
    return mask if mask.size == size else mask.resize(size, Image.Resampling.BILINEAR)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha (RGBA, LA, palette transparency) composited on white, 16-bit scaled."""
    if image.mode.startswith("I") or image.mode == "F":
        image = _high_bit_depth_to_l(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image.copy()


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """16/32-bit grayscale to 8-bit: ``I;16*`` always scales 65535 -> 255; ``I``/``F`` only when the
    values exceed 255 (otherwise they are 8-bit values stored wide)."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or values.max(initial=0) > 255:
        values = values / 257.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def _probe_image(path: Path) -> tuple[int, int]:
    """(width, height) after decoding the whole file; JPEGs decode at 1/8 scale to keep scans cheap."""
    with Image.open(path) as image:
        size = image.size
        if image.format == "JPEG":
            image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
        image.load()
    return size


def _read_caption(path: Path) -> str:
    text = path.read_bytes().decode("utf-8-sig")
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


@dataclass
class _Scan:
    """Accumulates one scan's samples and problems; ``bad`` holds the paths a problem disqualifies."""

    root: Path
    resolution: int | None
    edit_pairs: bool
    missing_caption: str | None
    masks: bool = False
    samples: list[Sample] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    bad: set[Path] = field(default_factory=set)
    visited: set[Path] = field(default_factory=set)
    orphans: list[Problem] = field(default_factory=list)  # caption files without an image

    def problem(self, path: Path, message: str) -> None:
        self.problems.append(Problem(path, message))
        self.bad.add(path)

    def folder(self, folder: Path, repeats: int, group: str) -> None:
        real = folder.resolve()
        if real in self.visited:  # a symlink loop
            return
        self.visited.add(real)
        entries = sorted(folder.iterdir())
        images = [p for p in entries if _is_image(p)]
        sidecars = {(p.stem, p.suffix.lower()): p for p in entries
                    if p.suffix.lower() in CAPTION_EXTENSIONS and p.is_file()}
        controls = (self._companions(folder / CONTROL_DIR, images, "control image", "a target", size_matters=True)
                    if self.edit_pairs else {})
        masks = self._companions(folder / MASK_DIR, images, "mask", "an image", size_matters=False) if self.masks else {}
        stems = {image.stem for image in images}
        self.orphans += [Problem(path, f"caption without an image: no {stem}.png (or "
                                       f"{', '.join(IMAGE_EXTENSIONS[1:])}) beside it; add the image (other image "
                                       "types are not read: convert them) or remove the caption file")
                         for (stem, _), path in sidecars.items() if stem not in stems]
        for image in self._unique_stems(images):
            self.image(image, sidecars, controls, repeats, group, masks)
        for sub in entries:
            if not sub.is_dir() or sub.name.startswith("."):
                continue
            if sub.name == CONTROL_DIR:
                if not self.edit_pairs:
                    logger.info("Ignoring %s: edit_pairs is off, so control images are not used", sub)
                continue
            if sub.name == MASK_DIR:
                if not self.masks:
                    logger.info("Ignoring %s: masks are off, so they are not used", sub)
                continue
            match = _KOHYA_DIR.match(sub.name)
            if match and int(match.group(1)) == 0:
                logger.warning("Ignoring %s: a kohya folder with 0 repeats trains nothing", sub)
                continue
            if match:
                self.folder(sub, int(match.group(1)), sub.name)
            else:  # a plain subfolder belongs to the nearest kohya folder above it (or the top)
                self.folder(sub, repeats, group)

    def _unique_stems(self, images: list[Path]) -> list[Path]:
        by_stem: dict[str, list[Path]] = {}
        for image in images:
            by_stem.setdefault(image.stem, []).append(image)
        for stem, paths in by_stem.items():
            if len(paths) > 1:
                names = ", ".join(p.name for p in paths)
                for path in paths:
                    self.problem(path, f"duplicate stem {stem!r} ({names}): which caption/control belongs "
                                       "to which image is ambiguous; rename or remove all but one")
        return [paths[0] for paths in by_stem.values() if len(paths) == 1]

    def _companions(self, folder: Path, images: list[Path], kind: str, owner: str,
                    size_matters: bool) -> dict[str, Path]:
        """Map stem -> each image's companion in ``folder`` (its control image, its mask); flag companions without
        their image. A duplicated stem maps to its first (flagged) file, so its image is flagged too."""
        if not folder.is_dir():
            return {}
        found = [p for p in sorted(folder.iterdir()) if _is_image(p)]
        stems = {image.stem for image in images}
        for companion in self._unique_stems(found):
            if companion.stem not in stems:
                self.problem(companion, f"{kind} without {owner}: expected {companion.stem}.png (or another image "
                                        f"type) in {folder.parent}; add it or remove the {kind.split()[0]}")
            else:
                self.check_image(companion, size_matters)
        return {c.stem: c for c in reversed(found)}

    def mask(self, image: Path, masks: dict[str, Path]) -> Path | None:
        """The image's mask file, else the image itself when it has an alpha channel, else none (masks on)."""
        if not self.masks:
            return None
        if image.stem in masks:
            return masks[image.stem]
        try:
            with Image.open(image) as opened:
                return image if "A" in opened.getbands() or "transparency" in opened.info else None
        except _IMAGE_ERRORS:
            return None  # check_image reports it

    def image(self, image: Path, sidecars: dict[tuple[str, str], Path], controls: dict[str, Path],
              repeats: int, group: str, masks: dict[str, Path]) -> None:
        caption = self.caption(image, sidecars)
        control = None
        if self.edit_pairs:
            control = controls.get(image.stem)
            if control is None:
                self.problem(image, f"no control image: expected {CONTROL_DIR}/{image.stem}.png (or .jpg, "
                                    f".jpeg, .webp, .bmp) in {image.parent}; add it or remove the target")
            elif control in self.bad:
                self.problem(image, f"its control image {control} has a problem (listed separately); fix that first")
        self.check_image(image)
        if image not in self.bad and caption is not None:
            mask = self.mask(image, masks)
            if mask is not None and mask in self.bad:
                self.problem(image, f"its mask {mask} has a problem (listed separately); fix that first")
                return
            self.samples.append(Sample(image, caption or self.missing_caption, control, repeats, group,
                                       uncaptioned=not caption, mask=mask))

    def caption(self, image: Path, sidecars: dict[tuple[str, str], Path]) -> str | None:
        """The image's caption; "" when it has no caption file and ``missing_caption`` stands in; None: a problem."""
        texts = []
        for ext in CAPTION_EXTENSIONS:
            sidecar = sidecars.get((image.stem, ext))
            if sidecar is None:
                continue
            try:
                texts.append((sidecar, _read_caption(sidecar)))
            except (OSError, UnicodeDecodeError) as err:
                self.problem(image, f"cannot read caption {sidecar.name}: {err}; save it as UTF-8 text")
                return None
        if not texts and self.missing_caption is not None:
            return ""
        if not texts:
            self.problem(image, f"missing caption: add {image.stem}.txt (or {image.stem}.caption) beside it, or "
                                "set caption_if_missing, the caption of images without one")
            return None
        if len({text for _, text in texts}) > 1:
            names = " and ".join(p.name for p, _ in texts)
            self.problem(image, f"{names} disagree; keep one caption file")
            return None
        sidecar, text = texts[0]
        if not text:
            self.problem(image, f"empty caption in {sidecar.name}: write a description (or trigger word) in it")
            return None
        return text

    def check_image(self, image: Path, size_matters: bool = True) -> None:
        try:
            width, height = _probe_image(image)
        except _IMAGE_ERRORS as err:
            self.problem(image, f"unreadable or truncated image ({err}); re-export it or remove it")
            return
        if size_matters and self.resolution and width * height < MIN_AREA_FRACTION * self.resolution**2:
            self.problem(image, f"image too small: {width}x{height} has under half the pixels of the "
                                f"{self.resolution}x{self.resolution} training area; use a larger image "
                                "or a lower resolution")


def scan_folder(folder: str | Path, *, resolution: int | None = None, strict: bool = True,
                edit_pairs: bool = False, missing_caption: str | None = None, masks: bool = False) -> ScanReport:
    """Find every image, its caption (and control image for edit pairs), and every problem.

    missing_caption: the caption of an image without a caption file (``"{trigger}"``: the trigger word, or a
    template such as ``"a photo of {trigger}"``); None makes a missing caption file a problem.

    masks: each image's loss mask is ``masks/<stem>.<ext>`` beside it (white counts, black does not) or else its
    alpha channel; an image with neither trains everywhere.

    strict: any problem raises DatasetError with the whole report. Otherwise problem images are
    skipped (logged, listed in ``skipped``); a scan that leaves no sample still raises.
    """
    root = Path(folder).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"Dataset folder not found: {root}")
    if resolution is not None and resolution <= 0:
        raise ValueError(f"resolution must be a positive number of pixels (e.g. 512) or None, got {resolution}")
    expected = "expected " + "/".join(e[1:] for e in IMAGE_EXTENSIONS) + " files"
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder; {expected} inside a folder",
                           ScanReport([], [], [], root))
    scan = _Scan(root, resolution, edit_pairs, missing_caption, masks)
    scan.folder(root, 1, root.resolve().name)
    problems = scan.problems
    samples = sorted((s for s in scan.samples if s.image not in scan.bad), key=lambda s: str(s.image))
    if not samples and not problems:
        raise DatasetError(f"No images found in {root}; {expected} (with .txt or .caption sidecars)",
                           ScanReport([], scan.orphans, [], root))
    problems = sorted(problems + scan.orphans, key=lambda p: (str(p.path), p.message))
    if strict and problems:
        report = ScanReport(samples, problems, [], root)
        raise DatasetError(f"The dataset has {len(problems)} problems; fix them or turn strict off to skip "
                           f"those images.\n{report.text()}", report)
    report = ScanReport(samples, problems, sorted(scan.bad, key=str), root)
    if problems:
        logger.warning("Skipping %d images with problems:\n%s", len(report.skipped),
                       "\n".join(f"  {p.path}: {p.message}" for p in problems))
    if not samples:
        raise DatasetError(f"Every image in {root} has a problem, nothing left to train on.\n{report.text()}",
                           report)
    return report


def folder_fingerprint(folder: str | Path) -> str:
    """Changes whenever a file under ``folder`` is added, removed, renamed, rewritten or touched: a hash of every
    file's relative name, size and modification time (no file is read, so it is cheap to ask every prompt)."""
    root = Path(folder).expanduser()
    digest, seen = hashlib.sha256(), set()
    for parent, folders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(parent)
        if real in seen:  # a symlink loop
            folders.clear()
            continue
        seen.add(real)
        folders.sort()
        for name in sorted(files):
            path = os.path.join(parent, name)
            state = file_state(path)
            if state is not None:  # not vanished meanwhile, nor a broken link
                digest.update(f"{os.path.relpath(path, root)}\0{state[0]}\0{state[1]}\n".encode())
    return digest.hexdigest()


def mix_regularization(samples: Sequence[Sample], class_images: Sequence[Sample], share: float, weight: float,
                       seed: int = 0) -> list[Sample]:
    """kohya's prior preservation: ``samples`` plus class images making up ``share`` of every epoch (0.5: as many
    as the training images with their repeats, kohya's 1:1), each at loss ``weight``. The class images repeat
    evenly when they are too few; when there are more than needed, a seeded choice of them is used, as kohya uses
    the first ones."""
    if not 0 < share < 1:
        raise ValueError(f"share must be between 0 and 1 (0.5: as many class images as training images), got {share}")
    if not class_images:
        raise ValueError("no class images: give a folder of images of the class (e.g. 'a photo of a dog')")
    stand_ins = [s for s in class_images if s.uncaptioned and (TRIGGER in s.caption or not s.caption.strip())]
    if stand_ins:  # the trigger is not theirs: they would train on the empty caption, the bleed they should stop
        raise ValueError(f"{len(stand_ins)} class images have no caption file (e.g. {stand_ins[0].image}) and would "
                         f"train on {stand_ins[0].caption!r} without the trigger; caption them, or set the class "
                         "images' caption_if_missing to the class itself, e.g. 'a photo of a dog'")
    epoch = sum(s.repeats for s in samples)
    wanted = max(1, round(epoch * share / (1 - share)))
    chosen = sorted(random.Random(seed).sample(list(class_images), min(wanted, len(class_images))),
                    key=lambda s: str(s.image))
    every, extra = divmod(wanted, len(chosen))
    return [*samples, *(dataclasses.replace(sample, repeats=every + (i < extra), loss_weight=weight, regularization=True)
                        for i, sample in enumerate(chosen) if every + (i < extra))]


def tag_frequency(samples: Iterable[Sample]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: ``{group: {tag: count}}``; tags split on commas, stripped and
    lower-cased, counted once per image (not per repeat), as kohya does."""
    frequency: dict[str, dict[str, int]] = {}
    for sample in samples:
        if sample.uncaptioned or sample.regularization:  # a stand-in caption, or not what the LoRA learns
            continue
        counts = frequency.setdefault(sample.group, {})
        for tag in sample.caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return frequency
