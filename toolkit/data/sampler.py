"""Rank-aware bucket batch sampler: aspect-ratio bucketing that works with any number of processes.

``BucketBatchSampler`` yields GLOBAL batches: lists of exactly ``batch_size`` = per-rank batch x world size item
indices, all from one bucket. Every rank builds the same sampler (same bucket keys, seed and epoch) and so gets the
same global batches in the same order; each rank then trains on its own slice of each global batch:

    rank r gets items [r * B : (r + 1) * B] of every global batch, B = batch_size // world_size  (``rank_slice``)

so at every step all ranks train on the same bucket (one image size, no shape mismatch in any collective) and the
ranks see disjoint positions of the epoch.

With accelerate, ``DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_batch)`` prepared with
``split_batches=True`` (``Accelerator(dataloader_config=DataLoaderConfiguration(split_batches=True))``) does exactly
this split (accelerate's BatchSamplerShard; tested in tests/test_sampler.py).

Epochs with accelerate: at the start of EVERY epoch, before iterating, call both ``prepared_loader.set_epoch(e)``
and ``sampler.set_epoch(e)``. Why both: with 2+ processes the prepared loader's set_epoch does not reach a custom
batch sampler (only the dataset); with 1 process it does, and the loader also calls ``set_epoch(its own pass
counter)`` on the sampler and dataset each time iteration starts, so without ``prepared_loader.set_epoch(e)`` a
resumed run would be reset to epoch 0 and lose its skip. Both calls are idempotent.

Filling: a bucket whose item count is not a multiple of ``batch_size`` is completed by repeating items of the same
bucket from the start of its shuffled order; a bucket with fewer items than ``batch_size`` (e.g. fewer images than
GPUs) repeats its items (PairedDataset.fit_buckets merges such buckets first, and tells the user once on the main
process what remains; here it is a debug line on every rank). So every batch is full and no rank ever waits for a batch.

Order independent of the process count: the items of a bucket come in one seeded order per epoch whatever the
batch size, and batches of different buckets are merged by a random key per item (also drawn regardless of the
batch size). With one bucket the sequence of items is exactly the same for any global batch (1 process x 2 or
2 processes x 1), so a resume with another process count continues at the same item; with several buckets the merge
of the buckets differs slightly between batch sizes (each bucket's own order does not).

Resume: ``state_dict()`` is ``{"epoch", "batches_done"}``; after ``load_state_dict`` the next iteration skips the
first ``batches_done`` global batches of that epoch (no image is loaded for them) and the epoch after starts at 0.
``batches_done`` counts batches handed to the DataLoader, which runs ahead of training when batches are prefetched
(DataLoader workers, accelerate's one-batch look-ahead): checkpoints should store the trainer's own count of
batches consumed in the epoch, as ``{"epoch": epoch, "batches_done": steps_done_in_epoch}``.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Any, Hashable, Iterator, Mapping, Sequence

from torch.utils.data import Sampler

logger = logging.getLogger(__name__)


def rank_slice(batch: Sequence[int], rank: int, world_size: int) -> list[int]:
    """The part of a global batch that ``rank`` trains on: items [rank * B : (rank + 1) * B], B = len // world."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if len(batch) % world_size:
        raise ValueError(f"global batch of {len(batch)} items cannot be split evenly across {world_size} ranks")
    per_rank = len(batch) // world_size
    return list(batch[rank * per_rank : (rank + 1) * per_rank])


