"""Dataset scanning: image decoding, captions, kohya folders, edit pairs, and every reported problem."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.dataset import (
    DatasetError,
    Problem,
    Sample,
    ScanReport,
    folder_fingerprint,
    load_image,
    scan_folder,
    tag_frequency,
    to_rgb,
)

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def make_image(path: Path, size: tuple[int, int] = (64, 64), color=RED, mode: str = "RGB", **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save)
    return path


def make_pair(folder: Path, stem: str, caption: str = "a cat", ext: str = ".png",
              size: tuple[int, int] = (64, 64)) -> Path:
    image = make_image(folder / f"{stem}{ext}", size)
    (folder / f"{stem}.txt").write_text(caption, encoding="utf-8")
    return image


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def noisy_image(path: Path, size: int = 64) -> Path:
    """Incompressible content, so cutting the file in half really removes pixel data."""
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def close(pixel, expected, tol: int = 12) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, expected))


# load_image --------------------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (40, 20), RED)
    stored.paste(BLUE, (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif.tobytes(), quality=95)

    image = load_image(path)

    assert image.mode == "RGB"
    assert image.size == (20, 40)
    assert close(image.getpixel((10, 5)), RED)  # the stored left side is now on top
    assert close(image.getpixel((10, 35)), BLUE)


def test_rgba_is_composited_on_white(tmp_path):
    image = Image.new("RGBA", (3, 1))
    image.putdata([(255, 0, 0, 255), (0, 0, 0, 0), (0, 0, 0, 128)])
    image.save(tmp_path / "alpha.png")

    loaded = load_image(tmp_path / "alpha.png")

    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == RED
    assert loaded.getpixel((1, 0)) == WHITE
    assert close(loaded.getpixel((2, 0)), (127, 127, 127), tol=1)


def test_la_is_composited_on_white(tmp_path):
    image = Image.new("LA", (2, 1))
    image.putdata([(0, 255), (0, 0)])
    image.save(tmp_path / "la.png")

    loaded = load_image(tmp_path / "la.png")

    assert [loaded.getpixel((x, 0)) for x in range(2)] == [(0, 0, 0), WHITE]


def test_palette_transparency_becomes_white(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    image.putdata([0, 1])
    image.save(tmp_path / "palette.png", transparency=0)

    loaded = load_image(tmp_path / "palette.png")

    assert [loaded.getpixel((x, 0)) for x in range(2)] == [WHITE, (0, 255, 0)]


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    make_image(tmp_path / "cmyk.jpg", (8, 8), (0, 255, 255, 0), mode="CMYK", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"

    loaded = load_image(tmp_path / "cmyk.jpg")

    assert loaded.mode == "RGB"
    assert close(loaded.getpixel((4, 4)), RED)


def test_16bit_png_is_scaled_to_8bit(tmp_path):
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")

    loaded = load_image(tmp_path / "deep.png")

    assert loaded.mode == "RGB"
    assert [loaded.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (100, 100, 100), WHITE]


def test_32bit_int_modes():
    """Older Pillows open 16-bit PNGs as mode "I": 16-bit values are scaled, 8-bit values kept."""
    wide_8bit = to_rgb(Image.fromarray(np.array([[0, 200]], dtype=np.int32)))
    wide_16bit = to_rgb(Image.fromarray(np.array([[0, 65535]], dtype=np.int32)))
    assert [wide_8bit.getpixel((x, 0)) for x in range(2)] == [(0, 0, 0), (200, 200, 200)]
    assert [wide_16bit.getpixel((x, 0)) for x in range(2)] == [(0, 0, 0), WHITE]


def test_grayscale_becomes_rgb(tmp_path):
    make_image(tmp_path / "gray.png", (4, 4), 90, mode="L")
    assert load_image(tmp_path / "gray.png").getpixel((0, 0)) == (90, 90, 90)


@pytest.mark.parametrize("name", ["cut.png", "cut.jpg"])
def test_truncated_image_raises_naming_the_file(tmp_path, name):
    path = truncate(noisy_image(tmp_path / name))
    with pytest.raises(ValueError, match="truncated") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_not_an_image_raises_naming_the_file(tmp_path):
    path = tmp_path / "fake.png"
    path.write_text("not a png")
    with pytest.raises(ValueError, match="Cannot read image") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_missing_image_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone.png"):
        load_image(tmp_path / "gone.png")


# scan_folder: the happy path ---------------------------------------------------------------------


def test_scan_finds_captions_repeats_and_groups(tmp_path):
    root = tmp_path / "mydata"
    make_pair(root, "a", "top image")
    make_image(root / "B.PNG")
    (root / "B.caption").write_bytes(b"\xef\xbb\xbfred, cat\r\nsecond line\r\n\r\n")
    make_pair(root / "10_cat", "c", "cat one", ext=".JPEG")
    make_pair(root / "misc", "d", "nested")
    make_pair(root / "10_cat" / "close", "e", "close up")
    make_image(root / "notes.gif")  # not a supported type: ignored
    (root / "readme.md").write_text("hello")

    report = scan_folder(root)

    assert report.samples == [
        Sample(root / "10_cat" / "c.JPEG", "cat one", None, 10, "10_cat"),
        Sample(root / "10_cat" / "close" / "e.png", "close up", None, 10, "10_cat"),
        Sample(root / "B.PNG", "red, cat\nsecond line", None, 1, "mydata"),
        Sample(root / "a.png", "top image", None, 1, "mydata"),
        Sample(root / "misc" / "d.png", "nested", None, 1, "mydata"),
    ]
    assert report.problems == [] and report.skipped == []


def test_scan_is_deterministic_and_sorted(tmp_path):
    for stem in ["z", "b", "m", "a"]:
        make_pair(tmp_path, stem, f"caption {stem}")
    first, second = scan_folder(tmp_path), scan_folder(tmp_path)
    assert first == second
    assert [s.image.name for s in first.samples] == ["a.png", "b.png", "m.png", "z.png"]


def test_hidden_files_are_ignored(tmp_path):
    make_pair(tmp_path, "a")
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    assert [s.image.name for s in scan_folder(tmp_path).samples] == ["a.png"]


def test_zero_repeat_kohya_folder_is_ignored(tmp_path):
    make_pair(tmp_path, "a")
    make_pair(tmp_path / "0_unused", "b")
    assert [s.image.name for s in scan_folder(tmp_path).samples] == ["a.png"]


def test_matching_txt_and_caption_sidecars_are_fine(tmp_path):
    make_pair(tmp_path, "a", "same")
    (tmp_path / "a.caption").write_text("same\n")
    assert scan_folder(tmp_path).samples[0].caption == "same"


# scan_folder: problems, strict and lenient --------------------------------------------------------


def problems_of(folder: Path, **kwargs) -> tuple[DatasetError, ScanReport]:
    """The strict error and the lenient report for the same folder."""
    with pytest.raises(DatasetError) as info:
        scan_folder(folder, strict=True, **kwargs)
    return info.value, scan_folder(folder, strict=False, **kwargs)


def assert_flagged(error: DatasetError, report: ScanReport, path: Path, phrase: str) -> None:
    assert f"{path}: " in str(error) and phrase in str(error)
    assert any(p.path == path and phrase in p.message for p in error.report.problems)
    assert path in report.skipped
    assert path not in [s.image for s in report.samples]


def test_missing_caption(tmp_path):
    make_pair(tmp_path, "good")
    bad = make_image(tmp_path / "nocap.png")
    error, report = problems_of(tmp_path)
    assert_flagged(error, report, bad, "missing caption")
    assert "nocap.txt" in error.report.problems[0].message
    assert [s.image.name for s in report.samples] == ["good.png"]


@pytest.mark.parametrize("strict", [True, False])
def test_images_without_captions_train_on_the_stand_in(tmp_path, strict):
    make_pair(tmp_path, "good", caption="a dog, grass")
    for stem in ("x", "y"):
        make_image(tmp_path / f"{stem}.png")
    report = scan_folder(tmp_path, strict=strict, missing_caption="a photo of {trigger}")
    assert [(s.image.name, s.caption, s.uncaptioned) for s in report.samples] == [
        ("good.png", "a dog, grass", False), ("x.png", "a photo of {trigger}", True),
        ("y.png", "a photo of {trigger}", True)]
    assert not report.problems
    assert "2 images have no caption file and train on the caption 'a photo of {trigger}'." in report.text()
    assert tag_frequency(report.samples) == {tmp_path.name: {"a dog": 1, "grass": 1}}


def test_a_folder_of_photos_alone_trains_with_a_stand_in(tmp_path):
    for stem in ("a", "b", "c"):
        make_image(tmp_path / f"{stem}.jpg")
    assert len(scan_folder(tmp_path, missing_caption="{trigger}").samples) == 3
    with pytest.raises(DatasetError, match="3 problems"):  # without one, a caption file is still required
        scan_folder(tmp_path)


def test_a_stand_in_does_not_excuse_empty_or_unreadable_captions(tmp_path):
    make_pair(tmp_path, "empty", caption="  ")
    make_pair(tmp_path, "good")
    error, report = problems_of(tmp_path, missing_caption="{trigger}")
    assert_flagged(error, report, tmp_path / "empty.png", "empty caption")


def test_empty_caption(tmp_path):
    make_pair(tmp_path, "good")
    bad = make_pair(tmp_path, "blank", "  \r\n ")
    error, report = problems_of(tmp_path)
    assert_flagged(error, report, bad, "empty caption in blank.txt")


def test_caption_not_utf8(tmp_path):
    make_pair(tmp_path, "good")
    bad = make_image(tmp_path / "latin.png")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    error, report = problems_of(tmp_path)
    assert_flagged(error, report, bad, "cannot read caption latin.txt")


def test_disagreeing_sidecars(tmp_path):
    make_pair(tmp_path, "good")
    bad = make_pair(tmp_path, "two", "one caption")
    (tmp_path / "two.caption").write_text("another caption")
    error, report = problems_of(tmp_path)
    assert_flagged(error, report, bad, "two.txt and two.caption disagree")


@pytest.mark.parametrize("name", ["cut.png", "cut.jpg"])
def test_truncated_image(tmp_path, name):
    make_pair(tmp_path, "good")
    bad = truncate(noisy_image(tmp_path / name))
    (tmp_path / "cut.txt").write_text("cut")
    error, report = problems_of(tmp_path)
    assert_flagged(error, report, bad, "unreadable or truncated image")


def test_image_too_small_for_resolution(tmp_path):
    make_pair(tmp_path, "big", size=(512, 512))
    make_pair(tmp_path, "edge", size=(512, 256))  # exactly half the area: allowed
    bad = make_pair(tmp_path, "tiny", size=(100, 100))
    error, report = problems_of(tmp_path, resolution=512)
    assert_flagged(error, report, bad, "image too small: 100x100")
    assert "512x512" in error.report.problems[0].message
    assert [s.image.name for s in report.samples] == ["big.png", "edge.png"]
    assert len(scan_folder(tmp_path, resolution=None, strict=False).samples) == 3


def test_invalid_resolution(tmp_path):
    make_pair(tmp_path, "a")
    with pytest.raises(ValueError, match="resolution must be a positive"):
        scan_folder(tmp_path, resolution=0)


def test_duplicate_stems(tmp_path):
    make_pair(tmp_path, "good")
    first = make_pair(tmp_path, "dup")
    second = make_image(tmp_path / "dup.jpg")
    error, report = problems_of(tmp_path)
    assert_flagged(error, report, first, "duplicate stem 'dup' (dup.jpg, dup.png)")
    assert_flagged(error, report, second, "duplicate stem 'dup'")
    assert [s.image.name for s in report.samples] == ["good.png"]


def test_problems_in_several_files_are_all_reported(tmp_path):
    make_pair(tmp_path, "good")
    make_image(tmp_path / "a.png")
    make_pair(tmp_path, "b", "")
    error, report = problems_of(tmp_path)
    assert [p.path.name for p in error.report.problems] == ["a.png", "b.png"]
    assert "2 problems" in str(error)
    assert [p.name for p in report.skipped] == ["a.png", "b.png"]


def test_lenient_scan_logs_a_warning(tmp_path, caplog):
    make_pair(tmp_path, "good")
    bad = make_image(tmp_path / "nocap.png")
    with caplog.at_level(logging.WARNING, logger="training.dataset"):
        scan_folder(tmp_path, strict=False)
    assert f"{bad}: missing caption" in caplog.text


def test_report_text(tmp_path):
    make_pair(tmp_path / "3_dog", "a")
    make_pair(tmp_path, "b")
    bad = make_image(tmp_path / "c.png")
    text = scan_folder(tmp_path, strict=False).text()
    assert text.splitlines()[0] == f"2 images found in {tmp_path} (4 per epoch with repeats), 1 problems, 1 skipped."
    assert f"  {bad}: missing caption" in text
    assert text.splitlines()[-2:] == ["Skipped:", f"  {bad}"]


# scan_folder: edit pairs -------------------------------------------------------------------------


def test_edit_pairs(tmp_path):
    target = make_pair(tmp_path, "a", "make it blue")
    control = make_image(tmp_path / "control" / "a.JPG", color=BLUE)
    kohya_target = make_pair(tmp_path / "5_edits", "b", "add a hat")
    kohya_control = make_image(tmp_path / "5_edits" / "control" / "b.webp")

    report = scan_folder(tmp_path, edit_pairs=True)

    assert report.samples == [
        Sample(kohya_target, "add a hat", kohya_control, 5, "5_edits"),
        Sample(target, "make it blue", control, 1, tmp_path.name),
    ]


def test_control_folder_is_not_training_data_without_edit_pairs(tmp_path):
    target = make_pair(tmp_path, "a")
    make_image(tmp_path / "control" / "a.png")
    make_image(tmp_path / "control" / "orphan.png")
    assert scan_folder(tmp_path).samples == [Sample(target, "a cat", None, 1, tmp_path.name)]


def test_target_without_control(tmp_path):
    make_pair(tmp_path, "a")
    make_image(tmp_path / "control" / "a.png")
    bad = make_pair(tmp_path, "lonely")
    error, report = problems_of(tmp_path, edit_pairs=True)
    assert_flagged(error, report, bad, "no control image: expected control/lonely.png")
    assert [s.image.name for s in report.samples] == ["a.png"]


def test_control_without_target(tmp_path):
    make_pair(tmp_path, "a")
    make_image(tmp_path / "control" / "a.png")
    orphan = make_image(tmp_path / "control" / "orphan.png")
    error, report = problems_of(tmp_path, edit_pairs=True)
    assert_flagged(error, report, orphan, "control image without a target: expected orphan.png")
    assert [s.image.name for s in report.samples] == ["a.png"]


def test_broken_control_disqualifies_its_target(tmp_path):
    make_pair(tmp_path, "good")
    make_image(tmp_path / "control" / "good.png")
    target = make_pair(tmp_path, "a")
    control = truncate(noisy_image(tmp_path / "control" / "a.png"))
    error, report = problems_of(tmp_path, edit_pairs=True)
    assert_flagged(error, report, control, "unreadable or truncated image")
    assert_flagged(error, report, target, f"its control image {control} has a problem")
    assert report.skipped == [target, control]


def test_duplicate_control_stems(tmp_path):
    make_pair(tmp_path, "good")
    make_image(tmp_path / "control" / "good.png")
    target = make_pair(tmp_path, "a")
    first = make_image(tmp_path / "control" / "a.jpg")
    second = make_image(tmp_path / "control" / "a.png")
    error, report = problems_of(tmp_path, edit_pairs=True)
    assert_flagged(error, report, first, "duplicate stem 'a' (a.jpg, a.png)")
    assert_flagged(error, report, second, "duplicate stem 'a'")
    assert_flagged(error, report, target, "its control image")


# scan_folder: folders that cannot be trained on --------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="Dataset folder not found: .*nowhere"):
        scan_folder(tmp_path / "nowhere")


def test_folder_is_a_file(tmp_path):
    path = make_image(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="is not a folder") as info:
        scan_folder(path)
    assert str(path) in str(info.value)
    assert info.value.report.samples == []


def test_folder_without_images(tmp_path):
    (tmp_path / "a.txt").write_text("caption without image")
    make_image(tmp_path / "b.gif")
    with pytest.raises(DatasetError, match="No images found in .*expected png/jpg/jpeg/webp/bmp") as info:
        scan_folder(tmp_path, strict=False)
    assert str(tmp_path) in str(info.value)


def test_lenient_scan_that_skips_everything_raises(tmp_path):
    bad = make_image(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="Every image .* has a problem") as info:
        scan_folder(tmp_path, strict=False)
    assert f"{bad}: missing caption" in str(info.value)
    assert info.value.report.skipped == [bad]


def test_dataset_error_is_a_value_error():
    report = ScanReport([], [Problem(Path("x.png"), "bad")], [])
    error = DatasetError("message", report)
    assert isinstance(error, ValueError) and error.report is report
    assert "x.png: bad" in report.text()


# tag_frequency -----------------------------------------------------------------------------------


def test_tag_frequency_in_kohya_shape():
    samples = [
        Sample(Path("a.png"), "cat, Red hat, ,cat", repeats=10, group="10_cat"),
        Sample(Path("b.png"), "cat,  sitting ", repeats=10, group="10_cat"),
        Sample(Path("c.png"), "a photo of a dog", group="data"),
    ]
    assert tag_frequency(samples) == {
        "10_cat": {"cat": 3, "red hat": 1, "sitting": 1},
        "data": {"a photo of a dog": 1},
    }
    assert tag_frequency([]) == {}


def test_a_caption_without_an_image_is_reported(tmp_path):
    make_pair(tmp_path, "a")
    (tmp_path / "b.txt").write_text("its image is a .heic the scan does not read")
    with pytest.raises(DatasetError, match=r"b\.txt: caption without an image"):
        scan_folder(tmp_path)
    report = scan_folder(tmp_path, strict=False)
    assert [s.image.name for s in report.samples] == ["a.png"] and "b.txt: caption without an image" in report.text()


def test_the_folder_fingerprint_follows_names_sizes_and_times(tmp_path):
    make_pair(tmp_path, "a")
    first = folder_fingerprint(tmp_path)
    assert folder_fingerprint(tmp_path) == first
    make_pair(tmp_path / "sub", "b")
    added = folder_fingerprint(tmp_path)
    (tmp_path / "a.txt").write_text("a dog, now", encoding="utf-8")
    recaptioned = folder_fingerprint(tmp_path)
    (tmp_path / "sub" / "b.png").rename(tmp_path / "sub" / "c.png")
    assert len({first, added, recaptioned, folder_fingerprint(tmp_path)}) == 4
