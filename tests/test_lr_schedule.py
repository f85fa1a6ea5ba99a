"""Learning-rate schedules: diffusers' shapes with warm-up, strict names and parameters, the planned curve in
TensorBoard, and a resumed run that continues the schedule exactly."""

from __future__ import annotations

import math

import pytest
import torch

import run
from tests.example_configs import assert_same_final_lora, example_config, resume_from_copy, scalars
from tests.helpers import merge, tiny_config_dict, write_config
from toolkit.config import ConfigProblems, load_job_config
from toolkit.errors import ConfigError
from toolkit.train.lr_schedule import make_lr_scheduler, planned_lrs, schedule_points

EXAMPLE = "train_lora_flux_kontext_lr_schedule_tiny"


def test_each_schedule_has_the_documented_shape():
    warm, total = 4, 24
    for name in ("constant", "cosine", "linear", "cosine_with_restarts"):
        lrs = planned_lrs(name, 1.0, warm, total, {"num_cycles": 2} if name == "cosine_with_restarts" else None)
        assert len(lrs) == total and lrs[:warm + 1] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0]), name
    assert planned_lrs("constant", 1.0, 4, 24)[-1] == 1.0
    assert planned_lrs("linear", 1.0, 4, 24)[14] == pytest.approx(0.5)  # halfway through the 20 decay steps
    assert planned_lrs("cosine", 1.0, 4, 24)[14] == pytest.approx(0.5)
    restarts = planned_lrs("cosine_with_restarts", 1.0, 4, 24, {"num_cycles": 2})
    # two cosine cycles of 10 steps after the warm-up: back to the peak at the restart
    assert restarts[13] < 0.05 and restarts[14] == pytest.approx(1.0)
    assert restarts[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_planning_does_not_advance_a_real_scheduler():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_lr_scheduler("cosine", opt, 2, 10)
    planned_lrs("cosine", 1.0, 2, 10)
    assert sched.last_epoch == 0 and sched.get_last_lr() == [0.0]


def test_schedule_points_keep_the_last_step():
    assert schedule_points([1.0, 2.0, 3.0]) == [(1, 1.0), (2, 2.0), (3, 3.0)]
    points = schedule_points([float(i) for i in range(2500)], max_points=1000)
    assert len(points) <= 1001 and points[0] == (1, 0.0) and points[-1] == (2500, 2499.0)


@pytest.mark.parametrize("train,expected", [
    ({"lr_scheduler": "cosine_with_restarts", "lr_scheduler_params": {"T_0": 10}},
     "train.lr_scheduler_params.T_0: not a parameter of lr_scheduler 'cosine_with_restarts' (its parameters: "
     "num_cycles)"),
    ({"lr_scheduler": "cosine", "lr_scheduler_params": {"num_cycles": 2}},
     "train.lr_scheduler_params.num_cycles: not a parameter of lr_scheduler 'cosine' (its parameters: none)"),
    ({"lr_scheduler": "cosine_with_restarts", "lr_scheduler_params": {"num_cycles": 0.5}},
     "train.lr_scheduler_params.num_cycles: must be an integer >= 1"),
    ({"lr_scheduler": "linear", "lr_warmup_steps": 4, "steps": 4},
     "train.lr_warmup_steps: must be less than train.steps (4), got 4"),
    ({"lr_scheduler": "cosine_restarts"}, "train.lr_scheduler: got 'cosine_restarts' (string), expected one of"),
])
def test_bad_schedule_config_names_the_key(tmp_path, train, expected):
    cfg = tiny_config_dict(tmp_path / "out", tmp_path / "model", tmp_path / "data")
    cfg = merge(cfg, {f"train.{k}": v for k, v in train.items()})
    with pytest.raises(ConfigProblems) as caught:
        load_job_config(write_config(tmp_path / "c.yaml", cfg), environ={})
    assert any(p.startswith("config.process[0]." + expected.split(":")[0]) and expected in p
               for p in caught.value.problems), caught.value.problems


def test_factory_refuses_unknown_names_and_params():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match="unknown schedule 'polynomial'"):
        make_lr_scheduler("polynomial", opt, 0, 10)
    with pytest.raises(ConfigError, match="lr_scheduler_params.power"):
        make_lr_scheduler("linear", opt, 0, 10, {"power": 2})


def test_example_logs_the_plan_and_resume_continues_it_exactly(tmp_path, tiny_model_dir, demo_data_dir):
    """8 steps of the shipped example (warm-up 2, 2 restarts), a state at step 4; then the run is put back to step 4
    and resumed: same final LoRA, bit for bit, and the logged lr of every step follows the plan."""
    overrides = {"train.lr_warmup_steps": 2, "train.lr_scheduler_params": {"num_cycles": 2},
                 "save.save_every": 4, "save.max_step_saves_to_keep": 5}
    config = example_config(EXAMPLE, tmp_path / "a", tiny_model_dir, demo_data_dir, steps=8, **overrides)
    assert run.main([str(config)]) == 0
    run_dir = tmp_path / "a" / "output" / "tiny_kontext_lr_schedule"
    job = load_job_config(config).config.process[0].train
    assert (job.lr_scheduler, job.lr_warmup_steps, job.lr_scheduler_params) == ("cosine_with_restarts", 2,
                                                                                 {"num_cycles": 2})
    plan = planned_lrs("cosine_with_restarts", job.lr, 2, 8, {"num_cycles": 2})
    assert plan[0] == 0.0 and max(plan) == pytest.approx(job.lr) and plan[-1] < plan[-2]
    logged_plan = scalars(run_dir / "logs", "train/lr_schedule")
    assert logged_plan == {s: pytest.approx(lr) for s, lr in enumerate(plan, 1)}
    assert scalars(run_dir / "logs", "train/lr") == {s: pytest.approx(lr) for s, lr in enumerate(plan, 1)}

    resumed_dir = resume_from_copy(EXAMPLE, run_dir, tmp_path / "b", tiny_model_dir, demo_data_dir, 8, 4, **overrides)
    after = scalars(resumed_dir / "logs", "train/lr")
    assert sorted(after) == [5, 6, 7, 8] and after == {s: pytest.approx(plan[s - 1]) for s in range(5, 9)}
    assert_same_final_lora(run_dir, resumed_dir)
