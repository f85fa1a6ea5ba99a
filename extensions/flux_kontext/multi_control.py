"""Sampling with several control images: FluxKontextPipeline's denoising loop, with one token run per control image.

diffusers 0.42.1's FluxKontextPipeline takes ONE conditioning image (`image`; a list there is a batch, one image
per prompt), and FluxKontextInpaintPipeline adds one `image_reference` (also frame 1) to an inpainting source. Neither
can condition on two images at once, so with several `--ctrl_img` we run the same steps ourselves:

    controls  = [pack(vae(c_k))]                       each (1, M_k, 64), resized as the pipeline resizes `image`
    ids       = kontext_position_ids(target, c_1, c_2, ...)   frames 0, 1, 2, ...
    for t in the pipeline's timesteps (same sigmas, same resolution shift mu):
        v = transformer([x ; c_1 ; c_2 ...], ids)[:, :N];  x = scheduler.step(v, t, x)
    image = vae.decode(unpack(x))

Noise, timesteps, guidance and decoding come from the pipeline's own helpers, so one control through this loop gives
the pipeline's image (tests/test_multi_control.py checks it); the pipeline itself still renders every single-control
sample.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift, retrieve_timesteps
from PIL import Image

from extensions.flux_kontext.packing import kontext_position_ids, pack_latents


def encode_controls(pipe, controls: Sequence[Image.Image], dtype: torch.dtype) -> list[torch.Tensor]:
    """Each control image as (1, 16, h, w) scaled latents, sized as FluxKontextPipeline sizes `image` (its own size
    rounded down to multiples of 16 pixels, no auto-resize)."""
    multiple_of = pipe.vae_scale_factor * 2
    latents = []
    for control in controls:
        height, width = pipe.image_processor.get_default_height_width(control)
        width, height = width // multiple_of * multiple_of, height // multiple_of * multiple_of
        pixels = pipe.image_processor.preprocess(pipe.image_processor.resize(control, height, width), height, width)
        pixels = pixels.to(pipe._execution_device, dtype)
        latents.append(pipe._encode_vae_image(pixels, generator=None))
    return latents


@torch.no_grad()
def render_multi_control(pipe, controls: Sequence[Image.Image], prompt_embeds: torch.Tensor,
                         pooled_prompt_embeds: torch.Tensor, width: int, height: int, steps: int,
                         guidance_scale: float, generator: torch.Generator) -> Image.Image:
    """One image conditioned on every image of `controls` (in order: frames 1, 2, ...); `prompt_embeds` (1, L, D)
    and `pooled_prompt_embeds` (1, P) as pipe.encode_prompt gives them."""
    device, dtype = pipe._execution_device, prompt_embeds.dtype
    transformer = pipe.transformer
    control_latents = encode_controls(pipe, controls, dtype)
    control_tokens = torch.cat([pack_latents(c) for c in control_latents], dim=1)
    channels = transformer.config.in_channels // 4
    # The pipeline's noise: same shape, same generator call, so the same seed gives the same start.
    latents, _, _, _ = pipe.prepare_latents(None, 1, channels, height, width, dtype, device, generator)
    latent_hw = (2 * (height // (pipe.vae_scale_factor * 2)), 2 * (width // (pipe.vae_scale_factor * 2)))
    img_ids = kontext_position_ids(latent_hw, *(tuple(c.shape[-2:]) for c in control_latents),
                                           device=device).to(dtype)
    txt_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype)
    timesteps = _timesteps(pipe, steps, latents.shape[1], device)
    guidance = (torch.full((1,), guidance_scale, device=device, dtype=torch.float32)
                if transformer.config.guidance_embeds else None)
    for t in timesteps:
        velocity = transformer(hidden_states=torch.cat([latents, control_tokens], dim=1),
                               timestep=t.expand(1).to(dtype) / 1000, guidance=guidance,
                               pooled_projections=pooled_prompt_embeds, encoder_hidden_states=prompt_embeds,
                               txt_ids=txt_ids, img_ids=img_ids, joint_attention_kwargs={}, return_dict=False)[0]
        latents = pipe.scheduler.step(velocity[:, :latents.shape[1]], t, latents, return_dict=False)[0]
    return _decode(pipe, latents, height, width)


def _timesteps(pipe, steps: int, image_seq_len: int, device) -> torch.Tensor:
    """The pipeline's schedule: sigmas 1 -> 1/steps, shifted by the resolution-dependent mu."""
    config = pipe.scheduler.config
    mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    sigmas = np.linspace(1.0, 1 / steps, steps)
    timesteps, _ = retrieve_timesteps(pipe.scheduler, steps, device, sigmas=sigmas, mu=mu)
    pipe.scheduler.set_begin_index(0)
    return timesteps


def _decode(pipe, latents: torch.Tensor, height: int, width: int) -> Image.Image:
    latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    image = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil")[0]


__all__ = ["encode_controls", "render_multi_control"]
