"""The held-out measurements of a training run at a step: the validation loss (toolkit.train.validation) and the
edit metrics (toolkit.train.edit_eval), both with the EMA weights when train.ema_config is on.

The validation loss is computed by every process (same weights, same value, no collective). The edit metrics are
split: each process renders its share of the held-out pairs, the rows are gathered, the main process logs the means
as TensorBoard scalars val/<metric> (val/psnr, val/keep_ssim, ...)."""

from __future__ import annotations

import logging
from typing import Optional

import torch

from toolkit.train.edit_eval import EditEval
from toolkit.train.ema import ema_weights
from toolkit.train.validation import ValidationSet

log = logging.getLogger(__name__)


def held_out_edits(validation: Optional[ValidationSet], sample_cfg, device: torch.device) -> Optional[EditEval]:
    """The edit problems of the held-out pairs, or None without held-out pairs or with sample.metric_steps 0."""
    if validation is None or sample_cfg.metric_steps == 0:
        return None
    return EditEval.from_validation(validation, steps=sample_cfg.metric_steps, seed=sample_cfg.seed,
                                    guidance_scale=sample_cfg.guidance_scale, device=device)


def measure_held_out(run, step: int) -> dict[str, float]:
    """Validation loss and edit metrics of the current weights, logged at `step`; every process calls it at the same
    step (the gather of the edit rows is a collective). Returns the logged values (main process; {} elsewhere)."""
    values: dict[str, float] = {}
    if run.validation is None and run.edits is None:
        return values
    with run.monitor.paused(), ema_weights(run.ema):  # not step time
        if run.validation is not None:
            values["val/loss"] = run.validation.loss(run.model)
        if run.edits is not None:
            rows = run.rt.gather(run.edits.score(run.model, run.rt.my_share(len(run.edits))))
            values.update({f"val/{name}": value for name, value in EditEval.summary(rows).items()})
    if not run.rt.is_main or not values:
        return {}
    run.monitor.scalars(step, values)
    log.info("step %d: %s", step, ", ".join(f"{k} {v:.5g}" for k, v in values.items()))
    return values


__all__ = ["held_out_edits", "measure_held_out"]