def group_by_bucket(bucket_keys: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    """Item indices per bucket; buckets in order of first appearance (deterministic without sorting keys)."""
    groups: dict[Hashable, list[int]] = {}
    for index, key in enumerate(bucket_keys):
        groups.setdefault(key, []).append(index)
    return groups


def fill_to_multiple(indices: Sequence[int], batch_size: int) -> list[int]:
    """Extend by cycling from the start until the length is a multiple of ``batch_size`` (at least one batch)."""
    total = max(1, math.ceil(len(indices) / batch_size)) * batch_size
    return [indices[k % len(indices)] for k in range(total)]


class BucketBatchSampler(Sampler[list[int]]):
    """Global batches of ``batch_size`` indices from one bucket each, seeded by (seed, epoch); see module docs."""

    def __init__(
        self, bucket_keys: Sequence[Hashable], batch_size: int, seed: int, shuffle: bool = True
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(bucket_keys) == 0:
            raise ValueError("BucketBatchSampler got no items")
        super().__init__()
        self.batch_size = int(batch_size)  # read by accelerate's split_batches check
        self.seed = int(seed)
        self.shuffle = shuffle
        self.groups = group_by_bucket(bucket_keys)
        self.epoch = 0
        self._skip = 0
        self._batches_done = 0
        self._warned_epoch: int | None = None

    def __len__(self) -> int:
        """Global batches in a full epoch (a resumed epoch yields fewer)."""
        return sum(max(1, math.ceil(len(group) / self.batch_size)) for group in self.groups.values())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch. Setting the epoch already selected (e.g. just after load_state_dict) keeps the skip."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self._skip = 0
            self._batches_done = 0

    def small_buckets(self) -> dict[Hashable, int]:
        """Buckets with fewer items than one global batch, with their item counts (their items repeat)."""
        return {key: len(group) for key, group in self.groups.items() if len(group) < self.batch_size}

    def batches_for_epoch(self, epoch: int) -> list[list[int]]:
        """The full, deterministic list of global batches of an epoch. Same (keys, batch_size, seed, epoch) on
        every rank gives the same list."""
        rng = random.Random(f"bucket-sampler:{self.seed}:{epoch}")
        keyed: list[tuple[float, list[int]]] = []
        for group in self.groups.values():
            order = list(group)
            if self.shuffle:
                rng.shuffle(order)
            # Sorted random keys, one per item, drawn without regard to the batch size: batches are merged across
            # buckets by the key of their first item, so one bucket's items come in `order` whatever the batch size.
            keys = sorted(rng.random() for _ in order) if self.shuffle else [0.0] * len(order)
            filled = fill_to_multiple(order, self.batch_size)
            keyed.extend((keys[start], filled[start : start + self.batch_size])
                         for start in range(0, len(filled), self.batch_size))
        if self.shuffle:
            keyed.sort(key=lambda item: item[0])  # stable: equal keys (none in practice) keep bucket order
        return [batch for _, batch in keyed]

    def _warn_small_buckets(self) -> None:
        small = self.small_buckets()
        # Which buckets are small never changes between epochs: say it once, not once per epoch.
        if small and self._warned_epoch is None:
            self._warned_epoch = self.epoch
            described = ", ".join(f"{key}: {count} item(s)" for key, count in small.items())
            logger.debug(
                "Epoch %d: %d bucket(s) have fewer items than the global batch of %d, so their items repeat within "
                "a batch (%s)", self.epoch, len(small), self.batch_size, described,
            )

    def __iter__(self) -> Iterator[list[int]]:
        # Not a generator itself, so the skip is consumed and the count reset as soon as iter() is called.
        self._warn_small_buckets()
        batches = self.batches_for_epoch(self.epoch)
        skip, self._skip = self._skip, 0
        self._batches_done = skip
        return self._count(batches[skip:])

    def _count(self, batches: list[list[int]]) -> Iterator[list[int]]:
        for batch in batches:
            self._batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Epoch and global batches handed out in it (see the module docs about prefetching)."""
        return {"epoch": self.epoch, "batches_done": self._batches_done}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the next iteration starts after ``batches_done`` global batches of ``epoch``."""
        missing = {"epoch", "batches_done"} - set(state)
        if missing:
            raise ValueError(f"sampler state lacks {sorted(missing)}: {dict(state)}")
        batches_done = int(state["batches_done"])
        if not 0 <= batches_done <= len(self):
            raise ValueError(
                f"sampler state has batches_done={batches_done} but an epoch has {len(self)} batches; "
                "was the dataset or batch size changed since the checkpoint?"
            )
        self.epoch = int(state["epoch"])
        self._skip = batches_done
        self._batches_done = batches_done
