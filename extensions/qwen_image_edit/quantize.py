"""The Qwen-Image transformer's layers that stay in full precision when the base is quantized (model.quantize), and
the shared quantization helpers (toolkit.quant) bound to them. The rules (frozen for good, never fused) are
toolkit.quant's, as for FLUX Kontext.
"""

from __future__ import annotations

from typing import Optional

import torch
from diffusers import QwenImageTransformer2DModel

from toolkit.quant import blockwise
from toolkit.quant.frozen import keep_base_frozen, quantize_frozen, safe_exclude

# Small layers where quantization error hurts most (input/output projections, modulation of the output norm).
TRANSFORMER_EXCLUDE = ("img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.*")


def load_transformer_blockwise(name_or_path: str, dtype: torch.dtype, device: torch.device,
                               qtype: Optional[str], folder: Optional[str] = None) -> torch.nn.Module:
    """The Qwen-Image transformer built block by block, quantized on the CPU (toolkit.quant.blockwise)."""
    return blockwise.load_transformer_blockwise(QwenImageTransformer2DModel, name_or_path, dtype, device, qtype,
                                                TRANSFORMER_EXCLUDE, folder=folder)


__all__ = ["TRANSFORMER_EXCLUDE", "keep_base_frozen", "load_transformer_blockwise", "quantize_frozen", "safe_exclude"]
