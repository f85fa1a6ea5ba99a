"""Paired Kontext datasets: discovery and validation, image loading, resolution buckets, rank-aware batching.

Typical use (the trainer)::

    pairs = discover_pairs(process.datasets)              # raises one DatasetError listing every problem
    dataset = PairedDataset(pairs, process.datasets, process.trigger_word, seed)
    sampler = BucketBatchSampler(dataset.bucket_keys, per_rank_batch * world_size, seed)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_batch)
    # accelerate: prepare the loader with split_batches=True; each rank gets rank_slice() of each global batch.
"""

from toolkit.data.buckets import bucket_for, crop_box, scale_box
from toolkit.data.captions import prepare_caption, read_caption
from toolkit.data.dataset import PairedDataset, caption_rng, collate_batch
from toolkit.data.images import IMAGE_EXTENSIONS, load_rgb, read_image_size, to_tensor, verify_image
from toolkit.data.pairs import DatasetConfigLike, Pair, discover_pairs
from toolkit.data.sampler import BucketBatchSampler, rank_slice

__all__ = [
    "IMAGE_EXTENSIONS",
    "BucketBatchSampler",
    "DatasetConfigLike",
    "Pair",
    "PairedDataset",
    "bucket_for",
    "caption_rng",
    "collate_batch",
    "crop_box",
    "discover_pairs",
    "load_rgb",
    "prepare_caption",
    "rank_slice",
    "read_caption",
    "read_image_size",
    "scale_box",
    "to_tensor",
    "verify_image",
]
