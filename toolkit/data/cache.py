"""Encoder outputs cached by key, on disk or in memory, and filling such a cache for a paired dataset.

Keys (`make_key`) hash everything that changes an output. Latents: the content hashes of the target and control
files (every control file when a target has several), the bucket and the crop boxes, the version of the pixel
pipeline, and the encoder's identity (its config, dtype and a checksum of its weights, `module_fingerprint`). Text
embeddings: the caption and the text encoders' identity. So a changed image, resolution or model gives a new key and
is encoded again, and an unchanged entry is reused by every later run. Entries are never deleted (another config may
still use them): delete the folder to reclaim the space.

On disk each key is one safetensors file `<folder>/<key>.safetensors`, written atomically (temporary file + rename)
with the key and a SHA-256 of its tensor bytes in the header. A file that is truncated, corrupt, or holds another
key is deleted and encoded again.

Several processes: each rank checks and encodes its own share of the disk entries (`my_share`), then all `wait`, so
each file is written once and nobody reads a half-built cache. In-memory entries belong to one process: each rank
encodes all of them. A rank that still misses disk entries after the wait (a cache folder that is not shared between
machines) encodes them itself, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Optional, Protocol, Sequence, runtime_checkable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes

from toolkit.data.change_weights import changed_region_weights
from toolkit.data.fingerprint import (CACHE_VERSION, file_digest, folder_fingerprint, make_key,
                                      module_fingerprint)
from toolkit.state.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

DEFAULT_FOLDER_NAME = "_latent_cache"
Tensors = dict[str, torch.Tensor]


def _checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode("utf-8"))
        h.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _header_metadata(data: bytes) -> dict[str, str]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]).get("__metadata__") or {}


# -- the store -----------------------------------------------------------------------------------------------------
class TensorStore:
    """Groups of named tensors by key: files under `folder` (shared by the processes of a run, kept between runs)
    and/or a dict in this process's memory."""

    def __init__(self, folder: Optional[Path] = None, keep_in_memory: bool = False) -> None:
        if folder is None and not keep_in_memory:
            raise ValueError("a TensorStore needs a folder, memory, or both")
        self.folder = Path(folder) if folder is not None else None
        self.keep_in_memory = keep_in_memory
        self._memory: dict[str, Tensors] = {}

    @property
    def shared(self) -> bool:
        """Entries are visible to the other processes (and later runs)."""
        return self.folder is not None

    def __repr__(self) -> str:
        return f"TensorStore({self.folder or 'memory'}{', +memory' if self.folder and self.keep_in_memory else ''})"

    def path(self, key: str) -> Path:
        if self.folder is None:
            raise ValueError("an in-memory store has no files")
        return self.folder / f"{key}.safetensors"

    def exists(self, key: str) -> bool:
        return key in self._memory or (self.folder is not None and self.path(key).is_file())

    def get(self, key: str) -> Optional[Tensors]:
        """The entry, or None when absent; a damaged file is deleted (and reported) and counts as absent."""
        if key in self._memory:
            return self._memory[key]
        if self.folder is None:
            return None
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        tensors = self._decode(data, key, path)
        if tensors is not None and self.keep_in_memory:
            self._memory[key] = tensors
        return tensors

    def put(self, key: str, tensors: Mapping[str, torch.Tensor]) -> None:
        tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
        if self.folder is not None:
            header = {"key": key, "sha256": _checksum(tensors)}
            atomic_write_bytes(self.path(key), safetensors_bytes(tensors, metadata=header))
        if self.keep_in_memory:
            self._memory[key] = tensors

    @staticmethod
    def _decode(data: bytes, key: str, path: Path) -> Optional[Tensors]:
        try:
            tensors = safetensors_load(data)
            meta = _header_metadata(data)
        except (SafetensorError, ValueError, struct.error) as err:  # JSONDecodeError is a ValueError
            problem = f"unreadable ({err})"
        else:
            if meta.get("key") != key:
                problem = f"holds entry {meta.get('key')!r}"
            elif meta.get("sha256") != _checksum(tensors):
                problem = "checksum mismatch"
            else:
                return tensors
        log.warning("cache file %s is damaged (%s): encoding it again", path, problem)
        path.unlink(missing_ok=True)
        return None


