"""How well an edit was done: a rendered edit compared with the true target of a held-out pair.

Images are float tensors (3, H, W) or (B, 3, H, W) in [0, 1]. Scores (torchmetrics does the math):

- psnr, ssim: the whole image (higher is better; identical images: psnr = inf, ssim = 1);
- lpips: a learned perceptual distance (lower is better), only when its network weights are on this machine;
- keep_psnr, keep_ssim, keep_lpips: the same scores over the region the edit should leave alone, the pixels where
  control and target agree: max over channels of |target - control| <= KEEP_THRESHOLD. A pair whose keep region
  is under MIN_KEEP_FRACTION of the image gets NaN keep scores (left out of the means); keep_ssim averages the SSIM
map over the kept pixels whose whole 11 px window is kept.

KEEP_THRESHOLD = 0.1 of the [0, 1] range (about 25 of 255 levels): above JPEG and resampling noise, below any
change a user means. keep_lpips scores the prediction with its changed region replaced by the target's, so only
the kept region can differ.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

log = logging.getLogger(__name__)

KEEP_THRESHOLD = 0.1
MIN_KEEP_FRACTION = 0.01
SSIM_WINDOW = 11  # torchmetrics' default Gaussian window (sigma 1.5)
Perceptual = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (B,3,H,W) x2 in [0, 1] -> (B,) distances


def _batched(image: torch.Tensor) -> torch.Tensor:
    image = image.float()
    return image.unsqueeze(0) if image.dim() == 3 else image


def keep_mask(control: torch.Tensor, target: torch.Tensor, threshold: float = KEEP_THRESHOLD) -> torch.Tensor:
    """(B, 1, H, W) bool: pixels where the target keeps the control (max over channels of |target - control|
    <= threshold)."""
    diff = (_batched(target) - _batched(control)).abs().amax(dim=1, keepdim=True)
    return diff <= threshold


def psnr(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B,) PSNR in dB per image (data range 1), over the pixels of `mask` (B, 1, H, W) when given."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    pred, target = _batched(pred), _batched(target)
    scores = []
    for i in range(pred.shape[0]):
        p, t = pred[i], target[i]
        if mask is not None:
            m = mask[i].expand_as(p)
            p, t = p[m], t[m]
        scores.append(peak_signal_noise_ratio(p, t, data_range=1.0) if p.numel() else torch.tensor(math.nan))
    return torch.stack(scores)


def ssim(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B,) SSIM per image (Gaussian window 11, sigma 1.5); with `mask`, the mean of the SSIM map over the pixels
    whose whole window lies in the mask (the mask eroded by the window's half-width), so a changed pixel next to
    the kept region does not count against it."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    pred, target = _batched(pred), _batched(target)
    if mask is None:
        return structural_similarity_index_measure(pred, target, data_range=1.0, reduction="none")
    _, full = structural_similarity_index_measure(pred, target, data_range=1.0, reduction="none",
                                                  return_full_image=True)
    half = SSIM_WINDOW // 2
    eroded = ~torch.nn.functional.max_pool2d((~mask).float(), SSIM_WINDOW, stride=1, padding=half).bool()
    m = eroded.expand_as(full).float()
    return (full * m).sum(dim=(1, 2, 3)) / m.sum(dim=(1, 2, 3))  # 0/0 = NaN: no kept pixel


def edit_scores(pred: torch.Tensor, target: torch.Tensor, control: Optional[torch.Tensor],
                perceptual: Optional[Perceptual] = None) -> list[dict[str, float]]:
    """Every score of each image of a batch (see the module docstring); keep_* are NaN for a pair that changes
    (almost) everything, and absent without a control image."""
    pred, target = _batched(pred), _batched(target)
    if control is None:
        columns = {"psnr": psnr(pred, target), "ssim": ssim(pred, target)}
        if perceptual is not None:
            columns["lpips"] = perceptual(pred, target)
        return [{name: float(values[i]) for name, values in columns.items()} for i in range(pred.shape[0])]
    control = _batched(control)
    mask = keep_mask(control, target)
    enough = mask.float().mean(dim=(1, 2, 3)) >= MIN_KEEP_FRACTION
    columns = {"psnr": psnr(pred, target), "ssim": ssim(pred, target),
               "keep_psnr": psnr(pred, target, mask), "keep_ssim": ssim(pred, target, mask)}
    if perceptual is not None:
        columns["lpips"] = perceptual(pred, target)
        columns["keep_lpips"] = perceptual(torch.where(mask, pred, target), target)
    for name in [n for n in columns if n.startswith("keep_")]:
        columns[name] = torch.where(enough, columns[name], torch.full_like(columns[name], math.nan))
    return [{name: float(values[i]) for name, values in columns.items()} for i in range(pred.shape[0])]


def mean_scores(per_item: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The mean of each score over items, NaNs left out; a score NaN for every item is dropped."""
    out: dict[str, float] = {}
    for name in dict.fromkeys(k for item in per_item for k in item):
        values = [item[name] for item in per_item if name in item and not math.isnan(item[name])]
        if values:
            out[name] = sum(values) / len(values)
    return out


def lpips_weights_problem(net: str = "alex") -> Optional[str]:
    """Why LPIPS cannot run offline here (None: it can): torchmetrics' LPIPS needs torchvision and the backbone's
    ImageNet weights in torch.hub's checkpoint folder; nothing is ever downloaded."""
    try:
        import torchvision.models as models
        from torchmetrics.functional.image.lpips import _weight_map
    except Exception as exc:  # torchvision beside a CPU torch can fail with other errors than ImportError
        return f"torchvision is not importable ({type(exc).__name__}: {str(exc)[:120]})"
    backbone = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}[net]
    weights = getattr(models, _weight_map[backbone]).DEFAULT
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    return None if path.is_file() else f"the {net} weights are not in {path.parent} (not downloaded: offline)"


def load_lpips(device: torch.device, net: str = "alex") -> Optional[Perceptual]:
    """torchmetrics' LPIPS on `device` as a Perceptual scorer, or None with one log line when its weights are not
    on this machine."""
    problem = lpips_weights_problem(net)
    if problem is not None:
        log.info("edit metrics: lpips skipped: %s", problem)
        return None
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    network = _NoTrainLpips(net=net).to(device).eval()

    @torch.no_grad()
    def score(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return network(pred.to(device) * 2 - 1, target.to(device) * 2 - 1).reshape(-1).float().cpu()
    return score


__all__ = ["KEEP_THRESHOLD", "MIN_KEEP_FRACTION", "Perceptual", "edit_scores", "keep_mask", "load_lpips",
           "lpips_weights_problem", "mean_scores", "psnr", "ssim"]
