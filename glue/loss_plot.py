"""The loss curve as a ComfyUI IMAGE, drawn with PIL (no plotting library needed)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 640, 360, 48


def loss_curve_image(losses: list[tuple[int, float]], title: str = "") -> torch.Tensor:
    """[1, H, W, 3] float in [0, 1]: loss per logging interval against the step."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = MARGIN, MARGIN // 2, WIDTH - MARGIN // 2, HEIGHT - MARGIN
    draw.rectangle((left, top, right, bottom), outline="black")
    draw.text((left, 4), title or "training loss", fill="black")
    if losses:
        steps = [s for s, _ in losses]
        values = [v for _, v in losses]
        lo, hi = min(values), max(values)
        span_x, span_y = max(steps[-1] - steps[0], 1), max(hi - lo, 1e-12)

        def point(step: int, value: float) -> tuple[float, float]:
            x = left + (step - steps[0]) / span_x * (right - left)
            return x, bottom - (value - lo) / span_y * (bottom - top)

        points = [point(s, v) for s, v in losses]
        if len(points) == 1:
            draw.ellipse((points[0][0] - 3, points[0][1] - 3, points[0][0] + 3, points[0][1] + 3), fill="blue")
        else:
            draw.line(points, fill="blue", width=2)
        draw.text((4, top), f"{hi:.4f}", fill="black")
        draw.text((4, bottom - 10), f"{lo:.4f}", fill="black")
        draw.text((left, bottom + 6), f"step {steps[0]}", fill="black")
        draw.text((right - 70, bottom + 6), f"step {steps[-1]}", fill="black")
    else:
        draw.text((left + 10, (top + bottom) // 2), "no loss recorded yet", fill="black")
    return image_tensor(image)


def image_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL RGB image as a ComfyUI IMAGE: [1, H, W, 3] float in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]
