"""PairedDataset items: shapes, range, control cropping, caption determinism, collate."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from toolkit.data.dataset import PairedDataset, collate_batch
from toolkit.data.pairs import Pair
from toolkit.data.sampler import BucketBatchSampler
from toolkit.errors import DatasetError


def dataset_cfg(**overrides) -> SimpleNamespace:
    values = dict(
        folder_path="unused", control_path="unused", caption_ext="txt", default_caption=None,
        caption_dropout_rate=0.0, shuffle_tokens=False, resolution=[64], num_repeats=1, cache_latents_to_disk=False,
    )
    values.update(overrides)
    return SimpleNamespace(**values)


def striped(size: tuple[int, int], red_until: int, white_until: int) -> Image.Image:
    """Red columns [0, red_until), white [red_until, white_until), black after."""
    width, height = size
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[:, :red_until] = (255, 0, 0)
    arr[:, red_until:white_until] = 255
    return Image.fromarray(arr)


def make_pair(tmp_path: Path, name: str, target: Image.Image, control: Image.Image, caption: str = "x") -> Pair:
    target_path, control_path = tmp_path / f"{name}_t.png", tmp_path / f"{name}_c.png"
    target.save(target_path)
    control.save(control_path)
    return Pair(target_path, control_path, caption, target.size, control.size)


@pytest.fixture
def marked_pair(tmp_path) -> Pair:
    """Target 240x100 (bucket 96x48 at R=64, crop box x 20..220); control is the same picture at 2x (480x200)."""
    return make_pair(tmp_path, "m", striped((240, 100), 20, 70), striped((480, 200), 40, 140))


def test_items_have_bucket_shape_and_range(marked_pair):
    dataset = PairedDataset([marked_pair], [dataset_cfg(resolution=[64, 32])], trigger_word=None, seed=0)
    assert dataset.bucket_keys == [(96, 48), (48, 16)]
    for index, (width, height) in enumerate(dataset.bucket_keys):
        item = dataset[index]
        assert item["target"].shape == (3, height, width) == item["control"].shape
        assert item["target"].dtype == torch.float32
        assert item["target"].min() >= -1.0 and item["target"].max() <= 1.0
        assert item["index"] == index and item["path"] == str(marked_pair.target)


@pytest.mark.parametrize("control_size,red_until,white_until", [((480, 200), 40, 140), ((240, 200), 20, 70)])
def test_control_is_cropped_with_the_scaled_box(tmp_path, control_size, red_until, white_until):
    """The control shows the same picture as the target at another size (2x; or stretched 2x vertically, where its
    own centred crop would keep the red band). It must be cut with the target's box mapped onto it."""
    pair = make_pair(tmp_path, "s", striped((240, 100), 20, 70), striped(control_size, red_until, white_until))
    item = PairedDataset([pair], [dataset_cfg()], trigger_word=None, seed=0)[0]
    target, control = item["target"], item["control"]
    # crop box starts at target x=20 / control x=40: red is cut away, white spans bucket columns 0..23
    for image in (target, control):
        assert image[:, :, 3:20].min() > 0.9  # white
        assert image[:, :, 30:].max() < -0.9  # black
        red_excess = image[0] - image[1]
        assert red_excess.max() < 0.2  # no red band survived the crop
    assert (target - control).abs().mean() < 0.02


def test_repeats_and_resolutions_multiply_items(marked_pair):
    dataset = PairedDataset([marked_pair], [dataset_cfg(resolution=[64, 32], num_repeats=3)], None, seed=0)
    assert len(dataset) == 6
    assert dataset.bucket_keys == [(96, 48)] * 3 + [(48, 16)] * 3


def test_caption_randomness_is_deterministic_per_seed_epoch_index(tmp_path):
    image = Image.new("RGB", (32, 32), (9, 9, 9))
    pair = make_pair(tmp_path, "c", image, image, caption="a, b, c, d, e, f, g")
    cfg = dataset_cfg(resolution=[32], num_repeats=40, shuffle_tokens=True, caption_dropout_rate=0.3)

    def captions(seed: int, epoch: int) -> list[str]:
        dataset = PairedDataset([pair], [cfg], trigger_word="ohwx", seed=seed)
        dataset.set_epoch(epoch)
        return [dataset[i]["caption"] for i in range(len(dataset))]

    first = captions(seed=1, epoch=0)
    assert first == captions(seed=1, epoch=0)  # another process / a resumed run
    assert first != captions(seed=1, epoch=1)
    assert first != captions(seed=2, epoch=0)
    assert "" in first and len(set(first)) > 10
    assert all(c == "" or c.startswith("ohwx, ") for c in first)


def test_collate_stacks_one_bucket(marked_pair):
    dataset = PairedDataset([marked_pair], [dataset_cfg(num_repeats=2)], trigger_word="ohwx", seed=0)
    batch = collate_batch([dataset[0], dataset[1]])
    assert batch["target"].shape == (2, 3, 48, 96) == batch["control"].shape
    assert batch["caption"] == ["ohwx, x", "ohwx, x"]
    assert batch["index"].dtype == torch.long and batch["index"].tolist() == [0, 1]
    assert batch["path"] == [str(marked_pair.target)] * 2


def test_collate_refuses_mixed_buckets(marked_pair):
    dataset = PairedDataset([marked_pair], [dataset_cfg(resolution=[64, 32])], trigger_word=None, seed=0)
    with pytest.raises(ValueError, match="mixes image sizes"):
        collate_batch([dataset[0], dataset[1]])


def test_dataloader_with_bucket_sampler(tmp_path, marked_pair):
    tall = make_pair(tmp_path, "tall", Image.new("RGB", (32, 64)), Image.new("RGB", (32, 64)))
    dataset = PairedDataset([marked_pair, tall], [dataset_cfg(num_repeats=3)], trigger_word=None, seed=0)
    sampler = BucketBatchSampler(dataset.bucket_keys, batch_size=2, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_batch)
    shapes = sorted(tuple(batch["target"].shape) for batch in loader)
    assert shapes == [(2, 3, 48, 96)] * 2 + [(2, 3, 64, 32)] * 2


def test_image_changed_after_discovery_is_reported(tmp_path, marked_pair):
    dataset = PairedDataset([marked_pair], [dataset_cfg()], trigger_word=None, seed=0)
    Image.new("RGB", (50, 50)).save(marked_pair.control)
    with pytest.raises(DatasetError, match="when the dataset was checked"):
        dataset[0]


def test_pair_with_unknown_dataset_index_is_refused(marked_pair):
    with pytest.raises(ValueError, match="refers to dataset 0"):
        PairedDataset([marked_pair], [], trigger_word=None, seed=0)
