"""The one table from config dtype names (train.dtype, save.dtype, generate dtype) to torch dtypes."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    """A config dtype name ('bf16', 'float32', ...) as a torch dtype."""
    return DTYPES[name]


def compute_dtype(name: str, device: torch.device, key: str = "train.dtype") -> torch.dtype:
    """The frozen base's dtype: as configured on GPU; fp32 on CPU, where bf16/fp16 matmuls are several times slower.
    `key` names the config key in the log line."""
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype != torch.float32:
        log.info("%s %s on CPU: using float32 (CPU half-precision is slow)", key, name)
        return torch.float32
    return dtype
