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
from toolkit.data.cache import CachingModel, FillReport, cache_captions, cache_dataset
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


def prepare_datasets(pairs, cfg, rt: Runtime) -> tuple[PairedDataset, Optional[PairedDataset]]:
    """The training and regularisation datasets with their buckets fitted to the global batch (before caches key on
    buckets and samplers group by them)."""
    dataset, reg_dataset = build_datasets(pairs, cfg, cfg.train.seed)
    for data in (dataset, reg_dataset):
        for level, note in data.fit_buckets(cfg.train.batch_size * rt.world_size) if data is not None else ():
            if rt.is_main:
                log.log(level, note)
    return dataset, reg_dataset


def keep_captions(cfg, datasets: Sequence[PairedDataset], requests, validation: Optional[ValidationSet]) -> list[str]:
    """Captions encoded outside the training items: sample prompts, validation captions, the trigger word of
    static captions, the class captions of diff_output_preservation."""
    keep = [r.prompt for r in requests]
    if any(d.static_captions for d in datasets):  # train.unload_text_encoder: the trigger word, and ""
        keep += [cfg.trigger_word or "", ""]
    if validation is not None:
        keep += [c for i in range(len(validation.dataset)) for c in validation.dataset.item_captions(i)]
    if cfg.train.diff_output_preservation:  # the class captions are encoded at every step
        keep += preservation.class_captions(
            [c for d in datasets for i in range(len(d)) for c in d.item_captions(i)], cfg.trigger_word,
            cfg.train.diff_output_preservation_class)
    return keep


def fill_caches(cfg, rt: Runtime, model, datasets: Sequence[PairedDataset], keep: Sequence[str],
                progress: bool = False) -> list[FillReport]:
    """Make every cache entry the config uses present (each rank its share of the disk entries) and attach the
    lookups to the datasets; with cached text, `keep` is cached too and handed to the model (pin_text_embeddings),
    so neither training nor sampling needs a text encoder for it. Returns what each fill reused and encoded."""
    latents = any(d.cache_latents or d.cache_latents_to_disk for d in cfg.datasets)
    text = cfg.train.cache_text_embeddings
    if not (latents or text):
        return []
    if not isinstance(model, CachingModel):
        raise ConfigError(f"model.arch {cfg.model.arch}: this architecture cannot cache latents or "
                          "text embeddings, nor unload its text encoders; turn the cache options and "
                          "train.unload_text_encoder off")
    latent_encoder, text_encoder = model.latent_encoder() if latents else None, model.text_encoder() if text else None
    reports = []
    for dataset in datasets:  # the training items, then the regularisation items
        cache = cache_dataset(dataset, cfg.datasets, rt=rt, batch_size=cfg.train.batch_size, latents=latent_encoder,
                              text=text_encoder, text_sees_images=model.text_sees_images, progress=progress)
        dataset.attach_cache(cache)
        reports.append(cache.report)
    if text and keep and hasattr(model, "pin_text_embeddings"):
        embeddings, report = cache_captions(keep, cfg.datasets, text=text_encoder, rt=rt,
                                            batch_size=cfg.train.batch_size, progress=progress)
        model.pin_text_embeddings(embeddings)
        reports.append(report)
    return reports


def attach_caches(cfg, rt: Runtime, model: Architecture, datasets: Sequence[PairedDataset], requests,
                  validation: Optional[ValidationSet]) -> None:
    """Encode latents / caption embeddings once (toolkit.data.cache); with captions cached, free the text encoders
    after encoding what sampling and validation will still ask for (nothing when that was cached too)."""
    unload = cfg.train.cache_text_embeddings or cfg.train.unload_text_encoder
    if unload and not isinstance(model, CachingModel):
        raise ConfigError(f"model.arch {cfg.model.arch}: this architecture cannot cache latents or "
                          "text embeddings, nor unload its text encoders; turn the cache options and "
                          "train.unload_text_encoder off")
    keep = keep_captions(cfg, datasets, requests, validation) if unload else []
    fill_caches(cfg, rt, model, datasets, keep)
    if unload:
        model.unload_text_encoders(keep)


__all__ = ["REG_SEED_OFFSET", "Stream", "attach_caches", "build_datasets", "epochs", "fill_caches", "keep_captions",
           "log_reg", "make_stream", "prepare_datasets", "reg_schedule", "split_pairs"]
