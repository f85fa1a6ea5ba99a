"""Optimizer and schedule factories: every configured name works, missing extras fail with a clear message."""

import builtins

import pytest
import torch

from toolkit.errors import ConfigError
from toolkit.train.lr_schedule import make_lr_scheduler
from toolkit.train.optim import make_optimizer


@pytest.mark.parametrize("name,lr", [("adamw", 1e-2), ("adamw8bit", 1e-2), ("prodigy", 1.0), ("sgd", 1e-1)])
def test_each_optimizer_reduces_a_quadratic(name, lr):
    w = torch.nn.Parameter(torch.full((64, 64), 2.0))  # 8-bit Adam keeps 8-bit state only for >= 4096 elements
    opt = make_optimizer(name, [w], lr)
    start = (w ** 2).mean().item()
    for _ in range(20):
        opt.zero_grad()
        (w ** 2).mean().backward()
        opt.step()
    assert (w ** 2).mean().item() < start


def test_optimizer_params_are_passed_and_checked():
    w = torch.nn.Parameter(torch.zeros(3))
    opt = make_optimizer("adamw", [w], 1e-3, {"weight_decay": 0.5, "betas": [0.8, 0.9]})
    assert opt.param_groups[0]["weight_decay"] == 0.5
    with pytest.raises(ConfigError, match="optimizer_params"):
        make_optimizer("sgd", [w], 1e-3, {"no_such_option": 1})


def test_missing_optional_package_is_a_clear_error(monkeypatch):
    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name.startswith("bitsandbytes"):
            raise ImportError("no bitsandbytes")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        make_optimizer("adamw8bit", [torch.nn.Parameter(torch.zeros(3))], 1e-3)


@pytest.mark.parametrize("name", ["constant", "cosine", "linear"])
def test_warmup_ramps_then_follows_schedule(name):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_lr_scheduler(name, opt, warmup_steps=4, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(0.5) and lrs[4] == pytest.approx(1.0)
    if name == "constant":
        assert lrs[-1] == pytest.approx(1.0)
    else:
        assert lrs[-1] < 0.2
