"""Metric curves against training step, drawn with matplotlib's Agg backend (no display needed): one chart per
metric, and one figure with every metric in its own panel (their scales differ: dB, [0, 1], loss)."""

from __future__ import annotations

import io
import math
from typing import Mapping, Optional, Sequence

LABELS = {"val_loss": "validation loss (fixed timesteps and noise)", "psnr": "PSNR vs target (dB)",
          "ssim": "SSIM vs target", "lpips": "LPIPS vs target (lower is better)",
          "keep_psnr": "PSNR of the kept region (dB)", "keep_ssim": "SSIM of the kept region",
          "keep_lpips": "LPIPS of the kept region (lower is better)"}


def _figure(rows: int = 1, cols: int = 1, size: Optional[tuple[float, float]] = None):
    from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = Figure(figsize=size or (6.4, 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, cols, squeeze=False)
    return figure, [ax for row in axes for ax in row]


def _draw(ax, xs: Sequence[float], ys: Sequence[float], title: str, x_label: str, y_label: str) -> None:
    from matplotlib.ticker import MaxNLocator

    points = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color="tab:blue")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
    ax.grid(True, alpha=0.3)


def _png(figure) -> bytes:
    buf = io.BytesIO()
    figure.savefig(buf, format="png")
    return buf.getvalue()


def line_plot(xs: Sequence[float], ys: Sequence[float], title: str, x_label: str, y_label: str) -> bytes:
    """PNG bytes: the points (xs[i], ys[i]) joined by a line (non-finite ys left out), with labelled axes."""
    if len(xs) != len(ys) or not xs:
        raise ValueError("line_plot needs as many ys as xs, and at least one point")
    figure, (ax,) = _figure()
    _draw(ax, xs, ys, title, x_label, y_label)
    return _png(figure)


def metric_plots(steps: Sequence[int], table: Mapping[int, Mapping[str, float]], metrics: Sequence[str]
                 ) -> tuple[dict[str, bytes], bytes]:
    """({metric: PNG of its curve}, PNG of every curve in one figure) for the rows {step: {metric: value}}."""
    if not steps or not metrics:
        raise ValueError("metric_plots needs at least one step and one metric")
    singles = {m: line_plot(steps, [table[s].get(m, math.nan) for s in steps], LABELS.get(m, m), "step", m)
               for m in metrics}
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    figure, axes = _figure(rows, cols, size=(4.2 * cols, 3.2 * rows))
    for ax, m in zip(axes, metrics):
        _draw(ax, steps, [table[s].get(m, math.nan) for s in steps], LABELS.get(m, m), "step", m)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    return singles, _png(figure)


__all__ = ["LABELS", "line_plot", "metric_plots"]
