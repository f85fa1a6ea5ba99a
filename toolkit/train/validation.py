"""Validation loss on held-out pairs: the training objective at fixed timesteps with fixed noise.

Every call measures exactly the same problem, so the value moves only when the weights do (same weights, same
number) and checkpoints compare fairly:

    loss = mean over held-out items i and timesteps t_k of mean((denoiser(x_t) - (noise_i - x0_i))^2)
    t_k  = (k + 0.5) / K                      (K = len(timesteps), spread evenly over (0, 1))
    noise_i ~ N(0, I) from a CPU generator seeded by (seed, i): independent of batching and device
    x_t  = (1 - t_k) x0_i + t_k noise_i

Captions get no dropout or shuffling. Encoded batches and noise are cached after the first call (frozen encoders),
so each later call costs only the denoiser forwards.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional, Sequence

import torch

from toolkit.train import flow_matching
from toolkit.arch import Architecture, eval_mode
from toolkit.data.dataset import PairedDataset, collate_batch
from toolkit.data.pairs import discover_pairs

log = logging.getLogger(__name__)

DEFAULT_TIMESTEPS = (0.125, 0.375, 0.625, 0.875)


def held_out_datasets(datasets: Sequence) -> list:
    """Dataset entries that read each entry's val_folder_path / val_control_path as their folders."""
    return [dataclasses.replace(d, folder_path=d.val_folder_path, control_path=d.val_control_path,
                                caption_dropout_rate=0.0, shuffle_tokens=False, num_repeats=1,
                                token_dropout_rate=0.0, flip_x=False, flip_y=False, mask_path=None,
                                val_folder_path=None, val_control_path=None, control_dropout_rate=0.0,
                                changed_region_loss=False)
            for d in datasets if d.val_folder_path]


class ValidationSet:
    def __init__(self, dataset: PairedDataset, seed: int, guidance: float = 1.0, batch_size: int = 4,
                 timesteps: Sequence[float] = DEFAULT_TIMESTEPS) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self.guidance = guidance
        self.batch_size = batch_size
        self.timesteps = tuple(timesteps)
        self._cache: Optional[tuple[int, list]] = None  # (id of the model, [(encoded batch, noise)])

    @classmethod
    def from_datasets(cls, datasets: Sequence, trigger_word: Optional[str], seed: int, guidance: float = 1.0,
                      config_path_prefix: str = "config.process[0].datasets (val_folder_path / val_control_path)"
                      ) -> Optional["ValidationSet"]:
        """The held-out pairs of all dataset entries that set val_folder_path; None when none does.
        Checks every file first (DatasetError listing all problems), like the training data."""
        held_out = held_out_datasets(datasets)
        if not held_out:
            return None
        pairs = discover_pairs(held_out, config_path_prefix=config_path_prefix)
        return cls(PairedDataset(pairs, held_out, trigger_word=trigger_word, seed=seed), seed, guidance)

    def __len__(self) -> int:
        return len(self.dataset)

    def _batches(self) -> list[list[int]]:
        groups: dict[tuple, list[int]] = {}
        for index, key in enumerate(self.dataset.batch_keys):  # one bucket and one control count per batch
            groups.setdefault(key, []).append(index)
        return [members[i:i + self.batch_size] for members in groups.values()
                for i in range(0, len(members), self.batch_size)]

    def _encoded(self, model: Architecture) -> list:
        if self._cache is not None and self._cache[0] == id(model):
            return self._cache[1]
        encoded = []
        for indices in self._batches():
            batch = model.encode_batch(collate_batch([self.dataset[i] for i in indices]))
            x0 = model.clean_latents(batch)
            noise = torch.stack([
                torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(self.seed * 1_000_003 + i))
                for i in indices])
            encoded.append((batch, noise))
        self._cache = (id(model), encoded)
        return encoded

    @torch.no_grad()
    def loss(self, model: Architecture) -> float:
        """Mean validation loss of `model`'s current weights (its denoiser in eval mode: no LoRA dropout)."""
        with eval_mode(model.denoiser()) as denoiser:
            total, count = 0.0, 0
            for encoded, noise in self._encoded(model):
                x0 = model.clean_latents(encoded)
                ones = torch.ones(x0.shape[0], device=x0.device)
                for t in self.timesteps:
                    times = torch.full((x0.shape[0],), t)
                    inputs, target = flow_matching.inputs_and_target(model, encoded, noise, times, self.guidance)
                    total += float(flow_matching.flow_matching_loss(denoiser(**inputs), target, ones)) * x0.shape[0]
                    count += x0.shape[0]
            return total / count


__all__ = ["DEFAULT_TIMESTEPS", "ValidationSet", "held_out_datasets"]
