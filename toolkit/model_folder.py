"""Where an architecture's model comes from, checked and resolved the same way for every architecture: a local
diffusers folder or a Hub id (`model.name_or_path`), and the transformer when it is not the folder's own one
(`model.low_vram`: read and quantized block by block; `model.transformer_path`: another folder), and the frozen,
quantized pipeline of the architectures with one text encoder."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from toolkit.quant.blockwise import load_transformer_blockwise
from toolkit.quant.frozen import keep_base_frozen, quantize_frozen, safe_exclude

__all__ = ["folder_problems", "freeze_and_quantize", "source", "transformer_override"]

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


def freeze_and_quantize(pipe: Any, model_cfg: Any, device: torch.device, dtype: torch.dtype,
                        exclude: Sequence[str]) -> None:
    """A pipeline with one transformer, one VAE and one text encoder, frozen and on `device`: model.quantize_te
    quantizes the text encoder, model.quantize the transformer (`exclude` kept full precision) where the weights
    will live (without low_vram on the device, fast on a GPU; with low_vram the transformer is already quantized
    block by block and the text encoder is quantized on the CPU). Base weights stay frozen after state loads."""
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
        module.eval()
    qtype = model_cfg.qtype
    if model_cfg.quantize_te:
        encoder = pipe.text_encoder.to(torch.device("cpu") if model_cfg.low_vram else device)
        quantize_frozen(encoder, qtype, safe_exclude(encoder, qtype, dtype))
        keep_base_frozen(encoder)
    if model_cfg.quantize and not model_cfg.low_vram:
        transformer = pipe.transformer.to(device)
        quantize_frozen(transformer, qtype, safe_exclude(transformer, qtype, dtype, exclude))
    pipe.to(device)
    keep_base_frozen(pipe.transformer)
