"""datasets[].control_resolution: a control image smaller than the target, its tokens and position ids."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from PIL import ImageOps

import run
from extensions.flux_kontext.packing import kontext_position_ids
from tests.helpers import merge, tiny_config_dict, write_config
from toolkit.data.buckets import control_bucket_for
from toolkit.errors import UserError
from tools.demo_data import random_shapes_image


def test_control_bucket_shrinks_with_area_and_never_grows():
    assert control_bucket_for((1024, 1024), 512) == (512, 512)  # 4096 -> 1024 control tokens
    assert control_bucket_for((1360, 768), 512) == (688, 384)  # the target's aspect, sides multiples of 16
    assert control_bucket_for((512, 512), 768) == (512, 512)
    assert control_bucket_for((1024, 1024), None) == (1024, 1024)


def test_position_ids_are_the_pipelines_for_a_smaller_control():
    target = FluxKontextPipeline._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32)  # 128 px: 16x16 latents
    control = FluxKontextPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)  # 64 px control
    control[..., 0] = 1
    assert torch.equal(kontext_position_ids((16, 16), (8, 8)), torch.cat([target, control]))


def _pairs(folder, size: int, count: int = 2):
    rng = np.random.default_rng(0)
    for sub in ("target", "control"):
        (folder / sub).mkdir(parents=True)
    for i in range(count):
        control = random_shapes_image(rng, size, size)
        control.save(folder / "control" / f"p{i}.png")
        ImageOps.invert(control).save(folder / "target" / f"p{i}.png")
        (folder / "target" / f"p{i}.txt").write_text("invert the colors\n")
    return folder


def test_training_runs_with_fewer_control_tokens(tiny_model_dir, transformer_calls, tmp_path):
    data = _pairs(tmp_path / "data", 128)
    config = merge(tiny_config_dict(tmp_path / "out", tiny_model_dir, data), {
        "datasets": [{"folder_path": str(data / "target"), "control_path": str(data / "control"),
                      "caption_ext": "txt", "caption_dropout_rate": 0.0, "resolution": [128],
                      "control_resolution": 64, "cache_latents_to_disk": True}],
        "train.steps": 2, "train.batch_size": 2, "train.disable_sampling": True})
    assert run.main([str(write_config(tmp_path / "c.yaml", config))]) == 0
    # 128 px target: 8x8 tokens in frame 0; the 64 px control: 4x4 tokens in frame 1 (64 at full size)
    assert transformer_calls == [(80, Counter({0: 64, 1: 16}))] * 2


def test_an_architecture_that_sizes_controls_itself_refuses_it(tmp_path, no_model_load):
    from jobs.extensions import load_extensions
    from jobs.process.BaseSDTrainProcess import BaseSDTrainProcess
    from toolkit.config.loader import load_job_dict

    load_extensions()
    data = _pairs(tmp_path / "data", 64, count=1)
    config = merge(tiny_config_dict(tmp_path / "out", tmp_path / "no-model", data), {
        "model.arch": "qwen_image_edit_plus", "datasets": [{"folder_path": str(data / "target"),
                                                           "control_path": str(data / "control"),
                                                           "control_resolution": 64}]})
    job = load_job_dict(config, "test")
    with pytest.raises(UserError, match="control_resolution: model.arch qwen_image_edit_plus sizes control"):
        BaseSDTrainProcess(job.config.process[0], "x", job).preflight()


def test_changed_region_weights_compare_a_smaller_control_at_the_targets_size():
    from toolkit.data.change_weights import changed_region_weights

    target = torch.zeros(3, 32, 32)
    target[:, :16] = 1.0  # the top half changed
    weights = changed_region_weights(target, torch.zeros(3, 16, 16), blur_px=0, floor=0.1)
    assert weights.shape == (1, 32, 32) and weights[0, :16].mean() > weights[0, 16:].mean()
