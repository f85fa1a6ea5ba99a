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
    """adamw | adamw8bit (bitsandbytes) | adam | adafactor (transformers) | prodigy (prodigyopt) | sgd;
    `extra` = train.optimizer_params. adam and adafactor take ai-toolkit's defaults (optimizer_params override them):
    adam eps 1e-6; adafactor with relative_step, scale_parameter and warmup_init off, so its step size is train.lr
    under the lr schedule rather than Adafactor's own time-dependent one."""
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
        if name == "adam":
            return torch.optim.Adam(params, lr=lr, **{"eps": 1e-6, **kwargs})
        if name == "adafactor":
            from transformers.optimization import Adafactor

            defaults = {"relative_step": False, "scale_parameter": False, "warmup_init": False}
            return Adafactor(params, lr=lr, **{**defaults, **kwargs})
        if name == "sgd":
            return torch.optim.SGD(params, lr=lr, **kwargs)
    except (TypeError, ValueError) as exc:  # unknown keyword, or a value or combination the optimizer rejects
        raise ConfigError(f"train.optimizer_params do not fit optimizer {name!r}: {exc}") from exc
    raise ConfigError(f"train.optimizer: unknown optimizer {name!r} (adamw, adamw8bit, adam, adafactor, prodigy, sgd)")
