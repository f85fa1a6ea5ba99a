"""random_crop: a crop at a random place within the bucket's slack, the same for target, controls and mask, drawn
from (seed, epoch, index) so every rank, worker and resume cuts the same."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import merge, tiny_config_dict
from toolkit.config.loader import load_job_dict
from toolkit.data.buckets import crop_box
from toolkit.data.dataset import PairedDataset
from toolkit.data.pairs import Pair
from toolkit.errors import ConfigError


def test_offset_places_the_crop_within_the_slack():
    assert crop_box(200, 100, 64, 64) == (50.0, 0.0, 150.0, 100.0)  # centred
    assert crop_box(200, 100, 64, 64, offset=(0.0, 0.7)) == (0.0, 0.0, 100.0, 100.0)
    assert crop_box(200, 100, 64, 64, offset=(1.0, 0.7)) == (100.0, 0.0, 200.0, 100.0)


@pytest.fixture
def gradient_pair(tmp_path: Path) -> Pair:
    """A 160x64 target (bucket 96x48: a 128x64 crop, 32 px of slack in x) whose pixels are their x coordinate, a
    control twice its size and a mask likewise."""
    ramp = np.tile(np.arange(160, dtype=np.uint8), (64, 1))
    Image.fromarray(np.stack([ramp] * 3, axis=-1)).save(tmp_path / "t.png")
    big = np.tile(np.repeat(np.arange(160, dtype=np.uint8), 2), (128, 1))
    Image.fromarray(np.stack([big] * 3, axis=-1)).save(tmp_path / "c.png")
    Image.fromarray(ramp).save(tmp_path / "m.png")
    return Pair(tmp_path / "t.png", tmp_path / "c.png", "x", (160, 64), (320, 128), mask=tmp_path / "m.png",
                mask_size=(160, 64))


def dataset_cfg(**overrides) -> SimpleNamespace:
    values = dict(caption_ext="txt", default_caption=None, caption_dropout_rate=0.0, shuffle_tokens=False,
                  resolution=[64], num_repeats=1, cache_latents_to_disk=False, random_crop=True)
    return SimpleNamespace(**{**values, **overrides})


def test_random_crop_moves_target_control_and_mask_together_per_epoch(gradient_pair):
    dataset = PairedDataset([gradient_pair], [dataset_cfg()], None, seed=3)
    lefts = []
    for epoch in range(6):
        dataset.set_epoch(epoch)
        item = dataset[0]
        assert item["target"].shape == (3, 48, 96)
        target, control, mask = item["target"][0], item["control"][0], item["mask"][0]
        assert torch.allclose(target, control, atol=0.03)  # the same place of the same ramp
        assert torch.allclose((target + 1) / 2, mask, atol=0.03)
        lefts.append(round(float((target[0, 0] + 1) / 2 * 255)))
        again = dataset[0]["target"]
        assert torch.equal(again, item["target"])  # same (seed, epoch, index): the same crop
    assert len(set(lefts)) >= 4 and all(0 <= left <= 33 for left in lefts)  # epochs cut elsewhere
    centred = PairedDataset([gradient_pair], [dataset_cfg(random_crop=False)], None, seed=3)[0]["target"]
    assert round(float((centred[0, 0, 0] + 1) / 2 * 255)) == 16  # (160 - 128) / 2


def test_random_crop_with_latent_cache_is_refused(tmp_path, tiny_model_dir, demo_data_dir):
    raw = tiny_config_dict(tmp_path / "out", tiny_model_dir, demo_data_dir)
    dataset = {**raw["config"]["process"][0]["datasets"][0], "random_crop": True, "cache_latents": True}
    with pytest.raises(ConfigError, match=r"datasets\[0\].random_crop: cannot be combined with cache_latents"):
        load_job_dict(merge(raw, {"datasets": [dataset]}), "cfg.yaml")
