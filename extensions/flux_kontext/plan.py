"""FLUX.1 Kontext for the memory planner (toolkit.plan): the components on the meta device from their config.json
files, and fake inputs of the Kontext step ([target ; control ...] image tokens, T5 sequence, CLIP pooled).

`PRESETS`: config values of the published FLUX.1 Kontext [dev] (transformer, CLIP-L text encoder, T5-XXL encoder,
VAE) written down as facts in flux_kontext_dev.json, so the real model can be planned with no download."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from extensions.flux_kontext.packing import kontext_position_ids
from extensions.flux_kontext.quantize import TRANSFORMER_EXCLUDE, safe_exclude
from toolkit.plan.model import PlanModel, TraceShape, read_configs

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae")
BLOCK_KEYS = ("num_layers", "num_single_layers")  # double-stream and single-stream blocks
PRESETS = {"flux-kontext-dev": Path(__file__).with_name("flux_kontext_dev.json")}


def _meta(build, dtype: torch.dtype) -> torch.nn.Module:
    with torch.device("meta"):
        module = build()
    return (module if dtype == torch.float32 else module.to(dtype)).requires_grad_(False)


def _transformer(config: Mapping[str, Any], counts: Mapping[str, int], dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    return _meta(lambda: FluxTransformer2DModel.from_config({**config, **counts}), dtype)


def _encoders(configs: Mapping[str, dict], dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    return {"text_encoder": _meta(lambda: CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])), dtype),
            "text_encoder_2": _meta(lambda: T5EncoderModel(T5Config(**configs["text_encoder_2"])), dtype)}


def plan_model(model_cfg: Any, preset: str | None, lora_targets: Any,
               denoiser: Callable[[torch.nn.Module], torch.nn.Module]) -> PlanModel:
    """Kontext's skeleton from model.name_or_path (diffusers folder, or a Hub id in the local cache; a
    model.transformer_path replaces the transformer's config) or from a preset. `lora_targets` and `denoiser` (the
    module the trainer calls) come from model.py."""
    from diffusers import AutoencoderKL

    if preset is not None:
        configs = json.loads(PRESETS[preset].read_text(encoding="utf-8"))
    else:
        overrides = {"transformer": model_cfg.transformer_path} if model_cfg.transformer_path else {}
        configs = read_configs(model_cfg.name_or_path, COMPONENTS, overrides)
    config = {k: v for k, v in configs["transformer"].items() if not k.startswith("_")}
    counts = {key: int(config.get(key, 0)) for key in BLOCK_KEYS}
    dtype = torch.float32  # a placeholder: the planner counts floating-point tensors in the planned dtype
    vae_config = {k: v for k, v in configs["vae"].items() if not k.startswith("_")}
    text_dims = (configs["text_encoder_2"]["d_model"], configs["text_encoder"].get("projection_dim",
                                                                                    config["pooled_projection_dim"]))

    def exclude(module: torch.nn.Module, qtype: str, dtype: torch.dtype, te: bool = False):
        return safe_exclude(module, qtype, dtype, always=() if te else TRANSFORMER_EXCLUDE)

    return PlanModel(
        transformer=_transformer(config, counts, dtype), text_encoders=_encoders(configs, dtype),
        vae=_meta(lambda: AutoencoderKL.from_config(vae_config), dtype), lora_targets=lora_targets,
        block_counts=counts, build_transformer=lambda c, d: _transformer(config, c, d),
        denoiser=denoiser, trace_inputs=lambda shape: trace_inputs(shape, text_dims, config),
        quantize_exclude=exclude, quantize_te="text_encoder_2",
        encode=lambda shape, images, text: encode_trace(configs, vae_config, shape, images, text))


def encode_trace(configs: Mapping[str, dict], vae_config: Mapping[str, Any], shape: TraceShape, images: bool,
                 text: bool) -> tuple[list[torch.nn.Module], Callable[[], None]]:
    """Fresh meta encoders and the encoding of one batch as FluxKontext.encode_batch does it: the VAE on the target
    and each control image (posterior mode), then CLIP (77 tokens) and T5 (max_sequence_length)."""
    from diffusers import AutoencoderKL

    b, dtype = shape.batch, shape.dtype
    vae = _meta(lambda: AutoencoderKL.from_config(vae_config), dtype) if images else None
    encoders = _encoders(configs, dtype) if text else {}
    clip_len = configs["text_encoder"].get("max_position_embeddings", 77)

    def run() -> None:
        kept = []  # encode_batch keeps each latent until the batch is packed
        for hw in (shape.target_hw, *shape.control_hws) if vae is not None else ():
            kept.append(vae.encode(torch.empty(b, 3, *hw, dtype=dtype)).latent_dist.mode())
        if encoders:
            encoders["text_encoder"](torch.zeros(b, clip_len, dtype=torch.long))
            encoders["text_encoder_2"](torch.zeros(b, shape.text_tokens, dtype=torch.long))

    return [m for m in (vae, *encoders.values()) if m is not None], run


def trace_inputs(shape: TraceShape, text_dims: tuple[int, int], config: Mapping[str, Any]) -> dict:
    """KontextDenoiser's keyword inputs for `shape` (built inside the fake mode: no memory, no values)."""
    b, dtype = shape.batch, shape.dtype
    target = (shape.target_hw[0] // 8, shape.target_hw[1] // 8)  # latent grids (VAE /8); tokens pack 2x2 of them
    controls = [(h // 8, w // 8) for h, w in shape.control_hws]
    channels = config.get("in_channels", 64)
    return {"hidden_states": torch.empty(b, _tokens(target), channels, dtype=dtype),
            "control_tokens": torch.empty(b, sum(_tokens(hw) for hw in controls), channels, dtype=dtype),
            "encoder_hidden_states": torch.empty(b, shape.text_tokens, text_dims[0], dtype=dtype),
            "pooled_projections": torch.empty(b, text_dims[1], dtype=dtype),
            "timestep": torch.empty(b, dtype=dtype),
            "guidance": torch.empty(b, dtype=torch.float32) if config.get("guidance_embeds") else None,
            "img_ids": kontext_position_ids(target, *controls).float(),
            "txt_ids": torch.zeros(shape.text_tokens, 3, dtype=dtype)}


def _tokens(latent_hw: tuple[int, int]) -> int:
    return (latent_hw[0] // 2) * (latent_hw[1] // 2)
