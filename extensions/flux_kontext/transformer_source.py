"""Where FLUX Kontext's transformer comes from when it is not the pipeline folder's as it is: an FP8 or bitsandbytes
export (never materialised in full precision), block-by-block quantized loading (low_vram), or another folder
(model.transformer_path, e.g. an earlier stage's full fine-tune)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
from diffusers import FluxTransformer2DModel

from extensions.flux_kontext import prequantized
from extensions.flux_kontext.quantize import TRANSFORMER_EXCLUDE
from toolkit import model_folder

log = logging.getLogger(__name__)


def prequantized_files(model_cfg: Any) -> Optional[tuple[Path, "prequantized.Prequantized"]]:
    """(transformer folder, its pre-quantized format) for a local model whose transformer files are quantized."""
    folder = Path(model_cfg.transformer_path or Path(model_cfg.name_or_path) / "transformer").expanduser()
    found = prequantized.detect(folder) if folder.is_dir() else None
    return None if found is None else (folder, found)


def components(model_cfg: Any, source: str, device: torch.device, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """{"transformer": module} when the transformer does not come from the pipeline folder as it is, else {}."""
    found = prequantized_files(model_cfg)
    if found is not None:
        folder, kind = found
        prequantized.require_device(kind, folder, device)
        return {"transformer": prequantized.load_fp8_transformer(folder, dtype, device) if kind.kind == "fp8"
                else prequantized.load_bnb_transformer(folder, dtype)}
    return model_folder.transformer_override(FluxTransformer2DModel, model_cfg, source, device=device, dtype=dtype,
                                             exclude=TRANSFORMER_EXCLUDE)
