"""Learning-rate schedules: diffusers' get_scheduler behind strictly checked names and parameters.

`train.lr_scheduler` picks the shape after `train.lr_warmup_steps` of linear warm-up from 0 to `train.lr`;
`train.lr_scheduler_params` holds that shape's own options (only those listed in SCHEDULE_PARAMS). The checks run
at config load (no diffusers import here at module level: the config loader imports this module).

`planned_lrs` computes the whole schedule on a throw-away optimizer, so the planned curve can be written to
TensorBoard at the start of a run without advancing the real scheduler.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

from toolkit.errors import ConfigError

SCHEDULES = ("constant", "cosine", "linear", "cosine_with_restarts")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# name -> {parameter: (check, rule text, default)}
SCHEDULE_PARAMS: dict[str, dict[str, tuple[Callable[[Any], bool], str, Any]]] = {
    "constant": {},
    "cosine": {},
    "linear": {},
    "cosine_with_restarts": {"num_cycles": (_positive_int, "an integer >= 1 (hard restarts of the cosine)", 1)},
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
    if name == "constant" and warmup_steps > 0:
        name = "constant_with_warmup"
    kwargs = {key: params.get(key, default) for key, (_, _, default) in SCHEDULE_PARAMS.get(name, {}).items()}
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                         **kwargs)


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
