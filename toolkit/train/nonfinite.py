"""The non-finite guard: a step whose loss or gradient norm is NaN or Inf is not applied, and a run that keeps
producing them stops before it can overwrite good checkpoints with NaN weights.

Why: one NaN gradient turns every LoRA weight into NaN at the optimizer step, and each later save prunes an older
(good) checkpoint, so after `save.max_step_saves_to_keep` saves nothing usable is left. The decision to apply a step
is taken from one all-reduced flag (toolkit.dist.Runtime.agree), so every rank skips the same steps and the LoRA
stays identical across processes; the cost is one scalar read on the host per step.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

log = logging.getLogger(__name__)


class TrainingDiverged(Exception):
    """Too many non-finite steps in a row, or non-finite weights about to be saved; run.py exits with status 1."""

    exit_code = 1


class NonFiniteGuard:
    """Counts skipped steps; raises TrainingDiverged after `limit` of them in a row."""

    def __init__(self, limit: int) -> None:
        self.limit = int(limit)
        self.in_a_row = 0
        self.total = 0

    def record(self, step: int, applied: bool, files: Sequence[str], last_checkpoint: Optional[str]) -> None:
        if applied:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        log.warning("step %d: the loss or the gradient norm is not finite (NaN/Inf): the step is skipped (no "
                    "optimizer or EMA update, nothing saved); %d in a row, %d in this run. This process's batch: %s",
                    step, self.in_a_row, self.total, ", ".join(files) or "(no file names)")
        if self.in_a_row >= self.limit:
            kept = (f"the last good checkpoint ({last_checkpoint}) is intact" if last_checkpoint
                    else "no checkpoint was saved before")
            raise TrainingDiverged(
                f"{self.in_a_row} steps in a row (train.max_nonfinite_steps) had a non-finite loss or gradient at "
                f"step {step}: training stopped; {kept}. Lower train.lr, keep train.max_grad_norm on, check the "
                "images named above, or use fp32/bf16 instead of fp16; run the same command again to resume from "
                "the last good checkpoint.")


__all__ = ["NonFiniteGuard", "TrainingDiverged"]
