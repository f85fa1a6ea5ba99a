"""Which optimizer steps train on regularisation data (datasets with ``is_reg: true``), as ai-toolkit chooses them.

ai-toolkit alternates: on every other step (its 0-based even steps, i.e. our 1-based steps 1, 3, 5, ...) ALL
micro-batches of the step come from the regularisation loader, except on a step after which it saves or samples
(so those see the training data). Everything else comes from the training loader. The loss is the ordinary
flow-matching loss on the regularisation images and their own captions, LoRA on, weighted by ``train.reg_weight``.

The choice depends on the step number alone, so how many batches each loader has handed out after any step is a
pure function of the step: a resume puts both samplers back exactly (``consumed``), with no extra state to save.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional


@dataclass(frozen=True)
class RegSchedule:
    """`is_reg(step)` for 1-based optimizer steps; `sample_every` 0 when sampling is off."""

    save_every: int
    sample_every: int
    sample_start_step: int = 0

    def is_reg(self, step: int) -> bool:
        if step % 2 == 0 or step % self.save_every == 0:
            return False
        return not (self.sample_every and step >= self.sample_start_step and step % self.sample_every == 0)

    def reg_steps(self, steps_done: int) -> int:
        """How many of the steps 1..steps_done trained on regularisation data."""
        return sum(1 for step in range(1, steps_done + 1) if self.is_reg(step))


class StepBatches:
    """Micro-batches for the optimizer steps after `start_step`, `accumulation` per step, each step's from the
    training or the regularisation stream as `schedule` says. Without a regularisation stream: the training one."""

    def __init__(self, train: Iterator[dict], reg: Optional[Iterator[dict]], schedule: Optional[RegSchedule],
                 start_step: int, accumulation: int) -> None:
        self.train, self.reg, self.schedule = train, reg, schedule
        self.start_step, self.accumulation = int(start_step), int(accumulation)
        self.drawn = 0

    def __iter__(self) -> "StepBatches":
        return self

    def __next__(self) -> dict:
        step = self.start_step + self.drawn // self.accumulation + 1
        self.drawn += 1
        if self.reg is not None and self.schedule is not None and self.schedule.is_reg(step):
            return next(self.reg)
        return next(self.train)


__all__ = ["RegSchedule", "StepBatches"]
