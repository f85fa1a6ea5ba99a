"""Shared by the Qwen-Image-Edit tests: load the tiny model through the Architecture, make batches and controls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from toolkit.config.schema import ModelConfig


def load_qwen(folder: Path, arch: str = "qwen_image_edit_plus", **overrides):
    import extensions.qwen_image_edit  # noqa: F401 (registers the architectures)
    from toolkit.arch import get_architecture

    cfg = ModelConfig(name_or_path=str(folder), arch=arch, **overrides)
    return get_architecture(arch).load(cfg, torch.device("cpu"), torch.float32)


def control_image(width: int, height: int, seed: int) -> Image.Image:
    """A random RGB picture (a flat colour would hide mix-ups between images)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def to_pixels(image: Image.Image) -> torch.Tensor:
    """(3, H, W) in [-1, 1], as the dataset gives images."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def batch_of(targets: list[Image.Image], controls: list[list[Image.Image]], captions: list[str]) -> dict:
    """A collated batch: target, control, control_2 ... (one list of controls per sample) and captions."""
    batch = {"target": torch.stack([to_pixels(t) for t in targets]), "caption": list(captions)}
    for j in range(len(controls[0])):
        batch["control" if j == 0 else f"control_{j + 1}"] = torch.stack([to_pixels(c[j]) for c in controls])
    return batch
