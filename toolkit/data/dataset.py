"""The map-style dataset of paired (target, control, caption) items, and the batch collate function.

One item per (pair, resolution, repeat). Buckets and crop boxes are computed at construction from the sizes that
discovery measured, so building the dataset does no image I/O and ``bucket_keys`` is ready for the sampler.

Caption randomness (dropout, token shuffle) comes from a ``random.Random`` derived from (seed, epoch, index) alone,
so it is the same on every rank, in every DataLoader worker and after a resume. The epoch reaches the dataset via
``set_epoch``; with DataLoader workers, call it before creating the iterator and do not use
``persistent_workers=True`` (persistent workers keep the epoch they were started with).

With a cache attached (``attach_cache``, filled by toolkit.data.cache), items carry the cached tensors (e.g. latents, text
embeddings) instead of pixels, so cached runs never decode nor resize images.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from toolkit.data.batch import collate_batch, control_key, control_names, without_controls
from toolkit.data.buckets import Box, bucket_for, control_bucket_for, crop_box, merge_small_buckets, scale_box
from toolkit.data.captions import caption_lines, line_rng, pick_line, prepare_caption
from toolkit.data.change_weights import changed_region_weights
from toolkit.data.images import load_rgb, to_tensor
from toolkit.data.masks import load_mask
from toolkit.data.pairs import DatasetConfigLike, Pair
from toolkit.errors import DatasetError

logger = logging.getLogger(__name__)

# Part of every latent cache key: bump when render()/load_rgb()/to_tensor() would give other pixels for a file.
PIXEL_PIPELINE_VERSION = 1


@dataclass(frozen=True)
class ItemPlan:
    """What one dataset item is: which pair, trained at which bucket, cut with which boxes (source pixels)."""

    pair_index: int
    resolution: int
    bucket: tuple[int, int]
    target_box: Box
    control_box: Optional[Box]  # None: the pair has no control image (dataset without control_path)
    extra_control_boxes: tuple[Box, ...] = ()  # of Pair.extra_controls
    flip: tuple[bool, bool] = (False, False)  # (mirror left-right, mirror top-bottom) after the resize
    mask_box: Optional[Box] = None  # of Pair.mask (dataset mask_path)


# ai-toolkit's defaults of the dataset options that duck-typed configs (tests, tools) may leave out.
OPTION_DEFAULTS: dict[str, Any] = {"flip_x": False, "flip_y": False, "loss_multiplier": 1.0, "trigger_word": None,
                                   "keep_tokens": 0, "token_dropout_rate": 0.0, "network_weight": 1.0,
                                   "mask_path": None, "mask_min_value": 0.0, "invert_mask": False, "is_reg": False,
                                   "random_crop": False, "control_dropout_rate": 0.0, "changed_region_loss": False,
                                   "changed_region_floor": 0.1, "changed_region_blur": 8, "caption_per_line": True,
                                   "control_resolution": None}


def option(cfg: DatasetConfigLike, name: str) -> Any:
    """Dataset option `name` of `cfg` (toolkit.config.schema.DatasetConfig has them all)."""
    return getattr(cfg, name, OPTION_DEFAULTS[name])


def flips(flip_x: bool, flip_y: bool) -> list[tuple[bool, bool]]:
    """The (x, y) mirrorings trained per item, as ai-toolkit adds them: flip_x adds a mirrored copy of every item,
    then flip_y an upside-down copy of every item including those copies."""
    variants = [(False, False)]
    if flip_x:
        variants += [(True, y) for _, y in variants]
    if flip_y:
        variants += [(x, True) for x, _ in variants]
    return variants


def caption_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The caption RNG of one item in one epoch; string seeding is stable across processes and Python runs."""
    return random.Random(f"caption:{seed}:{epoch}:{index}")


