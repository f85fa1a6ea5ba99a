"""The names of the held-out measurements, which way each is better, and the best checkpoint by one of them.

Free of torch, so `run.py compare --help` lists the metrics at once."""

from __future__ import annotations

import math
from typing import Mapping

#: Every score, and whether a higher value is better (val_loss: the flow-matching validation loss; the others:
#: toolkit.train.edit_metrics).
HIGHER_IS_BETTER: dict[str, bool] = {"val_loss": False, "psnr": True, "ssim": True, "lpips": False,
                                     "keep_psnr": True, "keep_ssim": True, "keep_lpips": False}


def best_step(table: Mapping[int, Mapping[str, float]], metric: str) -> tuple[int, float]:
    """(step, value) of the best row of {step: {metric: value}} for `metric` (HIGHER_IS_BETTER says which way);
    the earliest step wins a tie. KeyError naming the metrics there are when no row has it."""
    if metric not in HIGHER_IS_BETTER:
        raise KeyError(f"unknown metric {metric!r}; known: {', '.join(HIGHER_IS_BETTER)}")
    rows = [(step, row[metric]) for step, row in sorted(table.items())
            if metric in row and not math.isnan(row[metric])]
    if not rows:
        have = sorted({k for row in table.values() for k in row})
        raise KeyError(f"no checkpoint has a {metric!r} value (measured: {', '.join(have) or 'nothing'})")
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    return max(rows, key=lambda r: (sign * r[1], -r[0]))


__all__ = ["HIGHER_IS_BETTER", "best_step"]