# -- filling -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Encoder:
    """An encoder as the cache sees it: `encode(inputs) -> one tensor group per input`; outputs change only when
    `identity` does."""

    identity: str
    encode: Callable[[list[Any]], list[Mapping[str, torch.Tensor]]]


@dataclass(frozen=True)
class Job:
    """One cache entry to make sure of: where, under which key, and how to get the encoder's input."""

    store: TensorStore
    key: str
    encoder: Encoder
    group: Hashable  # entries of one group can be encoded in one call (same input shapes)
    load: Callable[[], Any]


@runtime_checkable
class CachingModel(Protocol):
    """What an architecture offers for caching (extensions/<arch>/ implements it; toolkit never names one)."""

    def latent_encoder(self) -> Encoder: ...  # dataset.load_pixels(i) -> tensors that replace the pixels

    def text_encoder(self) -> Encoder: ...  # caption -> tensors that replace the caption

    def unload_text_encoders(self, keep: Sequence[str]) -> None: ...  # `keep` stays encodable without them


class Coordinator(Protocol):
    """What the cache needs from the process group (toolkit.dist.Runtime)."""

    def my_share(self, count: int) -> list[int]: ...

    def wait(self) -> None: ...

    def gather(self, items: list) -> list: ...


@dataclass
class FillReport:
    entries: int = 0  # distinct entries this process needs
    reused: int = 0  # of those this process checked, found complete
    encoded: int = 0  # encoded by this process before the wait
    encoded_after_wait: int = 0  # missing after the wait (cache folder not shared), encoded here


def fill(jobs: Sequence[Job], rt: Coordinator, batch_size: int, progress: bool = False) -> FillReport:
    """Make every job's entry present; every process of the group must call this with the same jobs."""
    unique: dict[tuple[str, str], Job] = {}
    for job in jobs:  # one entry per file (stores on one folder are one store) or per memory store
        where = str(job.store.folder) if job.store.shared else f"memory:{id(job.store)}"
        unique.setdefault((where, job.key), job)
    ordered = [unique[k] for k in sorted(unique)]  # the same order on every rank
    shared = [job for job in ordered if job.store.shared]
    mine = [shared[i] for i in rt.my_share(len(shared))] + [job for job in ordered if not job.store.shared]
    todo = [job for job in mine if job.store.get(job.key) is None]  # reads and checks every entry it owns
    report = FillReport(entries=len(ordered), reused=len(mine) - len(todo), encoded=len(todo))
    _encode(todo, batch_size, progress)
    rt.wait()
    late = [job for job in shared if not job.store.exists(job.key)]
    if late:
        log.warning("%d cache entries written by other processes are not visible here (is the cache folder on a "
                    "filesystem all machines share?): encoding them in this process too", len(late))
        _encode(late, batch_size)
    report.encoded_after_wait = len(late)
    return report


