"""The adapter's strength while one batch trains: ai-toolkit's per-dataset ``network_weight``.

ai-toolkit multiplies its LoRA's output by the batch items' network_weight during the training forward. Here a batch
holds items of one network_weight (the sampler groups by it: PairedDataset.batch_keys), so the strength is one number
per batch, applied to every peft adapter layer (LoRA and LoKr alike) by scaling its ``scaling``. It must stay set
through the backward pass too: gradient checkpointing re-runs the forward there.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from peft.tuners.tuners_utils import BaseTunerLayer


def batch_strength(weights: torch.Tensor) -> float:
    """The one network_weight of a batch's items (B,); mixed values mean the batch sampler did not group by it."""
    values = sorted(set(weights.tolist()))
    if len(values) != 1:
        raise ValueError(f"a batch mixes network_weight values {values}; batches must be grouped by network_weight")
    return float(values[0])


@contextmanager
def adapter_strength(module: torch.nn.Module, strength: float) -> Iterator[None]:
    """Multiply every adapter layer's scale in `module` by `strength`, and restore the exact scales afterwards."""
    if strength == 1.0:
        yield
        return
    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer) and isinstance(getattr(m, "scaling", None),
                                                                                        dict)]
    if not layers:
        raise ValueError("network_weight needs a trained adapter (network:), not a full fine-tune")
    saved = [(layer, dict(layer.scaling)) for layer in layers]
    for layer in layers:
        layer.scale_layer(strength)
    try:
        yield
    finally:  # restored from the copies, not divided back: no rounding drift over many steps
        for layer, scaling in saved:
            layer.scaling.update(scaling)


__all__ = ["adapter_strength", "batch_strength"]
