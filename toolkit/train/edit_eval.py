"""Edit metrics on held-out pairs: render each held-out control with its caption and score the image against the
pair's true target (toolkit.train.edit_metrics).

Every call renders the same problem: the item's training bucket (the target and the controls cut and resized as
training sees them), the caption without dropout, a fixed seed, `steps` denoising steps and the sample guidance,
through the architecture's own sample() (the path of the training samples). Only the weights change between calls,
so checkpoints compare fairly. The work splits by item index: each process scores its share (Runtime.my_share) and
the main process averages the gathered rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from toolkit.arch import Architecture
from toolkit.data.dataset import render
from toolkit.render.sampling import SampleRequest
from toolkit.train.edit_metrics import Perceptual, edit_scores, load_lpips, mean_scores
from toolkit.train.validation import ValidationSet

log = logging.getLogger(__name__)


def _to_unit(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


@dataclass(frozen=True)
class HeldOutEdit:
    request: SampleRequest
    controls: tuple[Image.Image, ...]  # at the target's bucket, as training sees them
    target: Image.Image


class EditEval:
    """The held-out pairs of a ValidationSet as edit problems (see the module docstring)."""

    def __init__(self, items: Sequence[HeldOutEdit], perceptual: Optional[Perceptual] = None) -> None:
        self.items = list(items)
        self.perceptual = perceptual

    @classmethod
    def from_validation(cls, validation: ValidationSet, *, steps: int, seed: int, guidance_scale: float,
                        device: Optional[torch.device] = None) -> "EditEval":
        """One problem per held-out item; LPIPS on `device` when its weights are on this machine (else one log
        line)."""
        dataset = validation.dataset
        items = []
        for index, plan in enumerate(dataset.items):
            pair = dataset.pairs[plan.pair_index]
            caption = dataset.item_captions(index)[0]  # held-out items have no caption dropout
            boxes = (plan.control_box, *plan.extra_control_boxes)
            controls = tuple(render(path, size, box, plan.bucket)
                             for path, size, box in zip(pair.controls, pair.control_sizes, boxes))
            request = SampleRequest(index=index, prompt=caption, ctrl_img=pair.control, seed=seed,
                                    width=plan.bucket[0], height=plan.bucket[1], guidance_scale=guidance_scale,
                                    steps=steps, extra_ctrl_imgs=tuple(pair.extra_controls))
            items.append(HeldOutEdit(request, controls,
                                     render(pair.target, pair.target_size, plan.target_box, plan.bucket)))
        return cls(items, load_lpips(device or torch.device("cpu")))

    def __len__(self) -> int:
        return len(self.items)

    def score(self, model: Architecture, indices: Sequence[int],
              stop: Optional[Callable[[], bool]] = None) -> list[tuple[int, dict[str, float]]]:
        """(index, scores) of the items `indices` rendered with `model`'s current weights; fewer when `stop()`
        became true (an unfinished image is not scored)."""
        rows = []
        for index in indices:
            if stop is not None and stop():
                break
            item = self.items[index]
            image = model.sample([item.request], [list(item.controls)], stop=stop)[0]
            if stop is not None and stop():
                break
            if image.size != item.target.size:
                image = image.resize(item.target.size, Image.LANCZOS)
            control = _to_unit(item.controls[0]) if item.controls else None  # text-to-image: no keep region
            rows.append((index, edit_scores(_to_unit(image), _to_unit(item.target), control, self.perceptual)[0]))
        return rows

    @staticmethod
    def summary(rows: Sequence[tuple[int, dict[str, float]]]) -> dict[str, float]:
        """The mean of each score over the rows (of every process, gathered)."""
        return mean_scores([scores for _, scores in sorted(rows, key=lambda r: r[0])])


__all__ = ["EditEval", "HeldOutEdit"]
