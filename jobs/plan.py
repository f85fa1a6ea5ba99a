"""`python run.py plan CONFIG`: the memory plan of a training config before any weight loads (toolkit.plan), with
the architecture's skeleton from Architecture.plan_model."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Optional

from toolkit.arch import get_architecture
from toolkit.config.loader import find_config_file, load_job_config
from toolkit.config.schema import TrainProcessConfig
from toolkit.errors import UserError
from toolkit.plan.planner import GiB, MemoryPlan, Options, Planner
from toolkit.plan.report import advise, format_plan

log = logging.getLogger(__name__)


def training_process(config: str, index: int) -> TrainProcessConfig:
    """config.process[index] of a training config file (strictly loaded: a bad key is an error here too)."""
    job = load_job_config(find_config_file(config))
    processes = job.config.process
    if not 0 <= index < len(processes):
        raise UserError(f"{config}: --process {index}: the config has {len(processes)} process(es)")
    process = processes[index]
    if not isinstance(process, TrainProcessConfig):
        raise UserError(f"{config}: config.process[{index}] is not a training process (type: sd_trainer)")
    return process


_PLANNERS: dict[tuple, Planner] = {}  # one per model source in this process: its traces are reused


def make_planner(process: TrainProcessConfig, preset: Optional[str] = None) -> Planner:
    model = process.model
    arch = get_architecture(model.arch)
    if preset is not None and preset not in arch.plan_presets():
        raise UserError(f"--preset {preset}: unknown for {arch.name}; known: {', '.join(arch.plan_presets()) or 'none'}")
    key = (arch.name, preset) if preset else (arch.name, model.name_or_path, model.transformer_path)
    if key not in _PLANNERS:
        _PLANNERS[key] = Planner(arch.plan_model(model, preset))
    return _PLANNERS[key]


def plan_config(config: str, gpu_gib: Optional[float] = None, index: int = 0, preset: Optional[str] = None,
                resolution: Optional[int] = None, with_advice: bool = True) -> tuple[MemoryPlan, str]:
    """The plan of config.process[index] and its text (with the advice when it does not fit, or always without
    --gpu-memory)."""
    process = training_process(config, index)
    planner = make_planner(process, preset)
    opts = Options.from_config(process)
    if resolution is not None:
        opts = replace(opts, resolution=resolution)
    gpu_bytes = None if gpu_gib is None else int(gpu_gib * GiB)
    plan = planner.plan(opts, gpu_bytes)
    advice = None
    if with_advice and plan.fits is not True:
        advice = advise(plan, lambda o: planner.plan(o, gpu_bytes, other=False))
    source = f"preset {preset}" if preset else process.model.name_or_path
    title = f"{config} (process {index}, {process.model.arch}, {source})"
    return plan, format_plan(plan, title, advice)
