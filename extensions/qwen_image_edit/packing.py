"""Qwen-Image latents as transformer tokens: normalisation, 2x2 packing and the img_shapes RoPE reads.

Pure tensor functions, each equal to what QwenImageEditPlusPipeline does inline (tests/test_qwen_math.py checks
them against the pipeline's own methods).
"""

from __future__ import annotations

from typing import Sequence

import torch

Shape = tuple[int, int, int]  # (frames, latent rows / 2, latent columns / 2) of one token run


def normalize_latents(latents: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """VAE posterior latents (B, C, ...) -> the transformer's space: (latents - mean) / std per channel."""
    shape = (1, len(mean)) + (1,) * (latents.ndim - 2)
    mean_t = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(shape)
    std_t = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(shape)
    return (latents - mean_t) / std_t


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 latent patch becomes one token, channels outermost."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of pack_latents: (B, H/2 * W/2, 4C) -> (B, C, H, W) for latent size (H, W)."""
    b, _, d = tokens.shape
    h, w = latent_hw
    patches = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, d // 4, h, w)


def token_shape(latent_hw: tuple[int, int]) -> Shape:
    """The (1, H/2, W/2) entry of img_shapes for a latent of size (H, W)."""
    return (1, latent_hw[0] // 2, latent_hw[1] // 2)


def img_shapes(target_hw: tuple[int, int], reference_hws: Sequence[tuple[int, int]], batch: int
               ) -> list[list[Shape]]:
    """Per batch item: the noisy target's run first, then one run per reference image, in sequence order."""
    return [[token_shape(target_hw), *[token_shape(hw) for hw in reference_hws]] for _ in range(batch)]


def denormalize_latents(latents: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Inverse of normalize_latents, written as the pipeline writes it (divide by 1/std: the same bits as upstream)."""
    shape = (1, len(mean)) + (1,) * (latents.ndim - 2)
    mean_t = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(std).view(shape).to(latents.device, latents.dtype)
    return latents / inv_std + mean_t
