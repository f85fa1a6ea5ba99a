"""Where an architecture's model comes from, checked and resolved the same way for every architecture: a local
diffusers folder or a Hub id (`model.name_or_path`), and the transformer when it is not the folder's own one
(`model.low_vram`: read and quantized block by block; `model.transformer_path`: another folder)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from toolkit.quant.blockwise import load_transformer_blockwise

__all__ = ["folder_problems", "source", "transformer_override"]

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def folder_problems(name_or_path: str, family: str, required: Sequence[str] = ("model_index.json",)) -> list[str]:
    """Problems with model.name_or_path found without loading: a local folder missing `required` entries of a
    diffusers `family` folder, or something that is neither a folder nor a Hub id."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return [f"model.name_or_path: {path} is not a diffusers {family} folder (no {part})"
                for part in required if not (path / part).exists()]
    if not _HUB_ID.match(name_or_path):
        return [f"model.name_or_path: {name_or_path} is neither an existing folder nor a Hub id (org/name)"]
    return []


def source(model_cfg: Any) -> str:
    """model.name_or_path as a local folder when it exists, else the Hub id."""
    local = Path(model_cfg.name_or_path).expanduser()
    return str(local) if local.exists() else model_cfg.name_or_path


def transformer_override(model_class: type, model_cfg: Any, source: str, dtype: torch.dtype, device: torch.device,
                         exclude: Sequence[str]) -> dict[str, torch.nn.Module]:
    """{"transformer": module} for model.low_vram (block by block, quantized on the CPU when model.quantize: the
    device never holds the full-precision transformer; `exclude` stays full precision) or model.transformer_path
    (e.g. an earlier stage's full fine-tune); {} when the pipeline folder's transformer loads as it is."""
    if model_cfg.low_vram:
        return {"transformer": load_transformer_blockwise(model_class, source, dtype, device,
                                                          model_cfg.qtype if model_cfg.quantize else None,
                                                          exclude, folder=model_cfg.transformer_path)}
    if model_cfg.transformer_path:
        log.info("transformer from %s", model_cfg.transformer_path)
        return {"transformer": model_class.from_pretrained(model_cfg.transformer_path, dtype=dtype)}
    return {}
