"""ai-toolkit's spellings of VALUES of our own keys (`type: diffusion_trainer`, `optimizer: prodigyopt`) and the
values we refuse by name; toolkit/config/aitoolkit.py holds the table of ai-toolkit's own keys."""

from __future__ import annotations

from typing import Any, Callable, Optional

from toolkit.config.aitoolkit_rules import DROP, Refused

__all__ = ["VALUES", "VALUE_PATTERNS"]

# ai-toolkit's spellings of values of our own keys: value -> our value (DROP: remove the key), or Refused.
_OPTIMIZER_REFUSED = Refused("implemented optimizers: adamw, adamw8bit, adam, adafactor, prodigy, sgd")
_OWN_OPTIMIZER = Refused("ai-toolkit's own optimizer, not implemented here; adamw8bit or prodigy are the nearest")
_SCHEDULE_REFUSED = Refused("implemented schedules: constant, cosine, linear, cosine_with_restarts, "
                            "constant_with_warmup, step (with train.lr_warmup_steps)")
_TIMESTEPS_REFUSED = Refused("implemented timestep types: sigmoid, linear, weighted, shift, flux_shift, lognorm_blend")
_LOSS_REFUSED = Refused("implemented loss types: mse, mae, pseudo_huber, wavelet (equal to mse here)")
VALUES: dict[str, dict[Any, Any]] = {
    "process.type": {"diffusion_trainer": "sd_trainer", "ui_trainer": "sd_trainer"},
    "train.optimizer": {"prodigyopt": "prodigy", "adam8bit": _OPTIMIZER_REFUSED, "adam8": _OPTIMIZER_REFUSED,
                        "adamw8": _OPTIMIZER_REFUSED, "lion": _OPTIMIZER_REFUSED, "lion8bit": _OPTIMIZER_REFUSED,
                        "adagrad": _OPTIMIZER_REFUSED, "ademamix8bit": _OPTIMIZER_REFUSED,
                        "prodigy8bit": Refused("ai-toolkit's own 8-bit Prodigy has no maintained package; use "
                                               "prodigy (prodigyopt, full-precision state)"),
                        "dadaptation": _OPTIMIZER_REFUSED, "dadaptationadam": _OPTIMIZER_REFUSED,
                        "dadaptationlion": _OPTIMIZER_REFUSED, "automagic": _OWN_OPTIMIZER,
                        "automagic2": _OWN_OPTIMIZER, "automagic3": _OWN_OPTIMIZER},
    "train.lr_scheduler": {name: _SCHEDULE_REFUSED for name in (
        "polynomial", "piecewise_constant", "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr",
        "cosine_warmup_with_min_lr", "warmup_stable_decay")},
    "train.timestep_type": {name: _TIMESTEPS_REFUSED for name in (
        "next_sample", "one_step", "two_step", "four_step", "eight_step")},
    # A one-level Haar transform is orthonormal and tiles even-sized latents exactly, so ai-toolkit's wavelet loss
    # (squared error of the transformed x0 estimates, averaged) is the squared error of the velocity.
    "train.loss_type": {"wavelet": "mse", "stepped": _LOSS_REFUSED, "mean_flow": _LOSS_REFUSED,
                        "pixelspace": _LOSS_REFUSED},
    "model.qtype": {"float8": Refused("implemented 8-bit types: qfloat8, qint8"),
                    "qint4": Refused("implemented 8-bit types: qfloat8, qint8"),
                    "uint4": Refused("implemented 8-bit types: qfloat8, qint8")},
    "network.type": {"locon": "lora", "lorm": Refused("implemented adapters: lora, lokr")},
    "network.dropout": {None: DROP},
    "sample.neg": {False: "", None: ""},
    "datasets[].control_path": {"": DROP},
}
# Values ai-toolkit explains itself: qtype "uint3|repo" means quantization plus an accuracy recovery adapter.
VALUE_PATTERNS: dict[str, Callable[[Any], Optional[Refused]]] = {
    "model.qtype": lambda v: Refused("accuracy recovery adapters are not implemented")
    if isinstance(v, str) and "|" in v else None,
}
