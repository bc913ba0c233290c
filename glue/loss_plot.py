"""The loss curve as a ComfyUI IMAGE, drawn with PIL (no plotting library needed): the raw loss per logging
interval, its running average as the loop reports it, the probe loss (fixed noise, so its fall is what the LoRA
learned) where it was measured, nice ticks on both axes, and dashed markers at the sample and checkpoint steps."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..training.loop import EMA_DECAY

WIDTH, HEIGHT = 768, 400
LEFT, TOP, RIGHT, BOTTOM = 72, 44, WIDTH - 20, HEIGHT - 44  # the plot area inside the axes
RAW, SMOOTH, SAMPLE, CHECKPOINT = (160, 190, 235), (20, 50, 140), (245, 130, 0), (0, 150, 60)
PROBE, GRID, INK = (170, 0, 170), (232, 232, 232), (0, 0, 0)


def smoothed(losses: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The exponential moving average of the interval losses, as training/loop.py reports it."""
    s, out = None, []
    for step, v in losses:
        s = v if s is None else EMA_DECAY * s + (1 - EMA_DECAY) * v
        out.append((step, s))
    return out


def tick_step(span: float, count: int) -> float:
    """The 1, 2 or 5 x 10^k spacing that cuts ``span`` into about ``count`` parts."""
    raw = span / count
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))


def loss_ticks(values: list[float]) -> list[float]:
    """The y ticks, first and last enclosing the values; a constant gets a band around it."""
    lo, hi = min(values), max(values)
    if hi - lo <= 1e-9 * abs(hi):
        pad = max(abs(lo) * 0.1, 1e-3)
        lo, hi = lo - pad, hi + pad
    step = tick_step(hi - lo, 5)
    return [i * step for i in range(math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9) + 1)]


