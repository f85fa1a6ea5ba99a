"""The rank-aware bucket batch sampler, its resume state, and accelerate's split of its global batches."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from toolkit.data.dataset import collate_batch
from toolkit.data.sampler import BucketBatchSampler, fill_to_multiple, rank_slice

# 7 + 4 + 1 items in three buckets, interleaved like a real dataset's items.
KEYS = [(64, 64), (96, 48), (64, 64), (48, 96), (64, 64), (96, 48), (64, 64), (64, 64),
        (96, 48), (64, 64), (96, 48), (64, 64)]


def epoch_batches(sampler: BucketBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_batches_are_full_and_single_bucket():
    sampler = BucketBatchSampler(KEYS, batch_size=4, seed=1)
    batches = epoch_batches(sampler, 0)
    assert len(batches) == len(sampler) == 2 + 1 + 1
    for batch in batches:
        assert len(batch) == 4
        assert len({KEYS[i] for i in batch}) == 1


def test_an_epoch_covers_every_item():
    sampler = BucketBatchSampler(KEYS, batch_size=4, seed=1)
    seen = Counter(i for batch in epoch_batches(sampler, 0) for i in batch)
    assert set(seen) == set(range(len(KEYS)))
    # fill only repeats items of incomplete buckets: 7 -> 8, 4 -> 4, 1 -> 4
    assert sum(seen.values()) == 16


def test_fill_repeats_from_the_start_of_the_shuffled_order():
    assert fill_to_multiple([5, 3, 9], 4) == [5, 3, 9, 5]
    assert fill_to_multiple([5, 3], 5) == [5, 3, 5, 3, 5]
    assert fill_to_multiple([5, 3, 9, 1], 2) == [5, 3, 9, 1]
    sampler = BucketBatchSampler(KEYS, batch_size=4, seed=3)
    square = Counter(i for batch in epoch_batches(sampler, 0) if KEYS[batch[0]] == (64, 64) for i in batch)
    assert sorted(square.values()) == [1, 1, 1, 1, 1, 1, 2]


def test_same_seed_same_order_and_epochs_differ():
    one = BucketBatchSampler(KEYS, batch_size=2, seed=5)
    two = BucketBatchSampler(KEYS, batch_size=2, seed=5)
    assert epoch_batches(one, 0) == epoch_batches(two, 0)
    assert epoch_batches(one, 1) == epoch_batches(two, 1)
    assert epoch_batches(one, 0) != epoch_batches(one, 1)
    assert epoch_batches(one, 0) != epoch_batches(BucketBatchSampler(KEYS, batch_size=2, seed=6), 0)


def test_no_shuffle_is_in_item_order():
    sampler = BucketBatchSampler(KEYS, batch_size=2, seed=0, shuffle=False)
    assert epoch_batches(sampler, 0)[:2] == [[0, 2], [4, 6]]


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_rank_slices_are_disjoint_and_cover_each_global_batch(world_size):
    sampler = BucketBatchSampler(KEYS, batch_size=2 * world_size, seed=2)
    for batch in epoch_batches(sampler, 0):
        slices = [rank_slice(batch, rank, world_size) for rank in range(world_size)]
        assert [i for part in slices for i in part] == batch
        assert all(len(part) == 2 for part in slices)
    with pytest.raises(ValueError):
        rank_slice([0, 1, 2], 0, 2)
    with pytest.raises(ValueError):
        rank_slice([0, 1], 2, 2)


def test_fewer_items_than_world_size_still_gives_full_batches(caplog):
    sampler = BucketBatchSampler([(64, 64)], batch_size=4, seed=0)
    with caplog.at_level(logging.DEBUG, logger="toolkit.data.sampler"):
        assert epoch_batches(sampler, 0) == [[0, 0, 0, 0]]
        list(sampler)  # same epoch again: no second warning
        epoch_batches(sampler, 1)  # nor in later epochs (a 1-pair dataset on 2 GPUs is one epoch per step)
    warnings = [r for r in caplog.records if "items repeat" in r.getMessage()]
    assert len(warnings) == 1
    assert "(64, 64): 1 item(s)" in warnings[0].getMessage()
    assert [rank_slice([0, 0, 0, 0], rank, 4) for rank in range(4)] == [[0]] * 4


@pytest.mark.parametrize("done", [0, 1, 3, 4])
def test_resume_yields_exactly_the_remaining_batches(done):
    first = BucketBatchSampler(KEYS, batch_size=2, seed=9)
    first.set_epoch(3)
    full = list(first)
    iterator = iter(first)
    for _ in range(done):
        next(iterator)
    state = first.state_dict()
    assert state == {"epoch": 3, "batches_done": done}

    resumed = BucketBatchSampler(KEYS, batch_size=2, seed=9)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # the train loop sets the epoch again: the skip must survive
    assert list(resumed) == full[done:]
    assert list(resumed) == full  # the next pass of the same epoch is whole again
    resumed.set_epoch(4)
    assert resumed.state_dict() == {"epoch": 4, "batches_done": 0}
    assert list(resumed) == epoch_batches(first, 4)


def test_bad_state_is_refused():
    sampler = BucketBatchSampler(KEYS, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="batches_done"):
        sampler.load_state_dict({"epoch": 0, "batches_done": 99})
    with pytest.raises(ValueError, match="lacks"):
        sampler.load_state_dict({"epoch": 0})


class FakeItems(Dataset):
    """Items shaped like PairedDataset's, sized by bucket, without image files."""

    def __init__(self, keys):
        self.keys = keys
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, index):
        width, height = self.keys[index]
        image = torch.zeros(3, height, width)
        return {"target": image, "control": image, "caption": f"c{index}", "index": index, "path": f"p{index}"}


