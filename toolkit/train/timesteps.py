"""ai-toolkit's way of drawing flow-matching training times: a table of 1000 times, then an index into it.

ai-toolkit's flow-matching scheduler builds, every step, a descending table of num_train_timesteps (1000) times on
the 0..1000 scale (`timestep_table`); the step then picks one index per sample (`table_indices`), uniformly
("balanced") or cubically skewed towards the noisy end ("content") or the clean end ("style"), and trains at
t = table[index] / 1000. The time t in [0, 1] is the noise fraction of x_t = (1 - t) x0 + t noise.

Tables (index 0 is the noisiest):
    linear, weighted   linspace(1000, 1)
    sigmoid            sorted 1000 * (1 - sigmoid(N(0, 1))), drawn anew each step
    shift, flux_shift  sigma = linspace(1, 0.001) moved by FLUX's resolution shift: e^mu / (e^mu + 1/sigma - 1)
    lognorm_blend      750 draws of 1000 * (1 - L / max L), L ~ LogNormal(0, 0.333), and linspace(1000, 1) with
                       250 points; sorted, truncated to integers (drawn anew each step)

Index rules (ai-toolkit's, for flow matching): balanced is uniform over 0..998 (torch.randint's exclusive upper bound
leaves out the last, least noisy entry); content is floor(1000 u^3), style floor(1000 (1 - u^3)), u ~ U(0, 1),
clamped to 0..999.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = ["ContentOrStyle", "NUM_TRAIN_TIMESTEPS", "TABLE_KINDS", "draw", "table_indices", "timestep_table"]

ContentOrStyle = Literal["balanced", "content", "style"]
NUM_TRAIN_TIMESTEPS = 1000
TABLE_KINDS = ("flux_shift", "lognorm_blend")  # drawn only through the table; other kinds when content/style asks
_LOGNORM_SHARE = 0.75  # ai-toolkit's alpha: share of log-normal times in lognorm_blend
_LOGNORM_SCALE = 0.333


def timestep_table(kind: str, generator: torch.Generator, mu: float, num: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """Descending times on the 0..1000 scale, (num,) fp32 on the generator's device; `mu`: the resolution shift
    (toolkit.train.flow_matching.resolution_shift_mu) used by shift / flux_shift."""
    dev = generator.device
    if kind in ("linear", "weighted"):
        return torch.linspace(1000.0, 1.0, num, device=dev)
    if kind == "sigmoid":
        drawn = (1.0 - torch.sigmoid(torch.randn(num, generator=generator, device=dev))) * 1000.0
        return torch.sort(drawn, descending=True).values
    if kind in ("shift", "flux_shift"):
        sigmas = torch.linspace(1000.0, 1.0, num, device=dev, dtype=torch.float64) / 1000.0
        shifted = math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
        return (shifted.float() * 1000.0)
    if kind == "lognorm_blend":
        count = int(num * _LOGNORM_SHARE)
        lognormal = torch.exp(_LOGNORM_SCALE * torch.randn(count, generator=generator, device=dev))
        noisy = (1.0 - lognormal / lognormal.max()) * 1000.0
        even = torch.linspace(1000.0, 1.0, int(num * (1.0 - _LOGNORM_SHARE)), device=dev)
        table = torch.sort(torch.cat((noisy, even)), descending=True).values
        return table.to(torch.int32).float()
    raise ValueError(f"unknown timestep_type {kind!r}")


def table_indices(content_or_style: ContentOrStyle, batch: int, generator: torch.Generator,
                  num: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """One table index per sample, (B,) int64 on the generator's device."""
    dev = generator.device
    if content_or_style == "balanced":
        return torch.randint(0, num - 1, (batch,), generator=generator, device=dev)
    u = torch.rand(batch, generator=generator, device=dev)
    if content_or_style == "content":  # small indices: the noisy end, where layout and structure form
        scaled = u ** 3 * num
    elif content_or_style == "style":  # large indices: the clean end, where texture and detail form
        scaled = (1.0 - u ** 3) * num
    else:
        raise ValueError(f"unknown content_or_style {content_or_style!r}")
    return scaled.long().clamp(0, num - 1)


def draw(kind: str, content_or_style: ContentOrStyle, batch: int, generator: torch.Generator,
         mu: float) -> torch.Tensor:
    """Training times t in [0, 1], (B,) fp32 on the generator's device, as ai-toolkit draws them."""
    table = timestep_table(kind, generator, mu)
    return table[table_indices(content_or_style, batch, generator, table.numel())] / 1000.0
