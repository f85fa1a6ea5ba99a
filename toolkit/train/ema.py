"""Exponential moving average (EMA) of the trained weights: `train.ema_config`.

After every `ema_update_every`-th optimizer step each tracked weight's average moves towards the live weight:

    ema <- decay * ema + (1 - decay) * live          (ema_update, the whole math)

with `decay = ema_decay`, or with `ema_warmup` the smaller `min(ema_decay, (1 + n) / (10 + n))` at update n
(1-based; torch_ema's `use_num_updates`, diffusers' EMAModel default), which lets the average forget the untrained
start quickly. The average starts from the weights the run starts with (for a fresh LoRA: lora_B zero).

The averages are fp32 copies held on the training device, or on the CPU with `ema_on_cpu` (saves device memory; each
update then copies the live weights to the CPU). `applied()` swaps them into the live parameters in place for
sampling, validation and saving, and puts the training weights back exactly (a copy, not a recomputation), so the
optimizer, DDP and the RNGs never notice. Every rank holds the same weights, so every rank keeps the same average
and no collective is needed.

Not diffusers' EMAModel: its update subtracts shadow and live tensors directly (no CPU shadow beside a GPU weight)
and always applies a warm-up schedule, where ai-toolkit's `ema_decay` is a constant.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator, Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

from toolkit.state.train_state import StateError

log = logging.getLogger(__name__)

EMA_FILE = "ema.safetensors"  # in a training state folder


def ema_decay_at(decay: float, update: int, warmup: bool) -> float:
    """The decay used by update number `update` (1-based)."""
    return min(decay, (1 + update) / (10 + update)) if warmup else decay


@torch.no_grad()
def ema_update(average: torch.Tensor, live: torch.Tensor, decay: float) -> torch.Tensor:
    """average <- decay * average + (1 - decay) * live, in place (as average + (1 - decay) * (live - average))."""
    return average.lerp_(live.to(average.device, average.dtype), 1.0 - decay)


class EMA:
    """Averages of named parameters (the LoRA), updated after optimizer steps, swapped in when asked."""

    def __init__(self, named: Mapping[str, torch.nn.Parameter], decay: float, *, warmup: bool = False,
                 update_every: int = 1, on_cpu: bool = False) -> None:
        self.params = dict(named)
        self.decay, self.warmup, self.update_every = decay, warmup, update_every
        self.device = torch.device("cpu") if on_cpu else None  # None: each average beside its parameter
        self.average = {name: p.detach().to(self.device or p.device, torch.float32, copy=True)
                        for name, p in self.params.items()}
        self.steps = 0  # optimizer steps seen
        self.updates = 0  # averaging updates made (steps // update_every)

    @classmethod
    def from_config(cls, cfg, module: torch.nn.Module) -> Optional["EMA"]:
        """An EMA of `module`'s trainable parameters for `train.ema_config`, or None when use_ema is off."""
        if not cfg.use_ema:
            return None
        named = {name: p for name, p in module.named_parameters() if p.requires_grad}
        ema = cls(named, cfg.ema_decay, warmup=cfg.ema_warmup, update_every=cfg.ema_update_every,
                  on_cpu=cfg.ema_on_cpu)
        log.info("EMA of %d LoRA tensors (%.1f MB) on %s: decay %g%s, every %d step(s)", len(ema.average),
                 ema.nbytes() / 2**20, "the CPU" if cfg.ema_on_cpu else "the training device", cfg.ema_decay,
                 " with warm-up" if cfg.ema_warmup else "", cfg.ema_update_every)
        return ema

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.average.values())

    def step(self) -> None:
        """Call after each optimizer step."""
        self.steps += 1
        if self.steps % self.update_every:
            return
        self.updates += 1
        decay = ema_decay_at(self.decay, self.updates, self.warmup)
        for name, param in self.params.items():
            ema_update(self.average[name], param.detach(), decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averages in the live parameters for the duration; the training weights are put back bit-exactly."""
        with torch.no_grad():
            kept = {name: p.detach().to(self.device or p.device, copy=True) for name, p in self.params.items()}
            for name, param in self.params.items():
                param.copy_(self.average[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(kept[name])

    # -- training state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """{"average": {name: fp32 tensor}, "steps": int, "updates": int} (references, not copies)."""
        return {"average": self.average, "steps": self.steps, "updates": self.updates}

    def load_state_dict(self, state: Mapping) -> None:
        average = state["average"]
        if set(average) != set(self.average):
            missing, extra = sorted(set(self.average) - set(average)), sorted(set(average) - set(self.average))
            raise ValueError(f"the saved EMA does not fit this LoRA (missing {missing[:3]}, unexpected {extra[:3]})")
        for name, tensor in average.items():
            if tuple(tensor.shape) != tuple(self.average[name].shape):
                raise ValueError(f"the saved EMA of {name} has shape {tuple(tensor.shape)}, the LoRA "
                                 f"{tuple(self.average[name].shape)}")
            self.average[name].copy_(tensor)
        self.steps, self.updates = int(state["steps"]), int(state["updates"])

    def state_files(self) -> dict[str, bytes]:
        """The files this EMA adds to a training state (toolkit.state.train_state.save_state's extra_files)."""
        return {EMA_FILE: ema_state_bytes(self.state_dict())}

    def restore(self, state_folder: Path, step: int) -> None:
        """Resume from a training state of `step`: its EMA file, or (a state saved without EMA, resumed with
        resume_from after turning EMA on) the averages start at the restored weights, with a warning."""
        file = Path(state_folder) / EMA_FILE
        if file.is_file():
            try:
                self.load_state_dict(load_ema_state(file))
            except (ValueError, KeyError) as exc:
                raise StateError(f"training state {state_folder}: {exc}; start over with --fresh") from exc
            return
        log.warning("training state %s holds no EMA (saved with train.ema_config.use_ema off): the average starts "
                    "at the restored weights of step %d", state_folder, step)
        with torch.no_grad():
            for name, param in self.params.items():
                self.average[name].copy_(param.detach())
        self.steps, self.updates = step, step // self.update_every


def ema_state_bytes(state: Mapping) -> bytes:
    """EMA.state_dict() as safetensors: the fp32 averages, the counters in the header."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state["average"].items()}
    counters = {"steps": str(int(state["steps"])), "updates": str(int(state["updates"]))}
    return safetensors_save(tensors, metadata=counters)


def load_ema_state(file: Path) -> dict:
    """What ema_state_bytes wrote, in EMA.state_dict() layout (tensors on the CPU)."""
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
        average = {k: f.get_tensor(k) for k in f.keys()}
    return {"average": average, "steps": int(meta["steps"]), "updates": int(meta["updates"])}


@contextlib.contextmanager
def ema_weights(ema: Optional[EMA]) -> Iterator[None]:
    """`ema.applied()`, or nothing when EMA is off."""
    if ema is None:
        yield
    else:
        with ema.applied():
            yield


__all__ = ["EMA", "EMA_FILE", "ema_decay_at", "ema_state_bytes", "ema_update", "ema_weights", "load_ema_state"]
