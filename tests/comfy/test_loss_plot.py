"""The loss chart (glue/loss_plot.py) read back pixel by pixel: the running average where the loop's EMA puts
it, dashed markers at the sample and checkpoint steps only, and a chart for every odd input."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest


@pytest.fixture(scope="module")
def plot(pack):
    return pack.glue.loss_plot


def _pixels(image) -> np.ndarray:
    assert image.shape[0] == 1 and image.shape[-1] == 3
    return (image[0].numpy() * 255).round().astype(np.uint8)


def _where(plot, image, colour) -> tuple[np.ndarray, np.ndarray]:
    """(ys, xs) of the pixels exactly ``colour`` inside the plot's frame (the legend is above it)."""
    ys, xs = np.nonzero(np.all(_pixels(image) == colour, axis=-1))
    inside = (plot.TOP < ys) & (ys < plot.BOTTOM)
    return ys[inside], xs[inside]


def _x_of(plot, step: int, total: int) -> int:
    return round(plot.LEFT + step / total * (plot.RIGHT - plot.LEFT))


def _decreasing(n: int = 30) -> list[tuple[int, float]]:
    rng = random.Random(0)
    return [(10 * i, 0.08 + 0.12 * math.exp(-i / 8) + rng.gauss(0, 0.015)) for i in range(1, n + 1)]


def test_smoothed_is_the_loops_running_average(plot, pack):
    decay = pack.training.loop.EMA_DECAY
    assert decay == 0.9
    steps, values = zip(*plot.smoothed([(5, 1.0), (10, 0.0), (15, 0.5)]))
    assert steps == (5, 10, 15) and values == pytest.approx((1.0, decay, decay * decay + (1 - decay) * 0.5))
    assert plot.smoothed([]) == []


def test_ticks_are_one_two_or_five_times_a_power_of_ten(plot):
    assert [plot.tick_step(span, count) for span, count in ((300, 8), (0.23, 5), (1, 8), (7000, 8))] == \
        pytest.approx([50, 0.05, 0.2, 1000])
    ticks = plot.loss_ticks([0.0612, 0.2003])
    assert ticks[0] <= 0.0612 and ticks[-1] >= 0.2003 and len(ticks) >= 3
    assert np.allclose(np.diff(ticks), 0.05)


def test_the_smoothed_line_is_drawn_where_the_running_average_is(plot):
    losses = _decreasing()
    image = plot.loss_curve_image(losses, total=300)
    ys, xs = _where(plot, image, plot.SMOOTH)
    assert len(xs) > 0
    average = plot.smoothed(losses)
    drawn = [ys[xs == _x_of(plot, step, 300)].mean() for step, _ in average]
    slope, offset = np.polyfit([v for _, v in average], drawn, 1)
    assert slope < 0  # a higher loss is higher up
    residual = np.abs(np.polyval((slope, offset), [v for _, v in average]) - drawn)
    assert residual.max() < 2, residual  # on the average, not on the noisy raw values
    assert max(drawn) - min(drawn) > (plot.BOTTOM - plot.TOP) / 3  # the range fits the data, not squashed
    assert len(_where(plot, image, plot.RAW)[0]) > 0


def test_markers_are_dashed_at_the_sample_and_checkpoint_steps(plot):
    image = plot.loss_curve_image(_decreasing(), total=300, sample_steps=[100], checkpoint_steps=[150, 300])
    for colour, steps in ((plot.SAMPLE, [100]), (plot.CHECKPOINT, [150, 300])):
        ys, xs = _where(plot, image, colour)
        assert set(xs) == {_x_of(plot, s, 300) for s in steps}
        column = ys[xs == _x_of(plot, steps[0], 300)]
        assert len(column) > (plot.BOTTOM - plot.TOP) / 3  # spans the plot ...
        assert len(column) < plot.BOTTOM - plot.TOP - 10  # ... with gaps
    plain = plot.loss_curve_image(_decreasing(), total=300)
    for colour in (plot.SAMPLE, plot.CHECKPOINT):  # nowhere, the legend included
        assert not np.all(_pixels(plain) == colour, axis=-1).any()


def test_the_x_axis_runs_to_the_total_not_the_last_step(plot):
    losses = _decreasing(10)  # up to step 100 of 400
    ys, xs = _where(plot, plot.loss_curve_image(losses, total=400), plot.SMOOTH)
    assert abs(xs.max() - _x_of(plot, 100, 400)) <= 2


@pytest.mark.parametrize("losses", [
    [], [(5, 0.3)], [(s, 0.25) for s in range(10, 101, 10)], [(1, math.nan), (2, 0.5), (3, math.inf), (4, 0.4)],
    [(1, math.nan)], [(1, -math.inf), (2, 1e-8), (3, 2e-8)],
], ids=["empty", "one point", "constant", "nan and inf", "only nan", "tiny"])
def test_every_input_gives_a_chart(plot, losses):
    image = plot.loss_curve_image(losses, title="odd", sample_steps=[0, 3], checkpoint_steps=[4])
    assert image.shape == (1, plot.HEIGHT, plot.WIDTH, 3) and image.dtype.is_floating_point
    assert 0 <= image.min() and image.max() <= 1
    ys, xs = _where(plot, image, plot.SMOOTH)
    finite = [(s, v) for s, v in losses if math.isfinite(v)]
    if not finite:
        assert len(xs) == 0
        return
    assert len(xs) > 0
    if len({v for _, v in finite}) == 1:  # a flat line (or a dot) in the middle, not on the frame
        assert ys.max() - ys.min() <= 6
        assert abs(ys.mean() - (plot.TOP + plot.BOTTOM) / 2) < (plot.BOTTOM - plot.TOP) / 4


def test_the_probe_is_drawn_at_its_steps_and_values_and_summarised(plot):
    losses = _decreasing()  # 0.09 .. 0.19
    probe = [(0, 0.23), (300, 0.1)]  # above the losses: the y range grows to hold it
    image = plot.loss_curve_image(losses, total=300, probe=probe)
    ys, xs = _where(plot, image, plot.PROBE)
    ticks = plot.loss_ticks([v for _, v in losses] + [0.23, 0.1])

    def y_of(value):
        return round(plot.BOTTOM - (value - ticks[0]) / (ticks[-1] - ticks[0]) * (plot.BOTTOM - plot.TOP))

    for step, value in probe:  # a diamond centred on each point
        x = _x_of(plot, step, 300)
        near = np.abs(xs - x) <= 6
        assert near.sum() > 20 and abs(ys[near & (np.abs(xs - x) <= 1)].mean() - y_of(value)) <= 2
    between = (xs > _x_of(plot, 0, 300) + 10) & (xs < _x_of(plot, 300, 300) - 10)
    assert between.any()  # the dashed line joins them
    assert ys[between].min() >= y_of(0.23) - 4 and ys[between].max() <= y_of(0.1) + 4
    summary = np.all(_pixels(image)[: plot.TOP] == plot.PROBE, axis=-1)
    assert summary.any()  # the "probe loss ... -> ..." line and the legend sit above the plot
    plain = plot.loss_curve_image(losses, total=300)
    assert not np.all(_pixels(plain) == plot.PROBE, axis=-1).any()
    single = plot.loss_curve_image(losses, total=300, probe=[(0, 0.23)])  # a cancelled run: one diamond, no line
    ys, xs = _where(plot, single, plot.PROBE)
    assert len(xs) > 0 and xs.max() - xs.min() <= 12 + 40  # the diamond and its label only
