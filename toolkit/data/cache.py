"""Encoder outputs of a paired dataset's items cached by key (the store itself: toolkit.data.tensor_store).

Keys (`make_key`) hash everything that changes an output. Latents: the content hashes of the target and control
files (every control file when a target has several), the bucket and the crop boxes, the version of the pixel
pipeline, and the encoder's identity (its config, dtype and a checksum of its weights, `module_fingerprint`). Text
embeddings: the caption and the text encoders' identity; for a model whose text encoder also sees the control images
(`text_sees_images`, e.g. a vision-language prompt encoder), each item's control images too (their content hashes, bucket, crop boxes and the
pixel pipeline), so a changed control image gets a new text entry. So a changed image, resolution or model gives a
new key and is encoded again, and an unchanged entry is reused by every later run. Entries are never deleted
(another config may still use them): delete the folder to reclaim the space.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol, Sequence, runtime_checkable

import torch

from toolkit.data.change_weights import changed_region_weights
from toolkit.data.fingerprint import folder_fingerprint
from toolkit.data.tensor_store import (CACHE_VERSION, Coordinator, Encoder, FillReport, Job, TensorStore, Tensors,
                                       file_digest, fill, make_key, module_fingerprint)

log = logging.getLogger(__name__)

DEFAULT_FOLDER_NAME = "_latent_cache"


@runtime_checkable
class CachingModel(Protocol):
    """What an architecture offers for caching (extensions/<arch>/ implements it; toolkit never names one)."""

    def latent_encoder(self) -> Encoder: ...  # dataset.load_pixels(i) -> tensors that replace the pixels

    def text_encoder(self) -> Encoder: ...  # caption (with text_sees_images: (caption, control pixels)) -> tensors

    def unload_text_encoders(self, keep: Sequence[str]) -> None: ...  # `keep` stays encodable without them


def with_change_weights(latents: Encoder, blur_px: float, floor: float) -> Encoder:
    """`latents`, plus each item's changed-region loss weights ("change_weight", toolkit.data.change_weights) made
    from the same pixels, so a cached item needs no pixels for them either."""
    def encode(items: list[Any]) -> list[Mapping[str, torch.Tensor]]:
        return [{**out, "change_weight": changed_region_weights(item["target"], item["control"], blur_px, floor)}
                for out, item in zip(latents.encode(items), items)]
    identity = make_key("change-weights", {"latents": latents.identity, "blur_px": blur_px, "floor": floor})
    return Encoder(identity, encode)


# -- a paired dataset's cache --------------------------------------------------------------------------------------
def cache_folder(cfg: Any) -> Path:
    """Where a dataset entry's disk cache lives: `cache_dir`, or `_latent_cache/` next to its target images."""
    return Path(cfg.cache_dir) if getattr(cfg, "cache_dir", None) else Path(cfg.folder_path) / DEFAULT_FOLDER_NAME


def cache_folder_problems(configs: Sequence[Any], key_prefix: str = "config.process[0].datasets") -> list[str]:
    """Disk caches that could not be written, found without writing anything."""
    problems = []
    for index, cfg in enumerate(configs):
        if not cfg.cache_latents_to_disk:
            continue
        folder = cache_folder(cfg).absolute()
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            problems.append(f"{key_prefix}[{index}]: cannot write the latent cache {folder} ({existing} is not a "
                            f"writable folder); set {key_prefix}[{index}].cache_dir to a writable folder")
    return problems


