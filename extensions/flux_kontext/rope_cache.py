"""Per-bucket constants of the FLUX Kontext step, computed once: position ids and the transformer's RoPE tables.

diffusers' FluxTransformer2DModel recomputes ``self.pos_embed(cat(txt_ids, img_ids))`` (float64 cos/sin per axis)
on every forward, and our step would rebuild the ids too, although both depend only on the text length and the
target / control latent grids. Here:

- ``IdTables`` hands out the SAME ids tensors for the same (text length, grids, device, dtype), bounded LRU;
- ``CachedPosEmbed`` replaces ``transformer.pos_embed``; inside ``with pos_embed.ids(txt_ids, img_ids):`` (what the
  denoiser does) it returns the tables computed the first time this pair of id tensors was seen. The key is the
  identity of the two id tensors (no content read, so no host-device sync); the cache holds references to them
  so an identity cannot be reused by another tensor while its entry lives. Outside that context (e.g. the
  inference pipeline calling the transformer) it computes as diffusers does. Outputs are bit-identical: the
  same function on the same ids; the tables carry no gradient.

The cached ids must never be modified in place (nothing in diffusers' forward does).
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch

from extensions.flux_kontext.packing import kontext_position_ids

ENTRIES = 32  # distinct (text length, bucket) pairs kept; a run has one per bucket and resolution


class IdTables:
    """Position ids of the joint [target ; control] image sequence and the all-zero text ids, one tensor per key."""

    def __init__(self, entries: int = ENTRIES) -> None:
        self.entries = entries
        self._img: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._txt: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def _get(self, table: OrderedDict, key: tuple, make) -> torch.Tensor:
        value = table.get(key)
        if value is None:
            value = table[key] = make()
            while len(table) > self.entries:
                table.popitem(last=False)
        else:
            table.move_to_end(key)
        return value

    def image_ids(self, target_hw: tuple[int, int], control_hws: Sequence[tuple[int, int]], device: torch.device
                  ) -> torch.Tensor:
        """Ids of [target ; control 1 ; control 2 ...] (frames 0, 1, 2, ...), one tensor per distinct layout."""
        control_hws = tuple(tuple(hw) for hw in control_hws)
        key = (tuple(target_hw), control_hws, torch.device(device))
        return self._get(self._img, key, lambda: kontext_position_ids(target_hw, *control_hws, device=device))

    def text_ids(self, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (int(length), torch.device(device), dtype)
        return self._get(self._txt, key, lambda: torch.zeros(length, 3, device=device, dtype=dtype))


class CachedPosEmbed(torch.nn.Module):
    """``transformer.pos_embed`` with its (cos, sin) tables memoized per pair of id tensors (see the module doc)."""

    def __init__(self, inner: torch.nn.Module, entries: int = ENTRIES) -> None:
        super().__init__()
        self.inner = inner
        self.entries = entries
        self._tables: OrderedDict[tuple[int, int], tuple] = OrderedDict()
        self._active: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.computed = 0  # tables computed (not taken from the cache), for tests

    @contextmanager
    def ids(self, txt_ids: torch.Tensor, img_ids: torch.Tensor) -> Iterator[None]:
        """Forwards inside this context see ids == cat(txt_ids, img_ids) and may reuse their tables."""
        previous, self._active = self._active, (txt_ids, img_ids)
        try:
            yield
        finally:
            self._active = previous

    def forward(self, ids: torch.Tensor):
        active = self._active
        if active is None or ids.shape[0] != active[0].shape[0] + active[1].shape[0]:
            return self.inner(ids)
        key = (id(active[0]), id(active[1]))
        entry = self._tables.get(key)
        if entry is None or entry[0] is not active[0] or entry[1] is not active[1]:
            self.computed += 1
            entry = self._tables[key] = (active[0], active[1], self.inner(ids))
            while len(self._tables) > self.entries:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(key)
        return entry[2]


def install(transformer: torch.nn.Module) -> CachedPosEmbed:
    """Put a CachedPosEmbed in place of transformer.pos_embed (idempotent); it has no parameters nor buffers, so
    state dicts and LoRA keys do not change."""
    if not isinstance(transformer.pos_embed, CachedPosEmbed):
        transformer.pos_embed = CachedPosEmbed(transformer.pos_embed)
    return transformer.pos_embed
