"""ai-toolkit's training-semantics keys, as pure functions and config: loss types, timestep tables and
content_or_style, the constant_with_warmup and step schedules, adam and adafactor."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.helpers import merge, tiny_config_dict, write_config
from toolkit.config import ConfigProblems, load_job_config
from toolkit.errors import ConfigError
from toolkit.train import flow_matching, timesteps
from toolkit.train.lr_schedule import planned_lrs
from toolkit.train.optim import make_optimizer


def _load(tmp_path: Path, **overrides):
    cfg = merge(tiny_config_dict(tmp_path / "out", tmp_path / "model", tmp_path / "data"), overrides)
    return load_job_config(write_config(tmp_path / "c.yaml", cfg), environ={}).config.process[0]


def _problems(tmp_path: Path, **overrides) -> list[str]:
    with pytest.raises(ConfigProblems) as caught:
        _load(tmp_path, **overrides)
    return caught.value.problems


# ---------------------------------------------------------------------------------------------- losses

def test_loss_types_match_their_formulas():
    pred = torch.tensor([[0.0, 1.0, -2.0, 0.005]])
    target = torch.zeros(1, 4)
    one = torch.ones(1)
    assert flow_matching.flow_matching_loss(pred, target, one, "mse").item() == pytest.approx((0 + 1 + 4 + 2.5e-5) / 4)
    assert flow_matching.flow_matching_loss(pred, target, one, "mae").item() == pytest.approx((0 + 1 + 2 + 0.005) / 4)
    huber = [math.sqrt(e * e + 1e-4) - 0.01 for e in (0.0, 1.0, -2.0, 0.005)]
    assert flow_matching.flow_matching_loss(pred, target, one, "pseudo_huber").item() == pytest.approx(sum(huber) / 4)
    # per-sample mean, then the timestep weights, as in ai-toolkit
    two = torch.tensor([[1.0, 1.0], [3.0, 3.0]])
    assert flow_matching.flow_matching_loss(two, torch.zeros(2, 2), torch.tensor([2.0, 0.0]), "mae").item() == 1.0


def _pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): FLUX's 2x2 packing."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def _haar(x: torch.Tensor) -> torch.Tensor:
    """One-level orthonormal Haar transform of (B, C, H, W), the four sub-bands concatenated on channels."""
    a, b, c, d = x[..., 0::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    return torch.cat([(a + b + c + d) / 2, (a - b + c - d) / 2, (a + b - c - d) / 2, (a - b - c + d) / 2], dim=1)


def test_ai_toolkit_wavelet_loss_is_the_squared_error_here(tmp_path):
    """ai-toolkit's wavelet loss: mean squared error between the Haar transforms of x0 and of (noise - pred). The
    transform is orthonormal, so it equals the flow-matching MSE; the config value becomes mse."""
    gen = torch.Generator().manual_seed(0)
    x0, noise, pred = (torch.randn(2, 16, 8, 12, generator=gen) for _ in range(3))
    wavelet = (_haar(noise - pred) - _haar(x0)).pow(2).mean()
    packed = flow_matching.flow_matching_loss(_pack(pred), _pack(flow_matching.flow_target(x0, noise)), torch.ones(2))
    assert packed.item() == pytest.approx(wavelet.item(), rel=1e-5)
    assert _load(tmp_path, **{"train.loss_type": "wavelet"}).train.loss_type == "mse"


@pytest.mark.parametrize("value", ["stepped", "mean_flow"])
def test_other_ai_toolkit_loss_types_are_refused_by_name(tmp_path, value):
    (problem,) = _problems(tmp_path, **{"train.loss_type": value})
    assert problem.startswith(f"config.process[0].train.loss_type: {value!r} is not supported here (")


# ---------------------------------------------------------------------------------------------- timesteps

def test_tables_follow_ai_toolkits_scheduler():
    gen = torch.Generator().manual_seed(0)
    linear = timesteps.timestep_table("linear", gen, mu=0.0)
    assert linear[0] == 1000 and linear[-1] == 1 and linear.numel() == 1000
    mu = flow_matching.resolution_shift_mu(1024)
    shifted = timesteps.timestep_table("flux_shift", gen, mu)
    sigma = 500.0 / 1000  # linspace(1000, 1, 1000) at index 500 is 500.0
    assert shifted[500].item() == pytest.approx(1000 * math.exp(mu) / (math.exp(mu) + 1 / sigma - 1), rel=1e-6)
    assert shifted[0].item() == pytest.approx(1000.0) and bool((shifted[:-1] >= shifted[1:]).all())
    blend = timesteps.timestep_table("lognorm_blend", gen, mu)
    assert blend.numel() == 1000 and bool((blend == blend.round()).all()) and bool((blend[:-1] >= blend[1:]).all())
    assert blend.min().item() == 0.0  # the largest log-normal draw maps to 0, as in ai-toolkit
    assert int((blend >= 999).sum()) >= 1 and set(torch.linspace(1000, 1, 250).int().tolist()) <= set(blend.int().tolist())
    sigmoid = timesteps.timestep_table("sigmoid", gen, mu)
    assert bool((sigmoid[:-1] >= sigmoid[1:]).all()) and 300 < sigmoid.median().item() < 700


def test_content_or_style_skews_the_index_cubically():
    gen = torch.Generator().manual_seed(1)
    balanced = timesteps.table_indices("balanced", 20000, gen)
    content = timesteps.table_indices("content", 20000, gen)
    style = timesteps.table_indices("style", 20000, gen)
    assert balanced.min() == 0 and balanced.max() == 998  # randint's exclusive bound, as ai-toolkit
    # P(index < 125) = P(u^3 < 1/8) = 1/2 for content; the same share sits above 875 for style
    assert (content < 125).float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert (style >= 875).float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert (balanced < 125).float().mean().item() == pytest.approx(0.125, abs=0.01)


def test_sample_timesteps_uses_the_table_for_content_style_and_the_new_kinds():
    gen = torch.Generator().manual_seed(2)
    t_content, w = flow_matching.sample_timesteps("linear", 4000, gen, 256, content_or_style="content")
    t_style, _ = flow_matching.sample_timesteps("linear", 4000, gen, 256, content_or_style="style")
    assert t_content.mean() > 0.7 and t_style.mean() < 0.3 and bool((w == 1).all())
    assert ((t_content * 1000) - (t_content * 1000).round()).abs().max() < 1e-3  # values of linspace(1000, 1)
    t_shift, _ = flow_matching.sample_timesteps("flux_shift", 4000, gen, 4096)
    t_plain, _ = flow_matching.sample_timesteps("linear", 4000, gen, 4096)
    assert t_shift.mean() > t_plain.mean() + 0.1  # the shift moves times towards noise at high resolution
    t_blend, _ = flow_matching.sample_timesteps("lognorm_blend", 4000, gen, 256)
    assert t_blend.min() >= 0 and t_blend.max() <= 1 and t_blend.median() > 0.6


# ---------------------------------------------------------------------------------------------- schedules

def test_constant_with_warmup_and_step_have_ai_toolkits_shapes():
    warm = planned_lrs("constant_with_warmup", 1.0, 0, 10, {"num_warmup_steps": 4})
    assert warm == pytest.approx([0, 0.25, 0.5, 0.75, 1, 1, 1, 1, 1, 1])
    assert planned_lrs("constant_with_warmup", 1.0, 0, 1001)[1000] == 1.0  # ai-toolkit's default: 1000 steps
    assert planned_lrs("constant_with_warmup", 1.0, 0, 1001)[500] == pytest.approx(0.5)
    step = planned_lrs("step", 1.0, 0, 7, {"step_size": 3, "gamma": 0.5})
    assert step == pytest.approx([1, 1, 1, 0.5, 0.5, 0.5, 0.25])
    assert planned_lrs("step", 1.0, 2, 6, {"step_size": 2}) == pytest.approx([0, 0.5, 1, 1, 0.1, 0.1])


def test_step_schedule_equals_torch_steplr():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    ref = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.7)
    expected = []
    for _ in range(13):
        expected.append(ref.get_last_lr()[0])
        opt.step()
        ref.step()
    assert planned_lrs("step", 0.3, 0, 13, {"step_size": 4, "gamma": 0.7}) == pytest.approx(expected)


@pytest.mark.parametrize("train,expected", [
    ({"lr_scheduler": "step"}, "train.lr_scheduler_params.step_size: required by lr_scheduler 'step'"),
    ({"lr_scheduler": "step", "lr_scheduler_params": {"step_size": 0}}, "train.lr_scheduler_params.step_size: must"),
    ({"lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 2},
     "train.lr_warmup_steps: lr_scheduler 'constant_with_warmup' warms up over lr_scheduler_params.num_warmup_steps"),
    ({"lr_scheduler": "constant_with_warmup", "lr_scheduler_params": {"total_iters": 5}},
     "train.lr_scheduler_params.total_iters: not a parameter of lr_scheduler 'constant_with_warmup'"),
    ({"lr_scheduler": "polynomial"}, "train.lr_scheduler: 'polynomial' is not supported here ("),
])
def test_bad_new_schedule_configs_name_the_key(tmp_path, train, expected):
    problems = _problems(tmp_path, **{f"train.{k}": v for k, v in train.items()})
    assert any(p.startswith("config.process[0]." + expected) for p in problems), problems


# ---------------------------------------------------------------------------------------------- optimizers

def _steps(opt, w, n=20):
    for _ in range(n):
        opt.zero_grad()
        (w ** 2).mean().backward()
        opt.step()


def test_adam_is_torch_adam_with_ai_toolkits_eps():
    w = torch.nn.Parameter(torch.full((8, 8), 2.0))
    ref_w = torch.nn.Parameter(w.detach().clone())
    opt = make_optimizer("adam", [w], 1e-2)
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["eps"] == 1e-6
    _steps(opt, w)
    _steps(torch.optim.Adam([ref_w], lr=1e-2, eps=1e-6), ref_w)
    assert torch.equal(w, ref_w) and (w ** 2).mean() < 4.0
    assert make_optimizer("adam", [w], 1e-2, {"eps": 1e-8}).param_groups[0]["eps"] == 1e-8


def test_adafactor_follows_train_lr_as_ai_toolkit_configures_it():
    from transformers.optimization import Adafactor

    w = torch.nn.Parameter(torch.full((8, 8), 2.0))
    opt = make_optimizer("adafactor", [w], 1e-2)
    group = opt.param_groups[0]
    assert isinstance(opt, Adafactor) and group["lr"] == 1e-2
    assert (group["relative_step"], group["scale_parameter"], group["warmup_init"]) == (False, False, False)
    before = w.detach().clone()
    _steps(opt, w, n=1)
    # relative_step off, scale_parameter off: the first update is lr times the RMS-clipped normalised gradient
    assert (before - w.detach()).abs().max().item() == pytest.approx(1e-2, rel=1e-3)
    with pytest.raises(ConfigError, match="optimizer_params do not fit optimizer 'adafactor'"):
        make_optimizer("adafactor", [w], 1e-2, {"relative_step": True})


@pytest.mark.parametrize("value,names", [("automagic", ("adamw8bit", "prodigy")), ("prodigy8bit", ("prodigy",))])
def test_ai_toolkits_own_optimizers_are_refused_with_an_alternative(tmp_path, value, names):
    (problem,) = _problems(tmp_path, **{"train.optimizer": value})
    assert problem.startswith(f"config.process[0].train.optimizer: {value!r} is not supported here (")
    assert all(name in problem for name in names)


def test_new_keys_load_from_an_ai_toolkit_config(tmp_path):
    process = _load(tmp_path, **{"train.optimizer": "adafactor", "train.loss_type": "mae",
                                 "train.content_or_style": "style", "train.timestep_type": "lognorm_blend",
                                 "train.force_first_sample": True, "sample.sample_start_step": 100,
                                 "train.lr_scheduler": "step", "train.lr_scheduler_params": {"step_size": 2}})
    t = process.train
    assert (t.optimizer, t.loss_type, t.content_or_style, t.timestep_type, t.force_first_sample) == \
        ("adafactor", "mae", "style", "lognorm_blend", True)
    assert process.sample.sample_start_step == 100
