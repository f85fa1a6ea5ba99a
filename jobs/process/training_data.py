"""The training data of a run: the training items and, with `is_reg` datasets, the regularisation items, each with
its own rank-aware bucket sampler and loader (toolkit.data.sampler), prepared for data parallelism the same way.

The regularisation loader is a second, independent stream: its own dataset, sampler seed, epochs and data position
(restored by the Checkpointer from the step alone, see toolkit.train.reg_schedule). Which step draws from which
stream is RegSchedule's choice; StepBatches hands the train loop the right micro-batches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from toolkit.arch import Architecture
from toolkit.data.cache import CachingModel, cache_dataset
from toolkit.data.dataset import PairedDataset, collate_batch, option
from toolkit.data.pairs import Pair
from toolkit.data.sampler import BucketBatchSampler
from toolkit.dist import Runtime
from toolkit.errors import ConfigError
from toolkit.train import preservation
from toolkit.train.reg_schedule import RegSchedule
from toolkit.train.validation import ValidationSet

log = logging.getLogger(__name__)

# The regularisation stream's seed is the training seed plus this: its order and caption randomness are its own.
REG_SEED_OFFSET = 1


@dataclass
class Stream:
    """One dataset with its sampler and (prepared) loader."""

    dataset: PairedDataset
    sampler: BucketBatchSampler
    loader: object


def split_pairs(pairs: Sequence[Pair], datasets: Sequence) -> tuple[list[Pair], list[Pair]]:
    """(training pairs, regularisation pairs): by their dataset's is_reg."""
    reg = [p for p in pairs if option(datasets[p.dataset_index], "is_reg")]
    return [p for p in pairs if not option(datasets[p.dataset_index], "is_reg")], reg


def build_datasets(pairs: Sequence[Pair], cfg, seed: int) -> tuple[PairedDataset, Optional[PairedDataset]]:
    """The training dataset and the regularisation dataset (None without is_reg datasets)."""
    train_pairs, reg_pairs = split_pairs(pairs, cfg.datasets)
    dataset = PairedDataset(train_pairs, cfg.datasets, trigger_word=cfg.trigger_word, seed=seed)
    reg = PairedDataset(reg_pairs, cfg.datasets, trigger_word=cfg.trigger_word, seed=seed + REG_SEED_OFFSET,
                        reg_weight=cfg.train.reg_weight) if reg_pairs else None
    static = cfg.train.unload_text_encoder and not cfg.train.cache_text_embeddings  # ai-toolkit: trigger word only
    for data in (dataset, reg):
        if data is not None:
            data.static_captions = static
    return dataset, reg


def make_stream(dataset: PairedDataset, rt: Runtime, train, seed: int) -> Stream:
    """Sampler of global batches (per-process batch x processes) and its loader, prepared when distributed."""
    sampler = BucketBatchSampler(dataset.batch_keys, batch_size=train.batch_size * rt.world_size, seed=seed)
    # Its own generator: starting an epoch's iterator would otherwise draw from the global RNG (LoRA dropout's),
    # and a resumed run starts one at a point where an uninterrupted run does not.
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_batch,
                        num_workers=rt.data_workers(train.num_workers), pin_memory=rt.device.type == "cuda",
                        generator=torch.Generator().manual_seed(seed))
    if train.distributed_training:
        # Data loaders are prepared only for distributed runs: accelerate splits each global batch by rank.
        loader = rt.prepare(loader)
    return Stream(dataset, sampler, loader)


def reg_schedule(cfg, sampling: bool) -> RegSchedule:
    """The steps that train on regularisation data; sampling rounds count only when samples are made."""
    return RegSchedule(save_every=cfg.save.save_every, sample_every=cfg.sample.sample_every if sampling else 0,
                       sample_start_step=cfg.sample.sample_start_step)


def log_reg(reg: Stream, schedule: RegSchedule, steps: int, reg_weight: float) -> None:
    log.info("regularisation data: %d items, %d batches/epoch; %d of %d steps train on it (odd steps not followed by "
             "a save or a sampling round), loss x reg_weight %g", len(reg.dataset), len(reg.sampler),
             schedule.reg_steps(steps), steps, reg_weight)


def epochs(stream: Stream) -> Iterator[dict]:
    """Micro-batches forever, epoch after epoch (`steps` counts optimizer steps, not epochs)."""
    loader, sampler, dataset = stream.loader, stream.sampler, stream.dataset
    epoch = sampler.epoch  # 0, or the epoch a resume restored (the generator body starts at the first next())
    while True:
        # accelerate's prepared loader re-applies its own pass counter on iteration; set it too.
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        yield from loader
        epoch += 1


def attach_caches(cfg, rt: Runtime, model: Architecture, datasets: Sequence[PairedDataset], requests,
                  validation: Optional[ValidationSet]) -> None:
    """Encode latents / caption embeddings once (toolkit.data.cache); with captions cached, free the text encoders
    after encoding what sampling and validation will still ask for."""
    latents = any(d.cache_latents or d.cache_latents_to_disk for d in cfg.datasets)
    text = cfg.train.cache_text_embeddings
    unload = text or cfg.train.unload_text_encoder
    if not (latents or unload):
        return
    if not isinstance(model, CachingModel):
        raise ConfigError(f"model.arch {cfg.model.arch}: this architecture cannot cache latents or "
                          "text embeddings, nor unload its text encoders; turn the cache options and "
                          "train.unload_text_encoder off")
    latent_encoder, text_encoder = model.latent_encoder() if latents else None, model.text_encoder() if text else None
    for dataset in datasets if latents or text else ():  # the training items, then the regularisation items
        dataset.attach_cache(cache_dataset(dataset, cfg.datasets, rt=rt, batch_size=cfg.train.batch_size,
                                           latents=latent_encoder, text=text_encoder,
                                           text_sees_images=model.text_sees_images))
    if unload:
        keep = [r.prompt for r in requests]
        if any(d.static_captions for d in datasets):  # train.unload_text_encoder: the trigger word, and ""
            keep += [cfg.trigger_word or "", ""]
        if validation is not None:
            keep += [c for i in range(len(validation.dataset)) for c in validation.dataset.item_captions(i)]
        if cfg.train.diff_output_preservation:  # the class captions are encoded at every step
            keep += preservation.class_captions(
                [c for d in datasets for i in range(len(d)) for c in d.item_captions(i)], cfg.trigger_word,
                cfg.train.diff_output_preservation_class)
        model.unload_text_encoders(keep)


__all__ = ["REG_SEED_OFFSET", "Stream", "attach_caches", "build_datasets", "epochs", "log_reg", "make_stream",
           "reg_schedule", "split_pairs"]
