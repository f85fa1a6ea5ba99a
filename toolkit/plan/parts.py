"""Bytes of the parts of a training run that follow from shapes alone: weights by storage format, optimizer states
by optimizer, the EMA copy. Pure functions of parameter shapes and dtypes (meta tensors are enough).

Formats, as the libraries store them:
- optimum-quanto 8-bit weights (qint8, qfloat8): one byte per element plus one scale per output row in the
  activation dtype; biases and the excluded layers (fnmatch patterns on module names, as quanto matches them) keep
  the base dtype. Only nn.Linear weights are quantized.
- Optimizer states per trained tensor of n elements (its dtype's size s): adamw/adam 2 n s (exp_avg, exp_avg_sq);
  adamw8bit (bitsandbytes) 2 n bytes + two fp32 absmax per 256-element block, but 2 n x 4 bytes for tensors under
  4096 elements (bitsandbytes' min_8bit_size), plus two shared 256-entry maps; adafactor (transformers, beta1 unset) rows + columns of the last two
  dims for a matrix, n for a vector, plus n s more with optimizer_params beta1; prodigy 4 n s (exp_avg, exp_avg_sq,
  s, p0); sgd n s with momentum, else 0. tests/test_plan.py checks each against the real optimizer's state.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Iterable, Mapping, Sequence

import torch

QUANT_BYTES = 1  # qint8 / qfloat8: one byte per weight element
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK = 256


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def tensor_bytes(tensor: torch.Tensor, as_dtype: torch.dtype | None = None) -> int:
    """Bytes of `tensor`; a floating-point tensor counted in `as_dtype` when given (the dtype it will be loaded in)."""
    if as_dtype is not None and tensor.is_floating_point():
        return tensor.numel() * dtype_bytes(as_dtype)
    return tensor.numel() * tensor.element_size()


def module_bytes(module: torch.nn.Module, as_dtype: torch.dtype | None = None) -> int:
    """Bytes of the frozen parameters and the buffers of `module` (floating point ones in `as_dtype` if given)."""
    return (sum(tensor_bytes(p, as_dtype) for p in module.parameters() if not p.requires_grad)
            + sum(tensor_bytes(b, as_dtype) for b in module.buffers()))


def _excluded(name: str, exclude: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in exclude)


def quantized_layers(module: torch.nn.Module, exclude: Sequence[str]) -> list[torch.nn.Linear]:
    """The Linear layers quanto quantizes in `module` (before any adapter is added: names as in the base model)."""
    return [mod for name, mod in module.named_modules()
            if type(mod) is torch.nn.Linear and not _excluded(name, exclude)]


def quantized_bytes(module: torch.nn.Module, exclude: Sequence[str], dtype: torch.dtype) -> int:
    """Frozen bytes of `module` loaded in `dtype` after quanto quantizes its Linear weights to 8 bits."""
    total = module_bytes(module, dtype)
    for mod in quantized_layers(module, exclude):
        total += mod.weight.numel() * QUANT_BYTES + mod.out_features * dtype_bytes(dtype) \
            - tensor_bytes(mod.weight, dtype)
    return total


def _adafactor(p: torch.Tensor, first_moment: bool) -> int:
    second = (p.shape[-1] + p.shape[-2]) * 4 if p.dim() >= 2 else p.numel() * 4
    return second + (tensor_bytes(p) if first_moment else 0)


def optimizer_state_bytes(name: str, params: Iterable[torch.Tensor], extra: Mapping[str, Any] | None = None) -> int:
    """Bytes of the optimizer's state for `params` after its first step (name as train.optimizer)."""
    extra = dict(extra or {})
    params = list(params)
    total = 0
    if name == "adamw8bit" and any(p.numel() >= BNB_MIN_8BIT_SIZE for p in params):
        total += 2 * 256 * 4  # the two 256-entry fp32 quantization maps, shared by every tensor
    for p in params:
        n, size = p.numel(), tensor_bytes(p)
        if name in ("adamw", "adam"):
            total += 2 * size
        elif name == "adamw8bit":
            total += 2 * n + 2 * 4 * -(-n // BNB_BLOCK) if n >= BNB_MIN_8BIT_SIZE else 2 * n * 4
        elif name == "adafactor":
            total += _adafactor(p, extra.get("beta1") is not None)
        elif name == "prodigy":
            total += 4 * size
        elif name == "sgd":
            total += size if extra.get("momentum", 0) else 0
        else:
            raise ValueError(f"unknown optimizer {name!r}")
    return total
