"""Changed-region loss weights (dataset ``changed_region_loss``): where an edit changes the image, the loss counts more.

An edit pair's target differs from its control only where the edit acts; the rest of the image is copied. Weighting
the flow-matching loss by the per-pixel difference spends the gradient on the edit itself:

    d = mean_c |target - control|                 (1, H, W), pixels in [-1, 1]
    d = gaussian_blur(d, sigma = blur_px)          the edit's borders and small moves count too
    w = floor + (1 - floor) * d / max(d)           unchanged pixels keep `floor`, the most-changed weigh 1
    w = w / mean(w)                                mean 1: the loss keeps its scale

Both images are the dataset's bucket-sized, cut and mirrored tensors, so the map follows the target's crop and
bucket; the trainer feeds it through the loss-mask path (toolkit.arch.Architecture.loss_weights), as a mask file
of mask_path would be.
"""

from __future__ import annotations

import math

import torch

__all__ = ["changed_region_weights", "gaussian_blur"]


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """(C, H, W) blurred by a separable Gaussian of standard deviation `sigma` pixels (edges replicated)."""
    if sigma <= 0:
        return image
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(image.dtype)
    out = image[:, None]  # (C, 1, H, W): each channel on its own
    out = torch.nn.functional.pad(out, (radius, radius, 0, 0), mode="replicate")
    out = torch.nn.functional.conv2d(out, kernel.view(1, 1, 1, -1))
    out = torch.nn.functional.pad(out, (0, 0, radius, radius), mode="replicate")
    out = torch.nn.functional.conv2d(out, kernel.view(1, 1, -1, 1))
    return out[:, 0]


def changed_region_weights(target: torch.Tensor, control: torch.Tensor, blur_px: float, floor: float
                           ) -> torch.Tensor:
    """Per-pixel loss weights (1, H, W) of a target (3, H, W) and its control (3, h, w), mean 1 (see module docs).
    Identical images give uniform weights. A smaller control (datasets[].control_resolution) is compared after a
    bilinear resize to the target's size."""
    if target.shape[0] != control.shape[0]:
        raise ValueError(f"target {tuple(target.shape)} and control {tuple(control.shape)} differ in channels")
    if target.shape != control.shape:
        control = torch.nn.functional.interpolate(control[None].float(), size=tuple(target.shape[-2:]),
                                                  mode="bilinear", align_corners=False)[0]
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"changed_region_floor must be in [0, 1], got {floor}")
    diff = gaussian_blur((target.float() - control.float()).abs().mean(0, keepdim=True), blur_px)
    peak = diff.max()
    if peak <= 0:
        return torch.ones_like(diff)
    weights = floor + (1.0 - floor) * diff / peak
    return weights / weights.mean()
