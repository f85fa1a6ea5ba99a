"""Activation memory of one training step, traced on fake tensors (no weights, no compute).

`PeakTracker` is a TorchDispatchMode that sees every tensor an op creates, keeps the storages alive-weakly and
records the peak of their total bytes (each storage rounded up to 512 bytes, the CUDA caching allocator's smallest
block). torch's own MemTracker (torch.distributed._tools.mem_tracker) does the same but installs gradient hooks on
every parameter a module owns and fails on frozen ones ("cannot register a hook on a tensor that doesn't require
gradient"), which every LoRA model has; this tracker hooks nothing.

`trace_step` materialises a meta-device module as fake tensors under FakeTensorMode, runs forward + loss + backward
once, and returns the tracked peak of what the step itself allocated (activations, their gradients, temporaries and
the trained parameters' gradients), excluding the weights, which the planner counts separately.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

ALLOC_ROUND = 512  # bytes: the smallest block of torch's CUDA caching allocator


def _rounded(nbytes: int) -> int:
    return -(-nbytes // ALLOC_ROUND) * ALLOC_ROUND


class PeakTracker(TorchDispatchMode):
    """Live bytes of the storages created by ops inside the mode, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self._sizes: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._refs: list = []
        self.current = 0
        self.peak = 0

    def _freed(self, size: int) -> Callable:
        def callback(_ref) -> None:
            self.current -= size
        return callback

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self._sizes:
            return
        size = _rounded(storage.nbytes())
        self._sizes[storage] = size
        self._refs.append(weakref.ref(storage, self._freed(size)))
        self.current += size
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's storage: memory that existed before the op (e.g. weight.t()
        # of a frozen Linear), already counted if the mode made it, never allocated here otherwise.
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor) and id(item.untyped_storage()) not in inputs:
                self._track(item)
        return out


def materialize_fake(module: torch.nn.Module) -> None:
    """Replace the meta-device parameters and buffers of `module` by CPU tensors of the same shapes and dtypes: fake
    ones inside a FakeTensorMode, zeros outside it. Done by hand because Module.to() cannot swap fake parameters in."""
    for mod in module.modules():
        for name, param in list(mod._parameters.items()):
            if param is not None:
                mod._parameters[name] = torch.nn.Parameter(torch.zeros(param.shape, dtype=param.dtype),
                                                           requires_grad=param.requires_grad)
        for name, buffer in list(mod._buffers.items()):
            if buffer is not None:
                mod._buffers[name] = torch.zeros(buffer.shape, dtype=buffer.dtype)


def _mode(fake: bool):
    return FakeTensorMode() if fake else contextlib.nullcontext()


@dataclass(frozen=True)
class StepTrace:
    """Peak bytes a forward + backward allocated beyond the weights; the trained parameters' gradient bytes at the
    end (to tell gradients from activations)."""

    peak_bytes: int
    grad_bytes: int


def trace_step(module: torch.nn.Module, make_inputs: Callable[[], dict], loss_of: Callable,
               fake: bool = True) -> StepTrace:
    """One forward + loss + backward of `module` (built on the meta device, frozen base + trainable adapter) on fake
    tensors. `make_inputs()` builds the keyword inputs (called inside the fake mode); `loss_of(output)` the scalar.
    fake=False runs on real CPU tensors instead: the same bytes (the same CPU kernels run), and faster for a model
    small enough to compute (fake dispatch costs far more per op than a tiny real one)."""
    with _mode(fake):
        materialize_fake(module)
        inputs = make_inputs()
        tracker = PeakTracker()
        with tracker:
            loss_of(module(**inputs)).backward()
        grads = sum(_rounded(p.grad.untyped_storage().nbytes()) for p in module.parameters() if p.grad is not None)
    return StepTrace(peak_bytes=tracker.peak, grad_bytes=grads)


def trace_no_grad(modules: list[torch.nn.Module], run: Callable[[], object], fake: bool = True) -> int:
    """Peak bytes `run()` allocates under no_grad with `modules` (meta) materialised as fake tensors (or real ones:
    see trace_step): the frozen encoders (VAE, text encoders) of one batch."""
    with _mode(fake):
        for module in modules:
            materialize_fake(module)
        tracker = PeakTracker()
        with tracker, torch.no_grad():
            run()
    return tracker.peak