def loss_curve_image(losses: list[tuple[int, float]], title: str = "", total: int | None = None,
                     sample_steps: Sequence[int] = (), checkpoint_steps: Sequence[int] = (),
                     probe: Sequence[tuple[int, float]] = ()) -> torch.Tensor:
    """[1, H, W, 3] float in [0, 1]: loss per logging interval against the step (0..total), and the probe loss
    (``TrainResult.probe``) as labelled diamonds joined by a dashed line."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    losses = [(step, v) for step, v in losses if math.isfinite(v)]  # a diverged interval has no place to go
    probe = [(step, v) for step, v in probe if math.isfinite(v)]
    total = max(total or 0, losses[-1][0] if losses else 0, probe[-1][0] if probe else 0, 1)
    values = [v for _, v in losses + probe]
    y_ticks = loss_ticks(values) if values else [0.0, 0.5, 1.0]
    lo, hi = y_ticks[0], y_ticks[-1]

    def x_of(step: float) -> int:
        return round(LEFT + step / total * (RIGHT - LEFT))

    def y_of(value: float) -> int:
        return round(BOTTOM - (value - lo) / (hi - lo) * (BOTTOM - TOP))

    for step in range(0, total + 1, max(1, round(tick_step(total, 8)))):
        draw.line((x_of(step), TOP, x_of(step), BOTTOM), fill=GRID)
        label = f"{step:g}"
        draw.text((x_of(step) - draw.textlength(label, font=font) / 2, BOTTOM + 5), label, fill=INK, font=font)
    digits = max(0, -math.floor(math.log10(y_ticks[1] - y_ticks[0]) + 1e-9))
    for value in y_ticks:
        draw.line((LEFT, y_of(value), RIGHT, y_of(value)), fill=GRID)
        label = f"{value:.{digits}f}" if digits <= 5 else f"{value:.3g}"
        draw.text((LEFT - 6 - draw.textlength(label, font=font), y_of(value) - 6), label, fill=INK, font=font)
    draw.rectangle((LEFT, TOP, RIGHT, BOTTOM), outline=INK)
    draw.text(((LEFT + RIGHT) / 2 - 10, BOTTOM + 22), "step", fill=INK, font=font)
    _vertical_text(image, "loss", 8, (TOP + BOTTOM) // 2, font)
    draw.text((LEFT, 8), title or "training loss", fill=INK, font=font)

    for steps, colour, phase in ((sample_steps, SAMPLE, 0), (checkpoint_steps, CHECKPOINT, 4)):
        for step in (s for s in steps if 0 <= s <= total):  # dashes 4 on 4 off: both show where they meet
            for y in range(TOP + 1 + phase, BOTTOM, 8):
                draw.line((x_of(step), y, x_of(step), min(y + 3, BOTTOM - 1)), fill=colour)
    legend = [("samples", SAMPLE)] * bool(sample_steps) + [("checkpoints", CHECKPOINT)] * bool(checkpoint_steps)
    if probe:
        _draw_probe(draw, font, [(x_of(s), y_of(v), v) for s, v in probe])
        legend.append(("probe (fixed noise)", PROBE))
    if len(probe) >= 2 and probe[0][1]:
        (first_step, first), (last_step, last) = probe[0], probe[-1]
        summary = f"probe loss, step {first_step} -> {last_step}: {first:.4g} -> {last:.4g} ({last / first - 1:+.0%})"
        draw.text((RIGHT - draw.textlength(summary, font=font), 8), summary, fill=PROBE, font=font)
    if not losses:
        draw.text((LEFT + 12, (TOP + BOTTOM) // 2), "no loss recorded yet", fill=INK, font=font)
        _legend(draw, font, legend)
        return image_tensor(image)
    average = smoothed(losses)
    if len(losses) == 1:
        x, y = x_of(average[0][0]), y_of(average[0][1])
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=SMOOTH)
    else:
        draw.line([(x_of(s), y_of(v)) for s, v in losses], fill=RAW, width=1)
        draw.line([(x_of(s), y_of(v)) for s, v in average], fill=SMOOTH, width=3, joint="curve")
    (step, last), (_, avg) = losses[-1], average[-1]
    draw.text((LEFT, 24), f"step {step}: raw {last:.4g} (avg {avg:.4g})", fill=INK, font=font)
    _legend(draw, font, [("raw", RAW), ("smoothed (running average)", SMOOTH), *legend])
    return image_tensor(image)


def _draw_probe(draw: ImageDraw.ImageDraw, font, points: list[tuple[int, int, float]]) -> None:
    """Diamonds at the probe's points, a dashed line between them, each value written beside its diamond."""
    for (x0, y0, _), (x1, y1, _) in zip(points, points[1:]):
        length = max(math.hypot(x1 - x0, y1 - y0), 1)
        for start in range(0, int(length), 10):
            a, b = start / length, min(start + 6, length) / length
            draw.line((x0 + a * (x1 - x0), y0 + a * (y1 - y0), x0 + b * (x1 - x0), y0 + b * (y1 - y0)),
                      fill=PROBE, width=2)
    for index, (x, y, value) in enumerate(points):
        draw.polygon([(x, y - 6), (x + 6, y), (x, y + 6), (x - 6, y)], fill=PROBE)
        label = f"{value:.4g}"
        width = draw.textlength(label, font=font)
        left = x + 9 if index < len(points) - 1 or x + 9 + width <= RIGHT else x - 9 - width  # the last: inside
        draw.text((left, y - 14), label, fill=PROBE, font=font)


def _legend(draw: ImageDraw.ImageDraw, font, entries: list[tuple[str, tuple[int, int, int]]]) -> None:
    """One row above the plot, flush right: a short line of each colour, then its name."""
    x = RIGHT
    for name, colour in reversed(entries):
        x -= draw.textlength(name, font=font)
        draw.text((x, 24), name, fill=INK, font=font)
        draw.line((x - 22, 30, x - 4, 30), fill=colour, width=3)
        x -= 36


def _vertical_text(image: Image.Image, text: str, x: int, y: int, font) -> None:
    """``text`` turned a quarter left, its left edge at ``x`` and its middle at ``y`` (the y axis title)."""
    mask = Image.new("L", (int(ImageDraw.Draw(image).textlength(text, font=font)) + 2, 16))
    ImageDraw.Draw(mask).text((1, 1), text, fill=255, font=font)
    mask = mask.rotate(90, expand=True)
    image.paste(INK, (x, y - mask.height // 2), mask)


def image_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL RGB image as a ComfyUI IMAGE: [1, H, W, 3] float in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]