class DatasetCache:
    """What a dataset item takes from the caches: latents by item, text embeddings by (dataset entry, caption), or by
    (item, caption) when the text encoder sees the item's control images (`per_item_text`). `keep_pixels`: items keep
    their pixels although their latents are cached (a prompt encoder that sees the control images still needs them
    when the captions are not cached)."""

    def __init__(self, latents: dict[int, tuple[TensorStore, str]],
                 text: dict[tuple[int, str], tuple[TensorStore, str]], item_datasets: Sequence[int],
                 per_item_text: bool = False, keep_pixels: bool = False,
                 report: Optional[FillReport] = None) -> None:
        self.report = report or FillReport()  # what filling it reused and encoded
        self._latents = latents
        self._text = text
        self._item_datasets = list(item_datasets)
        self._per_item_text = per_item_text
        self._keep_pixels = keep_pixels

    @property
    def covers_images(self) -> bool:
        """Items need no pixels: their latents are cached."""
        return bool(self._latents) and not self._keep_pixels

    def latent_entry(self, index: int) -> tuple[TensorStore, str]:
        """Where item `index`'s latents are kept, and under which key."""
        return self._latents[index]

    def text_entry(self, index: int, caption: str) -> Optional[tuple[TensorStore, str]]:
        """Where item `index`'s embedding of `caption` is kept, and under which key (None: not cached)."""
        return self._text.get((index if self._per_item_text else self._item_datasets[index], caption))

    def tensors(self, index: int, caption: str) -> Tensors:
        out: Tensors = {}
        if self._latents:
            out.update(self._load(*self._latents[index]))
        if self._text:
            entry = self.text_entry(index, caption)
            if entry is None:
                raise KeyError(f"caption {caption!r} of item {index} has no cached embedding")
            out.update(self._load(*entry))
        return out

    @staticmethod
    def _load(store: TensorStore, key: str) -> Tensors:
        tensors = store.get(key)
        if tensors is None:
            raise RuntimeError(f"cache entry {key} of {store} vanished or was damaged during training; "
                               "start the run again to rebuild it")
        return tensors


def _stores(configs: Sequence[Any], text: bool) -> tuple[list[Optional[TensorStore]], list[Optional[TensorStore]]]:
    """Per dataset entry: its latent store and its text store. Text embeddings live where the entry keeps its
    latents; in memory when it caches none."""
    by_folder: dict[Path, TensorStore] = {}
    memory = TensorStore(keep_in_memory=True)
    latent_stores, text_stores = [], []
    for cfg in configs:
        store = None
        if cfg.cache_latents_to_disk:
            folder = cache_folder(cfg).resolve()
            store = by_folder.setdefault(folder, TensorStore(folder, keep_in_memory=cfg.cache_latents))
            store.keep_in_memory |= cfg.cache_latents
        elif cfg.cache_latents:
            store = memory
        latent_stores.append(store)
        text_stores.append((store or memory) if text else None)
    return latent_stores, text_stores


def _digests(paths: Sequence[Path], rt: Coordinator) -> dict[str, str]:
    """Content hashes of `paths`, each file read by one rank only."""
    ordered = sorted({str(p) for p in paths})
    mine = [(ordered[i], file_digest(Path(ordered[i]))) for i in rt.my_share(len(ordered))]
    return dict(rt.gather(mine))


def _latent_jobs(dataset: Any, stores: Sequence[Optional[TensorStore]], item_datasets: Sequence[int],
                 encoder: Encoder, digests: dict[str, str]) -> tuple[dict[int, tuple[TensorStore, str]], list[Job]]:
    keys: dict[int, tuple[TensorStore, str]] = {}
    jobs = []
    for i in (i for i in range(len(dataset)) if stores[item_datasets[i]] is not None):
        sources = dataset.image_sources(i)
        files = {name: digests[str(v)] for name, v in sources.items() if isinstance(v, Path)}
        # Items with changed_region_loss also cache their loss weights, made from the same pixels.
        options = dataset.change_weight_options(i) if hasattr(dataset, "change_weight_options") else None
        item_encoder = encoder if options is None else with_change_weights(encoder, *options)
        store = stores[item_datasets[i]]
        key = make_key("latents", {**sources, **files, "encoder": item_encoder.identity})
        keys[i] = (store, key)
        # One encode batch holds one bucket and one set of images (items without controls encode apart).
        group = (sources["bucket"], sources.get("control_bucket"),
                 tuple(name for name, v in sources.items() if isinstance(v, Path)))
        jobs.append(Job(store, key, item_encoder, group=group, load=lambda i=i: dataset.load_pixels(i)))
    return keys, jobs


def _control_sources(dataset: Any, index: int, digests: dict[str, str]) -> dict[str, Any]:
    """What decides item `index`'s control pixels: its image sources without the target, with content hashes."""
    sources = {k: v for k, v in dataset.image_sources(index).items() if k not in ("target", "target_box")}
    return {k: digests[str(v)] if isinstance(v, Path) else v for k, v in sources.items()}


def _control_pixels(dataset: Any, index: int) -> Tensors:
    return {k: v for k, v in dataset.load_pixels(index).items() if k != "target"}


