"""What `generate` and `compare` need from an architecture beyond training: named LoRA adapters and batched rendering.

An extension registers one `LoraRenderer` per architecture name (the way toolkit.arch registers architectures), so
jobs/ stays architecture-agnostic.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Optional, Sequence, TypeVar

import torch
from PIL import Image

from toolkit.arch import Architecture
from toolkit.errors import ArchitectureError
from toolkit.registry import Registry
from toolkit.render.sampling import SampleRequest


class LoraRenderer(ABC):
    """A loaded base model with any number of named LoRA adapters, one of them (or none) active at a time."""

    #: The loaded architecture (encoders and denoiser share the weights the renderer uses: validation loss).
    model: Architecture
    #: Names of the loaded adapters, in load order.
    adapters: list[str]

    @classmethod
    @abstractmethod
    def load(cls, model_cfg: Any, device: torch.device, dtype: torch.dtype) -> "LoraRenderer":
        """Load the base model (model_cfg: toolkit.config.schema.ModelConfig) for inference."""

    @abstractmethod
    def add_lora(self, path: Path, name: str) -> None:
        """Load a LoRA file (diffusers or ComfyUI/kohya layout) as adapter `name`, inactive."""

    def use_lora(self, name: Optional[str], scale: float = 1.0) -> None:
        """Render with only adapter `name` at `scale`; None renders the base model. The adapters are peft adapters
        on model.transformer (diffusers' PeftAdapterMixin), named in `self.adapters` by add_lora."""
        transformer = self.model.transformer
        if name is None:
            if self.adapters:
                transformer.disable_lora()
            return
        if name not in self.adapters:
            raise KeyError(f"no LoRA adapter {name!r} loaded (have {self.adapters})")
        transformer.enable_lora()
        transformer.set_adapters([name], weights=[scale])

    def remove_lora(self, name: str) -> None:
        """Unload adapter `name` and free its weights."""
        self.model.transformer.delete_adapters(name)
        self.adapters.remove(name)

    @abstractmethod
    def render(self, requests: Sequence[SampleRequest], controls: Sequence[Image.Image]) -> list[Image.Image]:
        """One batch (see batch_key): each request's image, from noise seeded by request.seed."""


def batch_key(request: SampleRequest, control_size: tuple[int, int]) -> tuple:
    """Requests with equal keys can be rendered in one batch (same output and control size, steps, guidance)."""
    return request.width, request.height, request.steps, request.guidance_scale, tuple(control_size)


def plan_batches(keys: Sequence[tuple], batch_size: int) -> list[list[int]]:
    """Indices grouped by key in first-seen order, cut into batches of at most batch_size."""
    groups: dict[tuple, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return [members[i:i + batch_size] for members in groups.values() for i in range(0, len(members), batch_size)]


R = TypeVar("R", bound=type)
_RENDERERS: Registry[type] = Registry(
    lambda name, known: ArchitectureError(f"model.arch: {name!r} cannot generate with LoRAs; known: {known}"))


def register_renderer(arch_name: str):
    """Class decorator: the LoraRenderer of architecture `arch_name`."""

    def add(cls: R) -> R:
        return _RENDERERS.add(arch_name, cls)

    return add


def get_renderer(arch_name: str) -> type:
    return _RENDERERS.get(arch_name)


__all__ = ["LoraRenderer", "batch_key", "get_renderer", "plan_batches", "register_renderer"]
