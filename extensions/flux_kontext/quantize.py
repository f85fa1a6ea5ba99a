"""The FLUX Kontext transformer's layers that stay in full precision when the base is quantized, and the shared
quantization helpers (toolkit.quant) bound to them.

TRANSFORMER_EXCLUDE keeps the layers that touch the latents and the text directly in full precision: excluding
proj_out, x_embedder and context_embedder cut qint8 output error 5x for +1.8 % bytes (FACTS.md); norm_out.linear is
the final modulation of proj_out's input and is tiny. The rules (frozen for good, never fused) are toolkit.quant's.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from diffusers import FluxTransformer2DModel

from toolkit.quant import blockwise
from toolkit.quant.frozen import (QTYPES, keep_base_frozen, quantize_frozen, release_checkpoint_memory,
                                  unsafe_qint8_layers, weight_bytes)
from toolkit.quant.frozen import safe_exclude as _safe_exclude

TRANSFORMER_EXCLUDE = ("proj_out", "x_embedder", "context_embedder", "norm_out.linear")


def safe_exclude(module: torch.nn.Module, qtype: str, dtype: torch.dtype,
                 always: Sequence[str] = TRANSFORMER_EXCLUDE) -> list[str]:
    """`always` (the FLUX transformer's list by default), plus the layers qint8 cannot run in half precision."""
    return _safe_exclude(module, qtype, dtype, always)


def load_transformer_blockwise(name_or_path: str, dtype: torch.dtype, device: torch.device,
                               qtype: Optional[str], folder: Optional[str] = None) -> torch.nn.Module:
    """The FLUX transformer built block by block, quantized on the CPU (toolkit.quant.blockwise)."""
    return blockwise.load_transformer_blockwise(FluxTransformer2DModel, name_or_path, dtype, device, qtype,
                                                TRANSFORMER_EXCLUDE, folder=folder)


__all__ = ["QTYPES", "TRANSFORMER_EXCLUDE", "keep_base_frozen", "load_transformer_blockwise", "quantize_frozen",
           "release_checkpoint_memory", "safe_exclude", "unsafe_qint8_layers", "weight_bytes"]
