"""What an architecture gives the memory planner (toolkit.arch.Architecture.plan_model): its parts built on the
meta device from config files, and how to build and feed a smaller copy of its denoiser for tracing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from toolkit.errors import UserError


@dataclass(frozen=True)
class TraceShape:
    """One micro-batch as the denoiser sees it: pixel sizes of the target and of each control image, text tokens."""

    batch: int
    target_hw: tuple[int, int]
    control_hws: tuple[tuple[int, int], ...]
    text_tokens: int
    dtype: torch.dtype


@dataclass
class PlanModel:
    """An architecture's parts on the meta device (frozen, in the base dtype) and its tracing hooks."""

    transformer: torch.nn.Module
    text_encoders: Mapping[str, torch.nn.Module]  # component name -> module
    vae: torch.nn.Module
    lora_targets: Any  # peft target_modules when network.target_modules is unset
    #: config key -> number of repeated blocks of the full transformer, e.g. {"num_layers": 19, ...}
    block_counts: Mapping[str, int]
    #: meta transformer of the same architecture with these block counts, in the given dtype
    build_transformer: Callable[[Mapping[str, int], torch.dtype], torch.nn.Module]
    #: the module the trainer calls (wraps the transformer), and its keyword inputs for a shape (fake tensors)
    denoiser: Callable[[torch.nn.Module], torch.nn.Module]
    trace_inputs: Callable[[TraceShape], dict]
    #: layer name patterns model.quantize keeps unquantized, for (module, qtype, dtype, te): the transformer, or with
    #: te=True the text encoder model.quantize_te quantizes
    quantize_exclude: Callable[..., Sequence[str]]
    #: the text encoder (component name) model.quantize_te quantizes
    quantize_te: str | None = None
    image_tokens: Callable[[int, int], int] = lambda h, w: (h // 16) * (w // 16)
    #: (shape, images, text) -> (fresh meta encoder modules, run): encodes one batch's images (VAE) and/or captions,
    #: what a step does before the denoiser when latents or text embeddings are not cached; None: not traced
    encode: Callable[[TraceShape, bool, bool], tuple[list[torch.nn.Module], Callable[[], Any]]] | None = None


def read_configs(name_or_path: str, components: Sequence[str], overrides: Mapping[str, str] = {}
                 ) -> dict[str, dict]:
    """config.json of each component, from a diffusers folder or a Hub id already in the local Hugging Face cache
    (nothing is downloaded). `overrides`: component -> folder holding its config.json (model.transformer_path)."""
    configs = {}
    local = Path(name_or_path).expanduser()
    for name in components:
        if name in overrides:
            file = Path(overrides[name]).expanduser() / "config.json"
        elif local.is_dir():
            file = local / name / "config.json"
        else:
            file = _cached(name_or_path, f"{name}/config.json")
        if not file.is_file():
            raise UserError(f"model: {file} not found; the planner reads each component's config.json")
        configs[name] = json.loads(file.read_text(encoding="utf-8"))
    return configs


def _cached(repo_id: str, filename: str) -> Path:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    if not isinstance(found, str):
        raise UserError(f"model.name_or_path {repo_id}: {filename} is not in the local Hugging Face cache and the "
                        "planner does not download; download the model once (or only its config files), give a "
                        "local folder, or plan with --preset")
    return Path(found)