def _encode(jobs: Sequence[Job], batch_size: int, progress: bool = False) -> None:
    from tqdm.auto import tqdm

    groups: dict[tuple[str, Hashable], list[Job]] = {}
    for job in jobs:
        groups.setdefault((job.encoder.identity, job.group), []).append(job)
    done = 0
    bar = tqdm(total=len(jobs), desc="caching", unit="entry", disable=not progress or not jobs)
    for members in groups.values():
        for start in range(0, len(members), batch_size):
            batch = members[start:start + batch_size]
            outputs = batch[0].encoder.encode([job.load() for job in batch])
            if len(outputs) != len(batch):
                raise RuntimeError(f"encoder returned {len(outputs)} results for {len(batch)} inputs")
            for job, tensors in zip(batch, outputs):
                job.store.put(job.key, tensors)
            done += len(batch)
            bar.update(len(batch))
        log.info("cache: encoded %d / %d entries", done, len(jobs))
    bar.close()


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
    """What a dataset item takes from the caches: latents by item, text embeddings by (dataset entry, caption)."""

    def __init__(self, latents: dict[int, tuple[TensorStore, str]],
                 text: dict[tuple[int, str], tuple[TensorStore, str]], item_datasets: Sequence[int],
                 report: Optional[FillReport] = None) -> None:
        self.report = report or FillReport()  # what filling it reused and encoded
        self._latents = latents
        self._text = text
        self._item_datasets = list(item_datasets)

    @property
    def covers_images(self) -> bool:
        """Items need no pixels: their latents are cached."""
        return bool(self._latents)

    def latent_entry(self, index: int) -> tuple[TensorStore, str]:
        """Where item `index`'s latents are kept, and under which key."""
        return self._latents[index]

    def tensors(self, index: int, caption: str) -> Tensors:
        out: Tensors = {}
        if self._latents:
            out.update(self._load(*self._latents[index]))
        if self._text:
            entry = self._text.get((self._item_datasets[index], caption))
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


def cache_dataset(dataset: Any, configs: Sequence[Any], *, latents: Optional[Encoder], text: Optional[Encoder],
                  rt: Coordinator, batch_size: int, progress: bool = False) -> DatasetCache:
    """Encode what `dataset` (toolkit.data.dataset.PairedDataset) needs and is not cached yet; return the lookup.

    `latents` covers the items of dataset entries with cache_latents(_to_disk), `text` every caption an item can
    get (dataset.item_captions). Every process of the group must call this."""
    latent_stores, text_stores = _stores(configs, text is not None)
    item_datasets = [dataset.dataset_index(i) for i in range(len(dataset))]
    jobs: list[Job] = []
    latent_keys: dict[int, tuple[TensorStore, str]] = {}
    if latents is not None:
        indices = [i for i in range(len(dataset)) if latent_stores[item_datasets[i]] is not None]
        sources = {i: dataset.image_sources(i) for i in indices}
        # Every image file of an item (target, control, and control_2... with several control folders).
        digests = _digests([v for s in sources.values() for v in s.values() if isinstance(v, Path)], rt)
        for i in indices:
            files = {name: digests[str(v)] for name, v in sources[i].items() if isinstance(v, Path)}
            # Items with changed_region_loss also cache their loss weights, made from the same pixels.
            options = dataset.change_weight_options(i) if hasattr(dataset, "change_weight_options") else None
            encoder = latents if options is None else with_change_weights(latents, *options)
            parts = {**sources[i], **files, "encoder": encoder.identity}
            store, key = latent_stores[item_datasets[i]], make_key("latents", parts)
            latent_keys[i] = (store, key)
            # One encode batch holds one bucket and one set of images (items without controls encode apart).
            group = (sources[i]["bucket"], sources[i].get("control_bucket"),
                     tuple(name for name, v in sources[i].items() if isinstance(v, Path)))
            jobs.append(Job(store, key, encoder, group=group,
                            load=lambda i=i: dataset.load_pixels(i)))
    text_keys: dict[tuple[int, str], tuple[TensorStore, str]] = {}
    if text is not None:
        for i in range(len(dataset)):
            for caption in dataset.item_captions(i):
                store = text_stores[item_datasets[i]]
                key = make_key("text", {"caption": caption, "encoder": text.identity})
                if (item_datasets[i], caption) not in text_keys:
                    text_keys[(item_datasets[i], caption)] = (store, key)
                    jobs.append(Job(store, key, text, group="text", load=lambda c=caption: c))
    report = fill(jobs, rt, batch_size, progress)
    log.info("cache: %d entries, %d reused, %d encoded here (%d after the wait)", report.entries, report.reused,
             report.encoded, report.encoded_after_wait)
    return DatasetCache(latent_keys, text_keys, item_datasets, report)


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
           "cache_captions", "cache_dataset", "cache_folder", "cache_folder_problems", "file_digest", "fill", "folder_fingerprint",
           "make_key", "module_fingerprint"]
