"""Learning-rate schedules: diffusers' get_scheduler behind strictly checked names and parameters.

`train.lr_scheduler` picks the shape after `train.lr_warmup_steps` of linear warm-up from 0 to `train.lr`;
`train.lr_scheduler_params` holds that shape's own options (only those listed in SCHEDULE_PARAMS). Two come from
ai-toolkit with its parameter names: `constant_with_warmup` (diffusers' schedule; ai-toolkit's warm-up length is
`num_warmup_steps`, default 1000) and `step` (torch's StepLR shape: lr * gamma ** (step // step_size); ai-toolkit
hands StepLR an extra total_iters, which it rejects, so there the name only fails). The checks run
at config load (no diffusers import here at module level: the config loader imports this module).

`planned_lrs` computes the whole schedule on a throw-away optimizer, so the planned curve can be written to
TensorBoard at the start of a run without advancing the real scheduler.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

from toolkit.errors import ConfigError

SCHEDULES = ("constant", "cosine", "linear", "cosine_with_restarts", "constant_with_warmup", "step")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


# name -> {parameter: (check, rule text, default)}
SCHEDULE_PARAMS: dict[str, dict[str, tuple[Callable[[Any], bool], str, Any]]] = {
    "constant": {},
    "cosine": {},
    "linear": {},
    "cosine_with_restarts": {"num_cycles": (_positive_int, "an integer >= 1 (hard restarts of the cosine)", 1)},
    "constant_with_warmup": {"num_warmup_steps": (_count, "an integer >= 0 (steps of linear warm-up)", 1000)},
    "step": {"step_size": (_positive_int, "an integer >= 1 (steps between decays)", None),
             "gamma": (_positive_number, "a number > 0 (factor applied every step_size steps)", 0.1)},
}


def schedule_problems(name: str, params: Mapping[str, Any], warmup_steps: int, steps: int, path: str) -> list[str]:
    """Problems of a schedule config, each `key.path: message`; `path` is the train section's key path."""
    problems = []
    known = SCHEDULE_PARAMS.get(name)
    if known is None:  # the schema's Literal already reports an unknown name
        return problems
    for key, value in params.items():
        if key not in known:
            allowed = ", ".join(known) or "none"
            problems.append(f"{path}.lr_scheduler_params.{key}: not a parameter of lr_scheduler {name!r} "
                            f"(its parameters: {allowed})")
            continue
        check, rule, _ = known[key]
        if not check(value):
            problems.append(f"{path}.lr_scheduler_params.{key}: must be {rule}, got {value!r}")
    if name == "step" and "step_size" not in params:
        problems.append(f"{path}.lr_scheduler_params.step_size: required by lr_scheduler 'step' (steps between "
                        "decays of the lr by gamma)")
    if name == "constant_with_warmup" and warmup_steps:
        problems.append(f"{path}.lr_warmup_steps: lr_scheduler 'constant_with_warmup' warms up over "
                        "lr_scheduler_params.num_warmup_steps (ai-toolkit's key); set lr_warmup_steps to 0, or use "
                        "lr_scheduler 'constant' with lr_warmup_steps")
    if warmup_steps >= steps:
        problems.append(f"{path}.lr_warmup_steps: must be less than train.steps ({steps}), got {warmup_steps}")
    return problems


def make_lr_scheduler(name: str, optimizer, warmup_steps: int, total_steps: int,
                      params: Optional[Mapping[str, Any]] = None):
    """diffusers' schedule `name` (`constant` with warm-up becomes `constant_with_warmup`); steps once per
    optimizer step. Raises ConfigError for names or parameters the config checks would have refused."""
    from diffusers.optimization import get_scheduler

    params = dict(params or {})
    problems = schedule_problems(name, params, warmup_steps, max(total_steps, warmup_steps + 1), "train")
    if name not in SCHEDULE_PARAMS:
        problems.append(f"train.lr_scheduler: unknown schedule {name!r} ({', '.join(SCHEDULES)})")
    if problems:
        raise ConfigError("\n".join(problems))
    kwargs = {key: params.get(key, default) for key, (_, _, default) in SCHEDULE_PARAMS.get(name, {}).items()}
    if name == "step":
        return _step_schedule(optimizer, warmup_steps, kwargs["step_size"], kwargs["gamma"])
    if name == "constant_with_warmup":
        warmup_steps = kwargs.pop("num_warmup_steps")
    elif name == "constant" and warmup_steps > 0:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                         **kwargs)


def _step_schedule(optimizer, warmup_steps: int, step_size: int, gamma: float):
    """Linear warm-up, then StepLR's shape counted from the end of the warm-up (with no warm-up: StepLR exactly)."""
    from torch.optim.lr_scheduler import LambdaLR

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        return gamma ** ((step - warmup_steps) // step_size)

    return LambdaLR(optimizer, factor)


def planned_lrs(name: str, lr: float, warmup_steps: int, total_steps: int,
                params: Optional[Mapping[str, Any]] = None) -> list[float]:
    """The lr of optimizer steps 1..total_steps (index i is step i + 1), from a copy of the schedule."""
    import torch

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = make_lr_scheduler(name, optimizer, warmup_steps, total_steps, params)
    lrs = []
    for _ in range(total_steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


def schedule_points(lrs: list[float], max_points: int = 1000) -> list[tuple[int, float]]:
    """(step, lr) pairs to plot: every step up to max_points, else an even stride that keeps the last step."""
    stride = max(1, math.ceil(len(lrs) / max_points))
    steps = list(range(1, len(lrs) + 1, stride))
    if steps and steps[-1] != len(lrs):
        steps.append(len(lrs))
    return [(step, lrs[step - 1]) for step in steps]


__all__ = ["SCHEDULES", "SCHEDULE_PARAMS", "make_lr_scheduler", "planned_lrs", "schedule_points",
           "schedule_problems"]