def _text_jobs(dataset: Any, stores: Sequence[Optional[TensorStore]], item_datasets: Sequence[int], encoder: Encoder,
               digests: Optional[dict[str, str]]) -> tuple[dict[tuple[int, str], tuple[TensorStore, str]], list[Job]]:
    """Caption entries per (dataset entry, caption); with `digests` (the text encoder sees the control images) per
    (item, caption), keyed by the control images too and encoded from (caption, control pixels)."""
    keys: dict[tuple[int, str], tuple[TensorStore, str]] = {}
    jobs = []
    for i in range(len(dataset)):
        controls = None if digests is None else _control_sources(dataset, i, digests)
        for caption in dataset.item_captions(i):
            where = (item_datasets[i] if controls is None else i, caption)
            if where in keys:
                continue
            store = stores[item_datasets[i]]
            key = make_key("text", {"caption": caption, "encoder": encoder.identity,
                                    **({} if controls is None else {"controls": controls})})
            keys[where] = (store, key)
            if controls is None:
                jobs.append(Job(store, key, encoder, group="text", load=lambda c=caption: c))
            else:
                jobs.append(Job(store, key, encoder, group=("text", controls["bucket"], controls.get("control_bucket")),
                                load=lambda c=caption, i=i: (c, _control_pixels(dataset, i))))
    return keys, jobs


def cache_dataset(dataset: Any, configs: Sequence[Any], *, latents: Optional[Encoder], text: Optional[Encoder],
                  rt: Coordinator, batch_size: int, text_sees_images: bool = False,
                  progress: bool = False) -> DatasetCache:
    """Encode what `dataset` (toolkit.data.dataset.PairedDataset) needs and is not cached yet; return the lookup.

    `latents` covers the items of dataset entries with cache_latents(_to_disk), `text` every caption an item can
    get (dataset.item_captions). `text_sees_images`: the text encoder also sees each item's control images (a
    vision-language prompt encoder): text entries are per item, keyed and encoded with its control images, and items
    keep their pixels when only latents are cached. Every process of the group must call this."""
    latent_stores, text_stores = _stores(configs, text is not None)
    item_datasets = [dataset.dataset_index(i) for i in range(len(dataset))]
    digests: dict[str, str] = {}
    if latents is not None or (text is not None and text_sees_images):
        # Every image file of an item (target, control, and control_2... with several control folders).
        digests = _digests([v for i in range(len(dataset)) for v in dataset.image_sources(i).values()
                            if isinstance(v, Path)], rt)
    latent_keys, jobs = _latent_jobs(dataset, latent_stores, item_datasets, latents, digests) if latents else ({}, [])
    text_keys: dict[tuple[int, str], tuple[TensorStore, str]] = {}
    if text is not None:
        text_keys, text_jobs = _text_jobs(dataset, text_stores, item_datasets, text,
                                          digests if text_sees_images else None)
        jobs += text_jobs
    report = fill(jobs, rt, batch_size, progress)
    log.info("cache: %d entries, %d reused, %d encoded here (%d after the wait)", report.entries, report.reused,
             report.encoded, report.encoded_after_wait)
    return DatasetCache(latent_keys, text_keys, item_datasets, per_item_text=text_sees_images,
                        keep_pixels=text_sees_images and text is None, report=report)


def cache_captions(captions: Sequence[str], configs: Sequence[Any], *, text: Encoder, rt: Coordinator,
                   batch_size: int, progress: bool = False) -> tuple[dict[str, Tensors], FillReport]:
    """Embeddings of extra captions (sample prompts, validation captions) through the same cache, kept in the first
    dataset entry's disk cache (in memory when no entry caches to disk): a later run needs no text encoder for
    them either. Every process of the group must call this."""
    _, text_stores = _stores(configs, True)
    store = next((s for s in text_stores if s is not None and s.shared), text_stores[0] if text_stores else None)
    store = store or TensorStore(keep_in_memory=True)
    keys = {c: make_key("text", {"caption": c, "encoder": text.identity}) for c in sorted(set(captions))}
    jobs = [Job(store, key, text, group="text", load=lambda c=c: c) for c, key in keys.items()]
    report = fill(jobs, rt, batch_size, progress)
    out = {}
    for caption, key in keys.items():
        tensors = store.get(key)
        if tensors is None:
            raise RuntimeError(f"cache entry {key} of {store} for caption {caption!r} vanished after caching")
        out[caption] = tensors
    return out, report


__all__ = ["CACHE_VERSION", "CachingModel", "Coordinator", "DatasetCache", "Encoder", "FillReport", "Job", "TensorStore",
           "cache_captions", "cache_dataset", "cache_folder", "cache_folder_problems", "file_digest", "fill", "folder_fingerprint", "make_key",
           "module_fingerprint", "with_change_weights"]
