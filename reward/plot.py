"""Line plots drawn with PIL (no matplotlib), returned as a ComfyUI-style IMAGE tensor.

Used for reward-per-frame plots and for reward/loss curves during training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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


@dataclass(frozen=True)
class _Frame:
    """Where the plot area sits in the image and how data maps onto it."""

    left: int
    right: int
    top: int
    bottom: int
    low: float
    high: float
    length: int  # points of the longest series
    positions: tuple[float, ...] | None = None  # x of each point (None: its index)

    def to_px(self, index: int, value: float) -> tuple[float, float]:
        plot_w, plot_h = max(self.right - self.left, 1), max(self.bottom - self.top, 1)
        if self.positions is None:
            fraction = index / max(self.length - 1, 1) if self.length > 1 else 0.5
        else:
            low, high = min(self.positions), max(self.positions)
            fraction = (self.positions[index] - low) / (high - low) if high > low else 0.5
        y = self.bottom - plot_h * (value - self.low) / (self.high - self.low)
        return self.left + plot_w * fraction, y


def _draw_axes(draw: ImageDraw.ImageDraw, frame: _Frame, y_ticks: Sequence[float], tick_labels: Sequence[str],
               font) -> None:
    """Grid and y tick labels, x ticks (about 8 integer indices, or every given x position: a label
    that would overlap the previous one is left out, its tick stays), the plot's box."""
    for value, label in zip(y_ticks, tick_labels):
        _, y = frame.to_px(0, value)
        draw.line([(frame.left, y), (frame.right, y)], fill=GRID, width=1)
        draw.text((frame.left - 6 - _text_width(draw, label, font), y - 7), label, fill=AXIS, font=font)
    step = max(1, math.ceil(frame.length / 8)) if frame.positions is None else 1
    label_end = -math.inf
    for index in range(0, frame.length, step):
        x, _ = frame.to_px(index, frame.low)
        draw.line([(x, frame.bottom), (x, frame.bottom + 4)], fill=AXIS, width=1)
        label = str(index) if frame.positions is None else format_tick(frame.positions[index])
        start = x - _text_width(draw, label, font) / 2
        if frame.positions is None or start > label_end + 4:
            draw.text((start, frame.bottom + 5), label, fill=AXIS, font=font)
            label_end = start + _text_width(draw, label, font)
    draw.rectangle([frame.left, frame.top, frame.right, frame.bottom], outline=AXIS, width=1)


def _draw_lines(draw: ImageDraw.ImageDraw, frame: _Frame, series: Mapping[str, Sequence[float]]) -> None:
    """One line per series, broken at non-finite values; a lone finite point is a dot."""
    for number, values in enumerate(series.values()):
        colour = PALETTE[number % len(PALETTE)]
        run: list[tuple[float, float]] = []
        for index, value in enumerate(list(values) + [float("nan")]):
            if value is not None and math.isfinite(float(value)):
                run.append(frame.to_px(index, float(value)))
                continue
            if len(run) > 1:
                draw.line(run, fill=colour, width=2, joint="curve")
            for x, y in run if len(run) == 1 else ():
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
            run = []


def _draw_legend(draw: ImageDraw.ImageDraw, frame: _Frame, series: Mapping[str, Sequence[float]], font) -> None:
    """Top right, inside the plot, when some series has a name."""
    names = [n for n in series if n]
    if not names:
        return
    line_h = 16
    legend_w = max(_text_width(draw, n, font) for n in names) + 30
    x0 = frame.right - legend_w - 6
    y0 = frame.top + 6
    draw.rectangle([x0, y0, frame.right - 6, y0 + line_h * len(names) + 4], fill=BACKGROUND, outline=GRID)
    for number, name in enumerate(series):
        if not name:
            continue
        colour = PALETTE[number % len(PALETTE)]
        y = y0 + 4 + line_h * number
        draw.line([(x0 + 6, y + 7), (x0 + 20, y + 7)], fill=colour, width=3)
        draw.text((x0 + 24, y), name, fill=AXIS, font=font)


def _draw_titles(image: Image.Image, draw: ImageDraw.ImageDraw, frame: _Frame, title: str, xlabel: str, ylabel: str,
                 font, title_font) -> None:
    width, height = image.size
    if title:
        draw.text(((width - _text_width(draw, title, title_font)) / 2, 6), title, fill=AXIS, font=title_font)
    if xlabel:
        draw.text(((frame.left + frame.right - _text_width(draw, xlabel, font)) / 2, height - 17), xlabel, fill=AXIS,
                  font=font)
    if ylabel:
        # Vertical label: draw on a small canvas and rotate.
        label_w = _text_width(draw, ylabel, font) + 4
        canvas = Image.new("RGB", (label_w, 16), BACKGROUND)
        ImageDraw.Draw(canvas).text((2, 1), ylabel, fill=AXIS, font=font)
        rotated = canvas.rotate(90, expand=True)
        plot_h = max(frame.bottom - frame.top, 1)
        image.paste(rotated, (2, int(frame.top + (plot_h - rotated.height) / 2)))


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
    length = max([len(v) for v in series.values()] + [1])
    positions = None if x is None else tuple(float(v) for v in x)
    if positions is not None and (len(positions) < length or not all(math.isfinite(v) for v in positions)):
        raise ValueError(f"plot_series: x needs {length} finite positions, got {list(x)}")
    frame = _Frame(left=14 + label_width + (16 if ylabel else 0), right=width - 12, top=28 if title else 12,
                   bottom=height - (36 if xlabel else 24), low=low, high=high, length=length, positions=positions)
    _draw_axes(draw, frame, y_ticks, tick_labels, font)
    _draw_lines(draw, frame, series)
    _draw_legend(draw, frame, series, font)
    _draw_titles(image, draw, frame, title, xlabel, ylabel, font, title_font)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).unsqueeze(0)
