"""Optimizer and learning-rate schedule factories (names as in ai-toolkit configs); schedules: toolkit.train.lr_schedule."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from toolkit.errors import ConfigError


def _optional(module: str, extra: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        raise ConfigError(f"train.optimizer needs the package '{extra}', which is not installed: "
                          f"pip install {extra} (or choose optimizer: adamw)") from exc


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float,
                   extra: Mapping[str, Any] | None = None) -> torch.optim.Optimizer:
    """adamw | adamw8bit (bitsandbytes) | prodigy (prodigyopt) | sgd; `extra` = train.optimizer_params."""
    params = list(params)
    kwargs = dict(extra or {})
    try:
        if name == "adamw":
            return torch.optim.AdamW(params, lr=lr, **kwargs)
        if name == "adamw8bit":
            bnb = _optional("bitsandbytes.optim", "bitsandbytes")
            return bnb.AdamW8bit(params, lr=lr, **kwargs)
        if name == "prodigy":
            prodigyopt = _optional("prodigyopt", "prodigyopt")
            return prodigyopt.Prodigy(params, lr=lr, **kwargs)
        if name == "sgd":
            return torch.optim.SGD(params, lr=lr, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"train.optimizer_params do not fit optimizer {name!r}: {exc}") from exc
    raise ConfigError(f"train.optimizer: unknown optimizer {name!r} (adamw, adamw8bit, prodigy, sgd)")
