"""Loss masks (dataset ``mask_path``, as ai-toolkit): one greyscale image per target, same file stem, saying where the
loss counts (white) and where it counts less (black).

A mask is cut with its target's crop box (scaled to the mask's own size), resized to the target's bucket and
mirrored with it, so mask pixel (x, y) weighs target pixel (x, y). Values v in [0, 1] become
``mask_min_value + v * (1 - mask_min_value)`` (ai-toolkit's value_map), so black still weighs mask_min_value. The
architecture turns the pixel mask into weights of its own latent layout (toolkit.arch.Architecture.loss_weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageOps

from toolkit.data.buckets import Box
from toolkit.data.images import PIL_ERRORS, is_image_file, verify_image
from toolkit.errors import DatasetError


def find_masks(raw: Optional[str], targets: dict[str, Path], key: str,
               problems: list[str]) -> dict[str, tuple[Path, tuple[int, int]]]:
    """The mask file and size of every target stem; each missing or unreadable mask is recorded in `problems`."""
    if raw is None:
        return {}
    folder = Path(raw).expanduser().absolute()
    if not folder.is_dir():
        problems.append(f"{folder}: mask folder does not exist or is not a folder ({key})")
        return {}
    by_stem = {p.stem: p for p in sorted(folder.iterdir())
               if p.is_file() and not p.name.startswith(".") and is_image_file(p)}
    found: dict[str, tuple[Path, tuple[int, int]]] = {}
    for stem, target in sorted(targets.items()):
        if stem not in by_stem:
            problems.append(f"{target}: no mask image named '{stem}.*' in {folder} ({key}); every target of a dataset "
                            "with mask_path needs one")
            continue
        try:
            found[stem] = (by_stem[stem], verify_image(by_stem[stem]))
        except DatasetError as err:
            problems.append(str(err))
    return found


def load_mask(path: Path, expected_size: tuple[int, int], box: Box, bucket: tuple[int, int],
              flip: tuple[bool, bool], invert: bool, min_value: float) -> torch.Tensor:
    """FloatTensor[1, H, W] of loss weights in [min_value, 1] at the bucket size (see the module docs)."""
    try:
        with Image.open(path) as img:
            img.load()
            grey = ImageOps.exif_transpose(img).convert("L")
    except PIL_ERRORS as err:
        raise DatasetError(f"{path}: cannot decode mask image ({err})") from err
    if grey.size != tuple(expected_size):
        raise DatasetError(f"{path}: mask changed size during training ({grey.size} vs {expected_size})")
    if invert:
        grey = ImageOps.invert(grey)
    grey = grey.resize(bucket, Image.BICUBIC, box=box)
    if flip[0]:
        grey = grey.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if flip[1]:
        grey = grey.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    values = torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0)[None]
    return min_value + values * (1.0 - min_value)


__all__ = ["find_masks", "load_mask"]
