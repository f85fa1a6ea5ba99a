"""The memory planner (run.py plan, toolkit.plan): parts, verdict and advice, byte formats against the libraries'
real ones, and the plan against a measured CPU step of the tiny model (tools.plan_check; the medium model's figures
are in docs/benchmarks.md)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from jobs.commands import PLAN_DOES_NOT_FIT
from jobs.extensions import load_extensions
from jobs.plan import make_planner, training_process
from tests.helpers import tiny_config_dict, write_config
from toolkit.errors import UserError
from toolkit.plan.model import read_configs
from toolkit.plan.parts import optimizer_state_bytes, quantized_bytes
from toolkit.plan.planner import Options
from toolkit.plan.trace import PeakTracker
from toolkit.train.optim import make_optimizer


@pytest.fixture(scope="module")
def tiny_plan_config(tmp_path_factory, tiny_model_dir, demo_data_dir) -> Path:
    folder = tmp_path_factory.mktemp("plan")
    return write_config(folder / "tiny.yaml", tiny_config_dict(folder / "out", tiny_model_dir, demo_data_dir))


@pytest.fixture(scope="module")
def tiny_planner(tiny_plan_config):
    load_extensions()
    process = training_process(str(tiny_plan_config), 0)
    return make_planner(process), Options.from_config(process)


def test_plan_command_prints_parts_total_verdict_and_advice(tiny_plan_config, capsys):
    import run

    # too small: the verdict, the advice with each change's peak, and its own exit status (2 is a bad config)
    assert run.main(["plan", str(tiny_plan_config), "--gpu-memory", "0.000001"]) == PLAN_DOES_NOT_FIT == 3
    out = capsys.readouterr().out
    for part in ("transformer weights (float32)", "text encoders", "VAE", "trained weights (lora rank 4)",
                 "gradients", "optimizer states (adamw)", "activations", "training peak", "loading peak",
                 "activations with gradient checkpointing on"):
        assert part in out
    assert "Verdict: DOES NOT FIT" in out
    for change in ("model.quantize: true", "train.gradient_checkpointing: true", "train.cache_text_embeddings: true",
                   "all of the above"):
        assert change in out


def test_quantize_and_text_caching_change_the_parts(tiny_planner):
    planner, opts = tiny_planner
    plan = planner.plan(opts, gpu_bytes=2 ** 30, other=False)
    assert plan.fits and plan.peak == max(plan.train_peak, plan.load_peak) == sum(p.nbytes for p in plan.parts)
    full = {p.name: p.nbytes for p in plan.parts}
    for qtype in ("qint8", "qfloat8"):
        q = {p.name: p.nbytes for p in planner.plan(replace(opts, quantize=True, qtype=qtype), other=False).parts}
        assert full["transformer weights (float32)"] * 0.25 < q[f"transformer weights ({qtype})"] \
            < full["transformer weights (float32)"] * 0.5  # 1 byte instead of 4, plus the layers kept in fp32
    cached = planner.plan(replace(opts, text_cached=True), other=False)
    plain = planner.plan(opts, other=False)
    te = next(p for p in plain.parts if p.name == "text encoders")
    assert te.nbytes > 0 and next(p for p in cached.parts if p.name == "text encoders").nbytes == 0
    assert plain.train_peak - cached.train_peak >= te.nbytes  # the text encoding's step peak goes too


def test_quantized_bytes_match_quanto(tiny_model_dir):
    from diffusers import FluxTransformer2DModel

    from extensions.flux_kontext.quantize import quantize_frozen, safe_exclude

    planned_model = FluxTransformer2DModel.from_pretrained(tiny_model_dir / "transformer").requires_grad_(False)
    exclude = safe_exclude(planned_model, "qint8", torch.float32)
    planned = quantized_bytes(planned_model, exclude, torch.float32)
    quantize_frozen(planned_model, "qint8", exclude)
    real = sum(t.numel() * t.element_size() for t in planned_model.state_dict().values())
    assert abs(planned - real) / real < 0.02, (planned, real)


@pytest.mark.parametrize("name, extra", [("adamw", {}), ("adam", {}), ("adamw8bit", {}), ("adafactor", {}),
                                         ("prodigy", {}), ("sgd", {"momentum": 0.9}), ("sgd", {})])
def test_optimizer_state_bytes_match_the_optimizers(name, extra):
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in ((8, 1024), (1024, 8), (64,), (16, 16))]
    optimizer = make_optimizer(name, params, 1e-4, extra)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    storages = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for state in optimizer.state.values()
                for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0}  # shared maps once
    real = sum(storages.values())
    planned = optimizer_state_bytes(name, params, extra)
    assert abs(planned - real) <= 0.02 * max(real, 1), (planned, real)


def test_tracker_counts_new_memory_not_views_of_weights():
    layer = torch.nn.Linear(256, 256).requires_grad_(False)
    x = torch.randn(8, 256)
    with PeakTracker() as tracker:
        layer(x)
    assert tracker.peak == 8 * 256 * 4  # the output only: weight.t() is a view of memory that already existed


def test_uncached_hub_model_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        read_configs("nobody/no-such-model", ("transformer",))


def test_flux_kontext_dev_preset_has_the_published_sizes():
    load_extensions()
    from toolkit.arch import get_architecture

    pm = get_architecture("flux_kontext").plan_model(None, "flux-kontext-dev")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert round(count(pm.transformer) / 1e9, 1) == 11.9 and pm.block_counts == {"num_layers": 19,
                                                                                  "num_single_layers": 38}
    assert round(count(pm.text_encoders["text_encoder_2"]) / 1e9, 2) == 4.76
    assert round(count(pm.text_encoders["text_encoder"]) / 1e6) == 123
    assert round(count(pm.vae) / 1e6) == 84


def test_plan_is_within_25_percent_of_a_measured_tiny_step(tiny_plan_config):
    from tools.plan_check import check

    for result in check(str(tiny_plan_config), steps=1):
        assert abs(result["error"]) < 0.25, result