def control_dropout_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The RNG that decides whether item `index` trains without its control images in `epoch` (control_dropout_rate):
    a function of (seed, epoch, index) only, so every rank, worker and resumed run draws the same."""
    return random.Random(f"control-dropout:{seed}:{epoch}:{index}")


def plan_items(pairs: Sequence[Pair], datasets: Sequence[DatasetConfigLike]) -> list[ItemPlan]:
    """One ItemPlan per (pair, resolution, repeat), in pair order. Pure: uses only sizes stored in the pairs."""
    plans: list[ItemPlan] = []
    for pair_index, pair in enumerate(pairs):
        if not 0 <= pair.dataset_index < len(datasets):
            raise ValueError(f"pair {pair.target} refers to dataset {pair.dataset_index}; only {len(datasets)} given")
        cfg = datasets[pair.dataset_index]
        if cfg.num_repeats < 1:
            raise ValueError(f"num_repeats must be >= 1, got {cfg.num_repeats}")
        for resolution in cfg.resolution:
            bucket = bucket_for(*pair.target_size, resolution)
            target_box = crop_box(*pair.target_size, *bucket)
            # Every control image is cut to the target's crop and resized to the target's bucket.
            control_boxes = [scale_box(target_box, pair.target_size, size) for size in pair.control_sizes] or [None]
            mask_box = scale_box(target_box, pair.target_size, pair.mask_size) if pair.mask else None
            for flip in flips(option(cfg, "flip_x"), option(cfg, "flip_y")):
                plan = ItemPlan(pair_index, int(resolution), bucket, target_box, control_boxes[0],
                                tuple(control_boxes[1:]), flip, mask_box)
                plans.extend([plan] * cfg.num_repeats)
    return plans


def crop_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The random_crop RNG of one item in one epoch (same on every rank, worker and resume)."""
    return random.Random(f"crop:{seed}:{epoch}:{index}")


def randomly_cropped(plan: ItemPlan, pair: Pair, rng: random.Random) -> ItemPlan:
    """`plan` with its crop moved to a random place within the image's slack (random_crop, as ai-toolkit), the same
    relative box for the target, every control image and the mask."""
    target_box = crop_box(*pair.target_size, *plan.bucket, offset=(rng.random(), rng.random()))
    boxes = [scale_box(target_box, pair.target_size, size) for size in pair.control_sizes] or [None]
    mask_box = scale_box(target_box, pair.target_size, pair.mask_size) if plan.mask_box is not None else None
    return replace(plan, target_box=target_box, control_box=boxes[0], extra_control_boxes=tuple(boxes[1:]),
                   mask_box=mask_box)


def replan(plan: ItemPlan, pair: Pair, bucket: tuple[int, int]) -> ItemPlan:
    """The same item cut for another bucket (a merged one; toolkit.data.buckets.merge_small_buckets): the target box,
    every control image's and the mask's, flips kept."""
    target_box = crop_box(*pair.target_size, *bucket)
    boxes = [scale_box(target_box, pair.target_size, size) for size in pair.control_sizes] or [None]
    mask_box = scale_box(target_box, pair.target_size, pair.mask_size) if plan.mask_box is not None else None
    return replace(plan, bucket=bucket, target_box=target_box, control_box=boxes[0],
                   extra_control_boxes=tuple(boxes[1:]), mask_box=mask_box)


def render(path: Path, expected_size: tuple[int, int], box: Box, bucket: tuple[int, int],
           flip: tuple[bool, bool] = (False, False)) -> Image.Image:
    """Decode once, then crop and resize in one LANCZOS pass (PIL's ``resize(box=...)``) to the bucket size, then
    mirror as `flip` says (x, y)."""
    img = load_rgb(path)
    if img.size != tuple(expected_size):
        raise DatasetError(
            f"{path}: is {img.size[0]}x{img.size[1]} px now but was {expected_size[0]}x{expected_size[1]} px when the "
            "dataset was checked; do not change images during training"
        )
    img = img.resize(bucket, Image.LANCZOS, box=box)
    if flip[0]:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if flip[1]:
        img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    return img


class ItemCache(Protocol):
    """Cached tensors of items (toolkit.data.cache.DatasetCache)."""

    covers_images: bool  # True: items get cached tensors in place of "target" / "control" pixels

    def tensors(self, index: int, caption: str) -> dict[str, torch.Tensor]: ...


