"""The small interface every architecture implements, and the registry that finds one by its `model.arch` name.

toolkit/ never names an architecture: packages under extensions/ register themselves when imported
(jobs/extensions.py imports them all).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Iterator, Optional, Sequence, TypeVar, Union

import torch
from PIL import Image

from toolkit.errors import ArchitectureError
from toolkit.registry import Registry
from toolkit.render.sampling import SampleRequest


class Architecture(ABC):
    """What the trainer needs from a model family: load, encode a batch, a trainable denoiser, sample."""

    name: ClassVar[str]
    #: peft target_modules used when network.target_modules is not set (regex string or module-name suffixes).
    default_lora_targets: ClassVar[Union[str, Sequence[str]]]

    #: Whether model.match_target_res changes anything: the architecture gives control images a size of their own.
    supports_match_target_res: ClassVar[bool] = False

    #: Whether the text encoder also sees the control images (a vision-language prompt encoder): its cached
    #: embeddings are keyed by each item's control images too, and items keep their pixels for it (toolkit.data.cache).
    text_sees_images: ClassVar[bool] = False

    #: Whether a batch without control images trains (plain generation: zero control tokens); datasets without
    #: control_path and datasets[].control_dropout_rate need it.
    trains_without_controls: ClassVar[bool] = False

    #: Whether datasets[].control_resolution works: the architecture takes control images of another size than the
    #: target (with their own position ids) instead of resizing them itself.
    supports_control_resolution: ClassVar[bool] = False

    #: Whether model.trim_text_tokens works (the text sequence of a batch may be cut after its longest caption).
    supports_trim_text_tokens: ClassVar[bool] = False

    transformer: torch.nn.Module

    @classmethod
    def check_model_options(cls, model_cfg: Any) -> list[str]:
        """model options this architecture would silently ignore (run before any model loads)."""
        problems = []
        if model_cfg.match_target_res and not cls.supports_match_target_res:
            problems.append(f"model.match_target_res: {cls.name} always encodes control images at the target's "
                            "size; remove the option")
        if getattr(model_cfg, "trim_text_tokens", False) and not cls.supports_trim_text_tokens:
            problems.append(f"model.trim_text_tokens: not implemented for {cls.name}; remove the option")
        return problems

    @classmethod
    def check_source(cls, name_or_path: str) -> list[str]:
        """Problems with the model location found without loading anything (run before any model loads)."""
        return []

    @classmethod
    def plan_model(cls, model_cfg: Any, preset: Optional[str] = None) -> Any:
        """The memory planner's view of this architecture (toolkit.plan.model.PlanModel): its components built on the
        meta device from their config files (no weights), and how to trace its denoiser. `preset`: one of
        plan_presets(), a published model's config values shipped as facts, instead of model_cfg's files."""
        raise ArchitectureError(f"model.arch {cls.name}: the memory planner (run.py plan) does not know this "
                                "architecture yet")

    @classmethod
    def plan_presets(cls) -> Sequence[str]:
        """Names plan_model accepts as `preset`."""
        return ()

    @classmethod
    @abstractmethod
    def load(cls, model_cfg: Any, device: torch.device, dtype: torch.dtype) -> "Architecture":
        """Load every component onto `device`, frozen."""

    def lora_targets(self) -> Union[str, Sequence[str]]:
        """peft target_modules for this loaded model when network.target_modules is unset: default_lora_targets,
        narrowed by an architecture whose choice depends on the loaded transformer (e.g. its number of blocks)."""
        return self.default_lora_targets

    @abstractmethod
    def denoiser(self) -> torch.nn.Module:
        """The module the optimizer trains and DDP wraps; forward(**inputs) returns the prediction."""

    @abstractmethod
    def encode_batch(self, batch: dict) -> Any:
        """Frozen encoders on a collated batch (images, captions) -> an encoded batch (no grad)."""

    @abstractmethod
    def clean_latents(self, encoded: Any) -> torch.Tensor:
        """The clean target latents x0 of an encoded batch, (B, ...) with the batch first; the trainer draws noise
        of this shape and forms x_t and the flow-matching target from it (toolkit.train.flow_matching)."""

    @abstractmethod
    def denoiser_inputs(self, encoded: Any, x_t: torch.Tensor, t: torch.Tensor, guidance: float
                        ) -> dict[str, torch.Tensor]:
        """Keyword arguments of denoiser() for the noisy latents x_t (shaped as clean_latents) at times t (B,):
        conditioning tokens, position ids, text embeddings. The denoiser returns a prediction shaped as x_t."""

    def with_captions(self, encoded: Any, captions: Sequence[str]) -> Any:
        """The encoded batch with its text replaced by `captions` (one per sample); images unchanged. Used by
        train.diff_output_preservation."""
        raise ArchitectureError(f"{self.name}: train.diff_output_preservation is not implemented for this "
                                "architecture")

    def stack_inputs(self, inputs: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Several denoiser_inputs of the same shapes as ONE batch (concatenated along the batch), so one forward
        (and one DDP gradient sync) covers them; the prediction splits back with chunk(len(inputs))."""
        raise ArchitectureError(f"{self.name}: train.diff_output_preservation is not implemented for this "
                                "architecture")

    def loss_weights(self, masks: torch.Tensor, encoded: Any) -> torch.Tensor:
        """Loss weights shaped as clean_latents(encoded), from pixel masks (B, 1, H, W) in [0, 1] at the target's size
        (dataset mask_path, toolkit.data.masks). Architectures that support loss masks override this."""
        raise ArchitectureError(f"model.arch {self.name}: this architecture cannot train with loss masks (mask_path)")

    @classmethod
    def supports_loss_masks(cls) -> bool:
        return cls.loss_weights is not Architecture.loss_weights

    @abstractmethod
    def sample(self, requests: Sequence[SampleRequest], controls: Sequence[Image.Image],
               stop: Optional[Callable[[], bool]] = None) -> list[Image.Image]:
        """Render each request with the current weights; `stop()` true ends the denoising loop early (a stop signal
        during sampling: the caller discards the image)."""


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`module` in eval mode (no LoRA dropout) for the block, then back to the mode it had (sampling, validation)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


A = TypeVar("A", bound=type)
_ARCHITECTURES: Registry[type] = Registry(
    lambda name, known: ArchitectureError(f"model.arch: unknown architecture {name!r}; known: {known}"))


def register_architecture(cls: A) -> A:
    """Class decorator: make `cls` available as `model.arch: <cls.name>`."""
    return _ARCHITECTURES.add(cls.name, cls)


def get_architecture(name: str) -> type:
    return _ARCHITECTURES.get(name)


def known_architectures() -> list[str]:
    return _ARCHITECTURES.names()
