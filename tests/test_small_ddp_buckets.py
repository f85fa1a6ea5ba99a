"""Small datasets under several processes (issue 22 item 7): buckets with fewer items than a global batch are
merged (never upscaling) so an epoch has no repeated items, or one message on the main process says what to do."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from toolkit.data.buckets import bucket_for, merge_small_buckets
from toolkit.data.sampler import BucketBatchSampler

# 12 phone and camera photos of mixed aspect ratios, as a new user's first dataset might be.
PHOTOS = [(4032, 3024), (4032, 3024), (4032, 3024), (4000, 3000), (4032, 3024), (3024, 4032), (3024, 4032),
          (3000, 3000), (1920, 1080), (1080, 1920), (6000, 4000), (4000, 6000)]


def _batches_per_epoch(buckets, global_batch: int) -> int:
    return len(BucketBatchSampler(buckets, batch_size=global_batch, seed=0))


def test_twelve_mixed_photos_fill_every_batch_of_two_processes():
    buckets = [bucket_for(w, h, 512) for w, h in PHOTOS]
    counts = Counter(buckets)
    assert len(counts) == 7 and sum(1 for c in counts.values() if c < 2) == 5  # the 12 photos -> 7 buckets
    before = _batches_per_epoch(buckets, 2)
    mapping = merge_small_buckets(dict(counts), 2)
    merged = [mapping[b] for b in buckets]
    after = _batches_per_epoch(merged, 2)
    assert (before, after) == (9, 6)  # 18 item slots for 12 photos, now 12: no photo repeats within an epoch
    assert min(Counter(merged).values()) >= 2
    for (w, h), bucket in zip(PHOTOS, merged):  # never larger than the photo's own bucket: no upscaling
        own = bucket_for(w, h, 512)
        assert bucket[0] <= own[0] and bucket[1] <= own[1] and bucket[0] % 16 == 0 and bucket[1] % 16 == 0


def test_buckets_that_are_full_already_are_left_alone():
    counts = {(512, 512): 4, (592, 448): 2}
    assert merge_small_buckets(counts, 2) == {(512, 512): (512, 512), (592, 448): (592, 448)}


def test_fewer_items_than_a_batch_in_total_is_one_message_with_the_remedy(tmp_path):
    from PIL import Image

    from toolkit.data.dataset import PairedDataset
    from toolkit.data.pairs import Pair

    Image.new("RGB", (64, 48)).save(tmp_path / "t.png")
    pair = Pair(tmp_path / "t.png", tmp_path / "t.png", "x", (64, 48), (64, 48))
    ds = PairedDataset([pair], [_dataset_cfg()], trigger_word=None, seed=0)
    notes = ds.fit_buckets(2)
    assert len(notes) == 1 and "fewer items than the global batch of 2" in notes[0][1]
    assert "lower train.batch_size or use fewer processes" in notes[0][1]


def test_merged_items_are_recut_for_their_new_bucket(tmp_path):
    from PIL import Image

    from toolkit.data.dataset import PairedDataset
    from toolkit.data.pairs import Pair

    pairs = []
    for i, size in enumerate([(96, 64), (64, 96), (64, 48), (48, 64)]):
        path = Path(tmp_path / f"p{i}.png")
        Image.new("RGB", size).save(path)
        pairs.append(Pair(path, path, "x", size, size))
    ds = PairedDataset(pairs, [_dataset_cfg()], trigger_word=None, seed=0)
    assert len(set(ds.bucket_keys)) == 4
    notes = ds.fit_buckets(2)
    assert "bucketing: 4 buckets -> 2" in notes[0][1]
    for i in range(len(ds)):
        item = ds[i]
        w, h = ds.bucket_keys[i]
        assert tuple(item["target"].shape[1:]) == (h, w) == tuple(item["control"].shape[1:])
    assert math.prod(Counter(ds.bucket_keys).values()) == 4


def _dataset_cfg():
    from toolkit.config.schema import DatasetConfig

    return DatasetConfig(folder_path="t", control_path="c", resolution=[64], caption_dropout_rate=0.0)


def test_very_different_shapes_are_not_merged_into_heavy_crops():
    counts = {(80, 48): 1, (48, 80): 1}  # 5:3 and 3:5: a shared 48x48 bucket would cut 40% of each image
    assert merge_small_buckets(counts, 2) == {(80, 48): (80, 48), (48, 80): (48, 80)}
