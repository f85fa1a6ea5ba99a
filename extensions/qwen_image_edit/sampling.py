"""Our Qwen-Image-Edit-Plus denoising loop: QwenImageEditPlusPipeline.__call__ step for step, through our denoiser.

Written out (rather than calling the pipeline) so the reference images can be encoded at the target's size
(model.match_target_res) and so sampling runs the same `QwenEditDenoiser` as training. With the pipeline's reference
size it gives the pipeline's image bit for bit (tests/test_qwen_generate.py).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_shift, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from extensions.qwen_image_edit.conditioning import Conditioning
from extensions.qwen_image_edit.packing import denormalize_latents, img_shapes, pack_latents, unpack_latents


def _sigma_schedule(pipe: Any, steps: int, image_seq_len: int, device: torch.device) -> torch.Tensor:
    """Timesteps (sigma * 1000) of the pipeline: linear sigmas, shifted by the resolution-dependent mu."""
    config = pipe.scheduler.config
    mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    sigmas = np.linspace(1.0, 1 / steps, steps)
    timesteps, _ = retrieve_timesteps(pipe.scheduler, steps, device, sigmas=sigmas, mu=mu)
    return timesteps


def _prediction(denoiser: torch.nn.Module, latents: torch.Tensor, cond: Conditioning, timestep: torch.Tensor,
                shapes: list) -> torch.Tensor:
    return denoiser(hidden_states=latents, reference_tokens=cond.references, encoder_hidden_states=cond.prompt_embeds,
                    encoder_hidden_states_mask=cond.prompt_mask, timestep=timestep, img_shapes=shapes)


@torch.no_grad()
def render(pipe: Any, denoiser: torch.nn.Module, cond: Conditioning, width: int, height: int, steps: int,
           generator: torch.Generator, true_cfg_scale: float = 1.0, negative: Optional[Conditioning] = None,
           output_type: str = "pil", stop: Optional[Callable[[], bool]] = None) -> Union[Image.Image, np.ndarray]:
    """One image of width x height (floored to multiples of 16) from noise drawn with `generator`; output_type
    "np" gives the float image before 8-bit rounding. `stop()` true after a denoising step ends the loop early."""
    multiple = pipe.vae_scale_factor * 2
    width, height = width // multiple * multiple, height // multiple * multiple
    device, dtype = cond.prompt_embeds.device, cond.prompt_embeds.dtype
    latent_hw = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    channels = pipe.transformer.config.in_channels // 4
    noise = randn_tensor((1, 1, channels, *latent_hw), generator=generator, device=device, dtype=dtype)
    latents = pack_latents(noise[:, 0])
    shapes = img_shapes(latent_hw, cond.reference_hws, 1)
    timesteps = _sigma_schedule(pipe, steps, latents.shape[1], device)
    pipe.scheduler.set_begin_index(0)
    for t in timesteps:
        timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000  # the transformer takes sigma in [0, 1]
        pred = _prediction(denoiser, latents, cond, timestep, shapes)
        if negative is not None and true_cfg_scale > 1:
            neg = _prediction(denoiser, latents, negative, timestep, shapes)
            combined = neg + true_cfg_scale * (pred - neg)
            # The pipeline keeps the conditional prediction's norm per token.
            pred = combined * (torch.norm(pred, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
        latents = pipe.scheduler.step(pred, t, latents, return_dict=False)[0]
        if stop is not None and stop():
            break
    vae = pipe.vae
    image_latents = unpack_latents(latents, latent_hw).unsqueeze(2).to(vae.dtype)
    image_latents = denormalize_latents(image_latents, vae.config.latents_mean, vae.config.latents_std)
    image = vae.decode(image_latents, return_dict=False)[0][:, :, 0]
    return pipe.image_processor.postprocess(image, output_type=output_type)[0]
