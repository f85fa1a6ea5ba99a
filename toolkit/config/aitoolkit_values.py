"""ai-toolkit's spellings of VALUES of our own keys (`type: diffusion_trainer`, `optimizer: prodigyopt`) and the
values we refuse by name; toolkit/config/aitoolkit.py holds the table of ai-toolkit's own keys."""

from __future__ import annotations

from typing import Any, Callable, Optional

from toolkit.config.aitoolkit_rules import DROP, Refused

__all__ = ["VALUES", "VALUE_PATTERNS"]

# ai-toolkit's spellings of values of our own keys: value -> our value (DROP: remove the key), or Refused.
_OPTIMIZER_REFUSED = Refused("implemented optimizers: adamw, adamw8bit, prodigy, sgd")
_SCHEDULE_REFUSED = Refused("implemented schedules: constant, cosine, linear, cosine_with_restarts "
                            "(with train.lr_warmup_steps)")
_TIMESTEPS_REFUSED = Refused("implemented timestep types: sigmoid, linear, weighted, shift")
VALUES: dict[str, dict[Any, Any]] = {
    "process.type": {"diffusion_trainer": "sd_trainer", "ui_trainer": "sd_trainer"},
    "train.optimizer": {"prodigyopt": "prodigy", "adam": _OPTIMIZER_REFUSED, "adam8bit": _OPTIMIZER_REFUSED,
                        "adam8": _OPTIMIZER_REFUSED, "adamw8": _OPTIMIZER_REFUSED, "adafactor": _OPTIMIZER_REFUSED,
                        "lion": _OPTIMIZER_REFUSED, "lion8bit": _OPTIMIZER_REFUSED, "adagrad": _OPTIMIZER_REFUSED,
                        "prodigy8bit": _OPTIMIZER_REFUSED, "ademamix8bit": _OPTIMIZER_REFUSED,
                        "dadaptation": _OPTIMIZER_REFUSED, "dadaptationadam": _OPTIMIZER_REFUSED,
                        "dadaptationlion": _OPTIMIZER_REFUSED, "automagic": _OPTIMIZER_REFUSED,
                        "automagic2": _OPTIMIZER_REFUSED, "automagic3": _OPTIMIZER_REFUSED},
    "train.lr_scheduler": {"constant_with_warmup": _SCHEDULE_REFUSED, "step": _SCHEDULE_REFUSED},
    "train.timestep_type": {"flux_shift": _TIMESTEPS_REFUSED, "lognorm_blend": _TIMESTEPS_REFUSED,
                            "next_sample": _TIMESTEPS_REFUSED, "one_step": _TIMESTEPS_REFUSED},
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
