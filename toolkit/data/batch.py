"""Batches of dataset items: the control-image keys of an item or batch, and the collate function (control dropout
is applied here, per batch)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch


def control_key(k: int) -> str:
    """Item / batch key of the k-th control image (0-based): "control", "control_2", "control_3", ...; the
    control under "control_<n>" gets position-id frame n."""
    return "control" if k == 0 else f"control_{k + 1}"


def control_names(batch: Mapping[str, Any], suffix: str = "") -> list[str]:
    """The control keys present in an item or batch, in sequence order: "control", "control_2", ... (a key counts
    with `suffix` appended, e.g. "_latents" for cached latents)."""
    names: list[str] = []
    while f"{control_key(len(names))}{suffix}" in batch:
        names.append(control_key(len(names)))
    return names


def without_controls(item: dict[str, Any]) -> dict[str, Any]:
    """`item` without its control images (pixels and cached latents): it trains as plain generation."""
    names = {*control_names(item), *(f"{n}_latents" for n in control_names(item, "_latents"))}
    return {key: value for key, value in item.items() if key not in names}


# Cached token sequences whose length varies per item (a prompt embedding with the item's images inside it), in items
# that carry a prompt_mask: padded with zeros to the batch's longest; the mask's zeros mark the padding. Equal lengths
# (and items without a mask) stay as they are.
PADDED_SEQUENCES = ("prompt_embeds", "prompt_mask")


def _padded_sequences(items: Sequence[dict[str, Any]]) -> Sequence[dict[str, Any]]:
    names = [n for n in PADDED_SEQUENCES if "prompt_mask" in items[0] and isinstance(items[0].get(n), torch.Tensor)]
    lengths = {n: max(item[n].shape[0] for item in items) for n in names}
    if all(item[n].shape[0] == lengths[n] for n in names for item in items):
        return items
    return [{**item, **{n: torch.nn.functional.pad(item[n], (0, 0) * (item[n].dim() - 1)
                                                       + (0, lengths[n] - item[n].shape[0])) for n in names}}
            for item in items]


def collate_batch(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack items of ONE bucket: {"target", "control": [B, 3, H, W], "loss_multiplier", "network_weight": [B],
    "caption": list[str], "index": LongTensor[B], "path": list[str]}; cached tensors are stacked the same way. Items
    of different buckets mean the batch sampler is not a bucket sampler.

    Control dropout (items with "control_dropped"): the whole batch trains without control images when its FIRST
    item drew a drop (the batch gets "control_dropped": True). Per batch, because the architectures put a sample's
    control tokens in its sequence, so every sample of one forward must have as many; the first item's draw keeps
    the rate per batch, and batch_keys keeps datasets with other rates out of the batch. With several processes each
    collates its own share of the global batch, so each share decides by its own first item (per item with one item
    per process)."""
    if not items:
        raise ValueError("collate_batch got an empty batch")
    dropped = bool(items[0].get("control_dropped", False))
    if dropped:
        items = [without_controls(item) for item in items]
    tensors = [name for name, value in items[0].items() if isinstance(value, torch.Tensor)]
    items = _padded_sequences(items)
    for item in items:
        for name in tensors:
            if item[name].shape != items[0][name].shape:
                raise ValueError(
                    f"batch mixes image sizes: {name} {tuple(items[0][name].shape)} and {tuple(item[name].shape)} "
                    f"(item {item['index']}, {item['path']}); use BucketBatchSampler so a batch holds one bucket"
                )
    batch = {name: torch.stack([item[name] for item in items]) for name in tensors}
    return {
        **batch,
        **({"control_dropped": dropped} if "control_dropped" in items[0] else {}),
        "caption": [item["caption"] for item in items],
        "index": torch.tensor([int(item["index"]) for item in items], dtype=torch.long),
        "path": [item["path"] for item in items],
    }
