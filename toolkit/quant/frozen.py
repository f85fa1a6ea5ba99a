"""Quantize frozen base weights with optimum-quanto and keep them frozen.

Rules, and why:
- Only Linear weights are quantized (quanto leaves norms alone without activation quantization); each architecture
  names the layers that stay in full precision (`exclude`, fnmatch names as quanto matches them).
- quanto's ``freeze()`` and every ``load_state_dict`` re-create the weight Parameters with requires_grad=True, and the
  next backward then crashes inside quanto or trains the base. ``quantize_frozen`` switches it off after freezing and
  ``keep_base_frozen`` adds a load_state_dict post-hook that switches it off after any later state load.
- qint8 with half-precision activations crashes on layers whose in_features is not a multiple of 8: ``safe_exclude``
  adds them to the exclusions.
- The LoRA is added on top by peft (it wraps quanto's QLinear) and trained in fp32; it is never fused: ``fuse_lora``
  on a quanto model silently drops the LoRA.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from toolkit.adapters.lora import is_adapter_name

log = logging.getLogger(__name__)

QTYPES = ("qfloat8", "qint8")


def quantize_frozen(module: torch.nn.Module, qtype: str, exclude: Sequence[str] = (),
                    include: Optional[Sequence[str]] = None) -> None:
    """Quantize the Linear weights of `module` (names matched by fnmatch, as quanto does) and freeze them."""
    from optimum import quanto

    if qtype not in QTYPES:
        raise ValueError(f"qtype must be one of {QTYPES}, got {qtype!r}")
    quanto.quantize(module, weights=getattr(quanto, qtype), include=list(include) if include else None,
                    exclude=list(exclude) or None)
    quanto.freeze(module)
    module.requires_grad_(False)  # freeze() turns requires_grad back on (FACTS.md)
    release_checkpoint_memory(module)


@torch.no_grad()
def release_checkpoint_memory(module: torch.nn.Module) -> None:
    """Copy the full-precision tensors left after quantizing (biases, norms, excluded layers) into memory of their
    own. Loaded tensors point into the checkpoint file's memory map, and while any of them lives, every page of the
    file that quantizing read stays resident: on a CPU that is the whole full-precision model again."""
    for mod in module.modules():
        for param in mod.parameters(recurse=False):
            if type(param.data) is torch.Tensor:  # quantized weights are quanto tensors with fresh storage
                param.data = param.data.clone()
        for name, buffer in list(mod.named_buffers(recurse=False)):
            setattr(mod, name, buffer.clone())


def unsafe_qint8_layers(module: torch.nn.Module) -> list[str]:
    """Linear layers whose in_features is not a multiple of 8: qint8 with bf16/fp16 activations crashes on them."""
    return [name for name, m in module.named_modules()
            if isinstance(m, torch.nn.Linear) and m.in_features % 8]


def safe_exclude(module: torch.nn.Module, qtype: str, dtype: torch.dtype, always: Sequence[str] = ()) -> list[str]:
    """`always`, plus the layers qint8 cannot run in half precision."""
    exclude = list(always)
    if qtype == "qint8" and dtype != torch.float32:
        unsafe = [n for n in unsafe_qint8_layers(module) if n not in exclude]
        if unsafe:
            log.warning("qint8 with %s: keeping %d layers with in_features not a multiple of 8 unquantized (%s)",
                        dtype, len(unsafe), ", ".join(unsafe[:3]))
        exclude += unsafe
    return exclude


def keep_base_frozen(module: torch.nn.Module) -> None:
    """After any load_state_dict reaching `module` (also through a parent), freeze every non-LoRA parameter again."""

    def refreeze(mod: torch.nn.Module, _incompatible) -> None:
        for name, param in mod.named_parameters():
            if not is_adapter_name(name):
                param.requires_grad_(False)

    module.register_load_state_dict_post_hook(refreeze)


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the base weights as stored (quantized data + scales, full-precision rest); LoRA not counted."""
    return sum(t.numel() * t.element_size() for k, t in module.state_dict().items() if not is_adapter_name(k))


__all__ = ["QTYPES", "keep_base_frozen", "quantize_frozen", "release_checkpoint_memory", "safe_exclude",
           "unsafe_qint8_layers", "weight_bytes"]