class PairedDataset(Dataset):
    """Items ``{"target", "control": FloatTensor[3, H, W] in [-1, 1], "loss_multiplier", "network_weight": FloatTensor[],
    "caption": str, "index": int, "path": str}``
    (plus "control_2", ... with several control folders; "mask": FloatTensor[1, H, W] with mask_path); with a cache
    attached, plus the cached tensors, and without the pixels when the cache covers images."""

    def __init__(
        self,
        pairs: Sequence[Pair],
        datasets: Sequence[DatasetConfigLike],
        trigger_word: Optional[str],
        seed: int,
        reg_weight: float = 1.0,
    ) -> None:
        self.pairs = list(pairs)
        self.reg_weight = float(reg_weight)  # extra loss weight of items of is_reg datasets (train.reg_weight)
        self.datasets = list(datasets)
        self.trigger_word = trigger_word
        # train.unload_text_encoder (without cached captions): every item's caption is the process's trigger word
        # (regularisation items: the empty caption), as ai-toolkit trains then; set by the trainer.
        self.static_captions = False
        self.seed = int(seed)
        self.epoch = 0
        self.items = plan_items(self.pairs, self.datasets)
        self.cache: Optional[ItemCache] = None
        if not self.items:
            raise ValueError("the dataset has no items (no pairs, or no resolutions configured)")
        logger.info(
            "Dataset: %d pairs -> %d items in %d buckets", len(self.pairs), len(self.items), len(set(self.bucket_keys))
        )

    @property
    def bucket_keys(self) -> list[tuple[int, int]]:
        """The (width, height) bucket of every item, in item order: what BucketBatchSampler groups by."""
        return [plan.bucket for plan in self.items]

    @property
    def batch_keys(self) -> list[tuple]:
        """What BucketBatchSampler groups by: the bucket, plus what a batch must share: the dataset's network_weight
        when it is not 1 (one LoRA strength per batch), having a loss mask, and the number of control images when it
        is not 1 (paired and plain-image items never share a batch), and a non-zero control_dropout_rate (one
        dropout rate per batch: collate_batch drops a batch's controls by its first item). Equal to bucket_keys
        without them."""
        keys = []
        for index, plan in enumerate(self.items):
            cfg = self.datasets[self.dataset_index(index)]
            weight = float(option(cfg, "network_weight"))
            n_controls = len(self.pairs[plan.pair_index].controls)
            dropout = float(option(cfg, "control_dropout_rate"))
            masked = plan.mask_box is not None or option(cfg, "changed_region_loss")
            extras = ((() if weight == 1.0 else (("network_weight", weight),))
                      + (() if not masked else (("mask",),))
                      + (() if dropout == 0.0 else (("control_dropout", dropout),))
                      + (() if n_controls == 1 else (("controls", n_controls),)))
            control = self.control_bucket(plan)
            keys.append((*plan.bucket, *extras, *(() if control == plan.bucket else (("control", *control),))))
        return keys

    def fit_buckets(self, global_batch: int) -> list[tuple[int, str]]:
        """Merge buckets with fewer items than `global_batch` (toolkit.data.buckets.merge_small_buckets) and re-cut
        their items; before any cache or sampler is built. Returns (log level, message) to tell the user (main process
        only: every rank computes the same)."""
        counts = Counter(self.bucket_keys)
        mapping = merge_small_buckets(dict(counts), global_batch)
        moved = {old: new for old, new in mapping.items() if old != new}
        for i, plan in enumerate(self.items):
            if plan.bucket in moved:
                self.items[i] = replan(plan, self.pairs[plan.pair_index], moved[plan.bucket])
        notes = []
        if moved:
            merged = ", ".join(f"{w}x{h}" for w, h in sorted(set(moved.values())))
            notes.append((logging.INFO, f"bucketing: {len(counts)} buckets -> {len(set(self.bucket_keys))} so that each fills a "
                         f"global batch of {global_batch} (merged into {merged}; images cropped, never upscaled)"))
        short = {bucket: n for bucket, n in Counter(self.bucket_keys).items() if n < global_batch}
        if short:
            listed = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(short.items()))
            notes.append((logging.WARNING, f"{len(short)} bucket(s) have fewer items than the global batch of "
                          f"{global_batch} (train.batch_size x processes), so their items repeat within a batch "
                          f"({listed}): add images of those shapes, lower train.batch_size or use fewer processes"))
        return notes

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose caption randomness __getitem__ uses."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def attach_cache(self, cache: Optional[ItemCache]) -> None:
        """Take cached tensors from `cache` from now on (None: back to pixels and raw captions)."""
        self.cache = cache

    def dataset_index(self, index: int) -> int:
        """Which dataset entry of the config item `index` comes from."""
        return self.pairs[self.items[index].pair_index].dataset_index

    def image_sources(self, index: int) -> dict[str, Any]:
        """Everything that decides an item's pixels: files, bucket, crop boxes, pixel pipeline (latent cache key)."""
        plan = self.items[index]
        pair = self.pairs[plan.pair_index]
        sources = {"target": pair.target, "bucket": plan.bucket, "target_box": plan.target_box,
                   "pixels": PIXEL_PIPELINE_VERSION}
        if pair.control is not None:
            sources.update({"control": pair.control, "control_box": plan.control_box})
        if self.control_bucket(plan) != plan.bucket:  # only then: other items keep their cache keys
            sources["control_bucket"] = self.control_bucket(plan)
        for k, (path, box) in enumerate(zip(pair.extra_controls, plan.extra_control_boxes), start=1):
            sources.update({control_key(k): path, f"{control_key(k)}_box": box})
        if any(plan.flip):  # only then: unflipped items keep the cache keys they had before flips existed
            sources["flip"] = plan.flip
        return sources

    def plan(self, index: int) -> ItemPlan:
        """Item `index` as the current epoch trains it: its plan, with random_crop a crop drawn for this epoch."""
        plan = self.items[index]
        pair = self.pairs[plan.pair_index]
        if option(self.datasets[pair.dataset_index], "random_crop"):
            return randomly_cropped(plan, pair, crop_rng(self.seed, self.epoch, index))
        return plan

    def load_pixels(self, index: int) -> dict[str, torch.Tensor]:
        """``{"target", "control"[, "control_2", ...]: FloatTensor[3, H, W] in [-1, 1]}`` of item `index`, every
        control image at the target's bucket size."""
        plan = self.plan(index)
        pair = self.pairs[plan.pair_index]
        pixels = {"target": to_tensor(render(pair.target, pair.target_size, plan.target_box, plan.bucket, plan.flip))}
        boxes = (plan.control_box, *plan.extra_control_boxes)
        for k, (path, size, box) in enumerate(zip(pair.controls, pair.control_sizes, boxes)):
            pixels[control_key(k)] = to_tensor(render(path, size, box, self.control_bucket(plan), plan.flip))
        return pixels

    def control_bucket(self, plan: ItemPlan) -> tuple[int, int]:
        """The (width, height) the item's control images render at: its bucket, or smaller with the dataset's
        control_resolution (toolkit.data.buckets.control_bucket_for)."""
        cfg = self.datasets[self.pairs[plan.pair_index].dataset_index]
        return control_bucket_for(plan.bucket, option(cfg, "control_resolution"))

    def trigger_for(self, cfg: DatasetConfigLike) -> Optional[str]:
        """The dataset's own trigger_word, else the process's (as ai-toolkit)."""
        return option(cfg, "trigger_word") or self.trigger_word

    def item_captions(self, index: int) -> list[str]:
        """Every caption __getitem__ can give item `index` in any epoch: each line of its caption file and, with
        dropout, "". Shuffled captions have too many orders to list: ValueError."""
        pair = self.pairs[self.items[index].pair_index]
        cfg = self.datasets[pair.dataset_index]
        if self.static_captions:
            return [self.static_caption(cfg)]
        if cfg.shuffle_tokens or option(cfg, "token_dropout_rate") > 0.0:
            raise ValueError(f"{pair.target}: shuffle_tokens or token_dropout_rate is on; its captions cannot be "
                             "listed")
        # prepare_caption without dropout and with certain dropout: the only outcomes without shuffling.
        lines = caption_lines(pair.caption) if option(cfg, "caption_per_line") else [pair.caption]
        kept = [prepare_caption(line, self.trigger_for(cfg), False, 0.0, random.Random(0),
                                add_trigger=not option(cfg, "is_reg")) for line in lines]
        rate = cfg.caption_dropout_rate
        return (list(dict.fromkeys(kept)) if rate < 1.0 else []) + ([""] if rate > 0.0 else [])

    def change_weight_options(self, index: int) -> Optional[tuple[float, float]]:
        """(blur in pixels, floor) of item `index`'s changed-region loss weights; None without changed_region_loss."""
        cfg = self.datasets[self.dataset_index(index)]
        if not option(cfg, "changed_region_loss"):
            return None
        return float(option(cfg, "changed_region_blur")), float(option(cfg, "changed_region_floor"))

    def raw_caption(self, index: int, cfg: DatasetConfigLike) -> str:
        """Item `index`'s caption text this epoch: with caption_per_line, one line of a several-line file."""
        text = self.pairs[self.items[index].pair_index].caption
        return pick_line(text, line_rng(self.seed, self.epoch, index)) if option(cfg, "caption_per_line") else text

    def static_caption(self, cfg: DatasetConfigLike) -> str:
        """The caption of every item with static_captions: the trigger word, "" for regularisation items."""
        return "" if option(cfg, "is_reg") else (self.trigger_word or "")

    def __getitem__(self, index: int) -> dict[str, Any]:
        plan = self.plan(index)
        pair = self.pairs[plan.pair_index]
        cfg = self.datasets[pair.dataset_index]
        caption = self.static_caption(cfg) if self.static_captions else prepare_caption(
            self.raw_caption(index, cfg),
            self.trigger_for(cfg),
            cfg.shuffle_tokens,
            cfg.caption_dropout_rate,
            caption_rng(self.seed, self.epoch, index),
            token_dropout_rate=option(cfg, "token_dropout_rate"),
            keep_tokens=option(cfg, "keep_tokens"),
            add_trigger=not option(cfg, "is_reg"),  # as ai-toolkit: regularisation captions stay as written
        )
        # Per-item loss weight (dataset loss_multiplier, times reg_weight for is_reg), applied by compute_loss.
        weight = float(option(cfg, "loss_multiplier")) * (self.reg_weight if option(cfg, "is_reg") else 1.0)
        item: dict[str, Any] = {"loss_multiplier": torch.tensor(weight),
                                "network_weight": torch.tensor(float(option(cfg, "network_weight")))}
        if self.cache is None or not self.cache.covers_images:
            item.update(self.load_pixels(index))
        if self.cache is not None:
            item.update(self.cache.tensors(index, caption))
        rate = float(option(cfg, "control_dropout_rate"))
        if rate > 0.0:  # drawn whenever the rate is positive, so the draws never depend on other options
            item["control_dropped"] = control_dropout_rng(self.seed, self.epoch, index).random() < rate
        if option(cfg, "changed_region_loss"):  # cached with the latents when they are cached (toolkit.data.cache)
            item["mask"] = item.pop("change_weight", None)
            if item["mask"] is None:
                item["mask"] = changed_region_weights(item["target"], item["control"],
                                                      *self.change_weight_options(index))
        if plan.mask_box is not None:  # never cached: a mask is one small greyscale decode
            item["mask"] = load_mask(pair.mask, pair.mask_size, plan.mask_box, plan.bucket, plan.flip,
                                     option(cfg, "invert_mask"), option(cfg, "mask_min_value"))
        return {**item, "caption": caption, "index": index, "path": str(pair.target)}


# collate_batch and the control keys live in toolkit.data.batch; importing them from here still works.
__all__ = ["ItemPlan", "ItemCache", "PairedDataset", "caption_rng", "collate_batch", "control_dropout_rng",
           "control_key", "control_names", "option", "plan_items", "without_controls"]
