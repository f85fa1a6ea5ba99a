"""ai-toolkit's training keys in real runs of the tiny pipeline: the step uses loss_type, timestep_type and
content_or_style; force_first_sample and sample.sample_start_step decide which samples are made."""

from __future__ import annotations

from pathlib import Path

from jobs import get_job
from tests.helpers import merge, tiny_config_dict, write_config
from toolkit.train import flow_matching


def _run(tmp_path: Path, model_dir, data_dir, **overrides) -> Path:
    cfg = merge(tiny_config_dict(tmp_path / "out", model_dir, data_dir), overrides)
    get_job(write_config(tmp_path / "cfg.yaml", cfg)).run()
    return tmp_path / "out" / "tiny"


def _sample_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[0]) for p in (run_dir / "samples").glob("*_00.png"))


def test_step_uses_loss_type_timestep_type_and_content_or_style(tmp_path, tiny_model_dir, demo_data_dir, monkeypatch):
    seen = {}
    real_loss, real_times = flow_matching.flow_matching_loss, flow_matching.sample_timesteps

    def loss_spy(pred, target, weights, loss_type="mse", element_weights=None):
        seen["loss_type"] = loss_type
        return real_loss(pred, target, weights, loss_type, element_weights)

    def times_spy(kind, *args, content_or_style="balanced", **kwargs):
        seen["times"] = (kind, content_or_style)
        return real_times(kind, *args, content_or_style=content_or_style, **kwargs)

    monkeypatch.setattr(flow_matching, "flow_matching_loss", loss_spy)
    monkeypatch.setattr(flow_matching, "sample_timesteps", times_spy)
    _run(tmp_path, tiny_model_dir, demo_data_dir, **{"train.steps": 1, "train.loss_type": "mae",
                                                      "train.timestep_type": "flux_shift",
                                                      "train.content_or_style": "content"})
    assert seen == {"loss_type": "mae", "times": ("flux_shift", "content")}


def test_sample_start_step_holds_back_periodic_samples(tmp_path, tiny_model_dir, demo_data_dir):
    run_dir = _run(tmp_path, tiny_model_dir, demo_data_dir, **{"train.steps": 4, "train.skip_first_sample": False,
                                                                "sample.sample_every": 1,
                                                                "sample.sample_start_step": 3})
    assert _sample_steps(run_dir) == [0, 3, 4]  # ai-toolkit: the before-training sample is not held back


def test_force_first_sample_samples_before_a_resumed_run(tmp_path, tiny_model_dir, demo_data_dir):
    common = {"train.skip_first_sample": False, "save.save_every": 2, "sample.sample_every": 1000}
    run_dir = _run(tmp_path, tiny_model_dir, demo_data_dir, **{**common, "train.steps": 2})
    assert _sample_steps(run_dir) == [0, 2]
    for step in (0, 2):
        for png in (run_dir / "samples").glob(f"{step:09d}_*.png"):
            png.unlink()
    _run(tmp_path, tiny_model_dir, demo_data_dir, **{**common, "train.steps": 3, "train.resume_from": "latest"})
    assert _sample_steps(run_dir) == [3]  # a resume makes no before-training sample by default
    _run(tmp_path, tiny_model_dir, demo_data_dir, **{**common, "train.steps": 4, "train.resume_from": "latest",
                                                     "train.force_first_sample": True})
    assert _sample_steps(run_dir) == [3, 4]  # sampled at the resumed step 3, before training, then the final one
