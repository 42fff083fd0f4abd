"""Line plots drawn with PIL (no matplotlib), returned as a ComfyUI-style IMAGE tensor.

Used for reward-per-frame plots and for reward/loss curves during training.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# Distinct colours for up to 8 series (cycled beyond).
PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75), (227, 119, 194), (23, 190, 207))
BACKGROUND = (255, 255, 255)
AXIS = (40, 40, 40)
GRID = (225, 225, 225)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable on Pillow >= 10.1
    except TypeError:
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def format_tick(value: float) -> str:
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1e4 or magnitude < 1e-3:
        return f"{value:.2e}"
    return f"{value:.4g}"


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [low, high] (1, 2, 5 x 10^k steps)."""
    span = high - low
    raw = span / max(count, 1)
    step = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * step:
            step *= factor
            break
    first = math.ceil(low / step - 1e-9)
    last = math.floor(high / step + 1e-9)
    # Integer multiples of the step, rounded: no 0.6000000000000001 from repeated addition.
    return [round(k * step, 12) + 0.0 for k in range(first, last + 1)]


def _value_range(series: Mapping[str, Sequence[float]]) -> tuple[float, float]:
    finite = [float(v) for values in series.values() for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return 0.0, 1.0
    low, high = min(finite), max(finite)
    if high - low < 1e-12 * max(1.0, abs(high)):
        pad = max(abs(high) * 0.05, 0.5)  # flat line: give it some room
        return low - pad, high + pad
    pad = (high - low) * 0.05
    return low - pad, high + pad


def plot_series(
    series: Mapping[str, Sequence[float]],
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    width: int = 640,
    height: int = 360,
    x: Sequence[float] | None = None,
) -> torch.Tensor:
    """Plot named series -> (1, height, width, 3) float32 in [0, 1].

    x: the x position of each point (finite numbers, one per point; uneven spacing is kept) and the
    x tick labels, one at each of them; default: the index 0..n-1 with about 8 integer ticks.
    Non-finite values (NaN, inf) leave gaps in a line. A series of one point is drawn as a dot.
    """
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = _font(12)
    title_font = _font(14)

    low, high = _value_range(series)
    y_ticks = nice_ticks(low, high)
    tick_labels = [format_tick(v) for v in y_ticks]
    label_width = max([_text_width(draw, t, font) for t in tick_labels] + [0])
    left = 14 + label_width + (16 if ylabel else 0)
    right = width - 12
    top = 28 if title else 12
    bottom = height - (36 if xlabel else 24)
    plot_w, plot_h = max(right - left, 1), max(bottom - top, 1)

    length = max([len(v) for v in series.values()] + [1])
    positions = [float(i) for i in range(length)] if x is None else [float(v) for v in x]
    if len(positions) < length or not all(math.isfinite(v) for v in positions):
        raise ValueError(f"plot_series: x needs {length} finite positions, got {list(x or [])}")
    x_low, x_high = min(positions), max(positions)
    x_span = x_high - x_low

    def to_px(index: int, value: float) -> tuple[float, float]:
        px = left + plot_w * ((positions[index] - x_low) / x_span if x_span > 0 else 0.5)
        y = bottom - plot_h * (value - low) / (high - low)
        return px, y

    # Grid and y tick labels.
    for value, label in zip(y_ticks, tick_labels):
        _, y = to_px(0, value)
        draw.line([(left, y), (right, y)], fill=GRID, width=1)
        draw.text((left - 6 - _text_width(draw, label, font), y - 7), label, fill=AXIS, font=font)
    # x tick labels: about 8 integer indices, or every given x position (a label that would overlap
    # the previous one is left out; its tick stays).
    step = max(1, math.ceil(length / 8)) if x is None else 1
    label_end = -math.inf
    for index in range(0, length, step):
        px, _ = to_px(index, low)
        draw.line([(px, bottom), (px, bottom + 4)], fill=AXIS, width=1)
        label = str(index) if x is None else format_tick(positions[index])
        start = px - _text_width(draw, label, font) / 2
        if start > label_end + 4:
            draw.text((start, bottom + 5), label, fill=AXIS, font=font)
            label_end = start + _text_width(draw, label, font)
    draw.rectangle([left, top, right, bottom], outline=AXIS, width=1)

    # Lines (broken at non-finite values).
    for number, (name, values) in enumerate(series.items()):
        colour = PALETTE[number % len(PALETTE)]
        run: list[tuple[float, float]] = []
        for index, value in enumerate(list(values) + [float("nan")]):
            if value is not None and math.isfinite(float(value)):
                run.append(to_px(index, float(value)))
                continue
            if len(run) > 1:
                draw.line(run, fill=colour, width=2, joint="curve")
            for x, y in run if len(run) == 1 else ():
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
            run = []

    # Legend (top right, inside the plot) when there is more than one series or a named one.
    names = [n for n in series if n]
    if names:
        line_h = 16
        legend_w = max(_text_width(draw, n, font) for n in names) + 30
        x0 = right - legend_w - 6
        y0 = top + 6
        draw.rectangle([x0, y0, right - 6, y0 + line_h * len(names) + 4], fill=BACKGROUND, outline=GRID)
        for number, name in enumerate(series):
            if not name:
                continue
            colour = PALETTE[number % len(PALETTE)]
            y = y0 + 4 + line_h * number
            draw.line([(x0 + 6, y + 7), (x0 + 20, y + 7)], fill=colour, width=3)
            draw.text((x0 + 24, y), name, fill=AXIS, font=font)

    if title:
        draw.text(((width - _text_width(draw, title, title_font)) / 2, 6), title, fill=AXIS, font=title_font)
    if xlabel:
        draw.text(((left + right - _text_width(draw, xlabel, font)) / 2, height - 17), xlabel, fill=AXIS, font=font)
    if ylabel:
        # Vertical label: draw on a small canvas and rotate.
        label_w = _text_width(draw, ylabel, font) + 4
        canvas = Image.new("RGB", (label_w, 16), BACKGROUND)
        ImageDraw.Draw(canvas).text((2, 1), ylabel, fill=AXIS, font=font)
        rotated = canvas.rotate(90, expand=True)
        image.paste(rotated, (2, int(top + (plot_h - rotated.height) / 2)))

    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).unsqueeze(0)
