"""A small line chart drawn with PIL (no matplotlib dependency): validation loss against step."""

from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw

MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 70, 20, 30, 40


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high == low:
        return [low]
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def line_plot(xs: Sequence[float], ys: Sequence[float], title: str, x_label: str, y_label: str,
              size: tuple[int, int] = (640, 400)) -> Image.Image:
    """Points (xs[i], ys[i]) joined by a line, with labelled min/max ticks on both axes."""
    if len(xs) != len(ys) or not xs:
        raise ValueError("line_plot needs as many ys as xs, and at least one point")
    width, height = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = MARGIN_LEFT, width - MARGIN_RIGHT, MARGIN_TOP, height - MARGIN_BOTTOM
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = min(ys), max(ys)
    pad = (y_hi - y_lo) * 0.05 or abs(y_hi) * 0.05 or 1.0
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def to_px(x: float, y: float) -> tuple[float, float]:
        fx = 0.5 if x_hi == x_lo else (x - x_lo) / (x_hi - x_lo)
        return left + fx * (right - left), bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top)

    draw.rectangle([left, top, right, bottom], outline="black")
    for tick in _ticks(y_lo, y_hi):
        _, py = to_px(x_lo, tick)
        draw.line([left - 4, py, left, py], fill="black")
        draw.text((4, py - 6), f"{tick:.4g}", fill="black")
    for tick in sorted(set(xs)) if len(set(xs)) <= 8 else _ticks(x_lo, x_hi):
        px, _ = to_px(tick, y_lo)
        draw.line([px, bottom, px, bottom + 4], fill="black")
        draw.text((px - 10, bottom + 6), f"{tick:g}", fill="black")
    points = [to_px(x, y) for x, y in zip(xs, ys)]
    if len(points) > 1:
        draw.line(points, fill=(31, 119, 180), width=2)
    for px, py in points:
        draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=(31, 119, 180))
    draw.text((left, 8), title, fill="black")
    draw.text(((left + right) // 2 - 10, height - 16), x_label, fill="black")
    draw.text((4, top - 22), y_label, fill="black")
    return img


__all__ = ["line_plot"]
