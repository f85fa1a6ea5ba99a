"""Groups of named tensors kept by key, on disk or in memory, and filling them with an encoder (toolkit.data.cache
builds the keys of a dataset's items on top of this).

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
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Optional, Protocol, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes

from toolkit.data.fingerprint import CACHE_VERSION, file_digest, make_key, module_fingerprint
from toolkit.state.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

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
    """Make every job's entry present; every process of the group must call this with the same jobs. `progress`: a
    progress bar of this process's encoding."""
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

__all__ = ["CACHE_VERSION", "Coordinator", "Encoder", "FillReport", "Job", "TensorStore", "Tensors", "file_digest",
           "fill", "make_key", "module_fingerprint"]