@pytest.mark.parametrize("world_size", [2, 4])
def test_accelerate_split_batches_matches_rank_slice(world_size):
    """accelerate gives rank r exactly rank_slice(global_batch, r, world) of every global batch."""
    from accelerate.data_loader import prepare_data_loader

    dataset = FakeItems(KEYS)
    sampler = BucketBatchSampler(KEYS, batch_size=2 * world_size, seed=4)
    sampler.set_epoch(2)
    expected = list(sampler)
    for rank in range(world_size):
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_batch)
        prepared = prepare_data_loader(
            loader, num_processes=world_size, process_index=rank, split_batches=True, put_on_device=False
        )
        assert len(prepared) == len(sampler)
        got = [batch["index"].tolist() for batch in prepared]
        assert got == [rank_slice(batch, rank, world_size) for batch in expected]
        shapes = [tuple(batch["target"].shape[2:]) for batch in prepared]
        assert shapes == [KEYS[batch[0]][::-1] for batch in expected]


def test_accelerate_prepared_loader_resumes_from_sampler_state():
    from accelerate.data_loader import prepare_data_loader

    sampler = BucketBatchSampler(KEYS, batch_size=4, seed=4)
    sampler.set_epoch(1)
    expected = list(sampler)
    sampler.load_state_dict({"epoch": 1, "batches_done": 2})
    loader = DataLoader(FakeItems(KEYS), batch_sampler=sampler, collate_fn=collate_batch)
    prepared = prepare_data_loader(loader, num_processes=2, process_index=1, split_batches=True)
    got = [batch["index"].tolist() for batch in prepared]
    assert got == [rank_slice(batch, 1, 2) for batch in expected[2:]]


def test_accelerate_set_epoch_reaches_the_dataset_but_not_the_sampler():
    """Contract for the trainer: call both prepared_loader.set_epoch(e) and sampler.set_epoch(e) each epoch."""
    from accelerate.data_loader import prepare_data_loader

    dataset = FakeItems(KEYS)
    sampler = BucketBatchSampler(KEYS, 4, 0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_batch)
    prepared = prepare_data_loader(loader, num_processes=2, process_index=0, split_batches=True)
    prepared.set_epoch(3)
    assert dataset.epoch == 3
    assert sampler.epoch == 0
    # accelerate re-applies ITS epoch counter to the dataset when iteration starts: setting only the dataset's
    # epoch is overwritten.
    dataset.set_epoch(5)
    next(iter(prepared))
    assert dataset.epoch == 3


@pytest.mark.parametrize("world_size", [1, 2])
def test_accelerate_resume_with_both_set_epoch_calls(world_size):
    """The trainer's epoch contract: loader.set_epoch(e) and sampler.set_epoch(e) before iterating, also on resume.
    With one process accelerate calls sampler.set_epoch(its pass counter) when iteration starts."""
    from accelerate.data_loader import prepare_data_loader

    reference = BucketBatchSampler(KEYS, batch_size=2 * world_size, seed=4)
    reference.set_epoch(5)
    expected = list(reference)

    dataset = FakeItems(KEYS)
    sampler = BucketBatchSampler(KEYS, batch_size=2 * world_size, seed=4)
    sampler.load_state_dict({"epoch": 5, "batches_done": 1})
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_batch)
    prepared = prepare_data_loader(loader, num_processes=world_size, process_index=0, split_batches=True)
    prepared.set_epoch(5)
    sampler.set_epoch(5)
    got = [batch["index"].tolist() for batch in prepared]
    assert got == [rank_slice(batch, 0, world_size) for batch in expected[1:]]
    assert dataset.epoch == 5 and sampler.state_dict() == {"epoch": 5, "batches_done": len(expected)}
