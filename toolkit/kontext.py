"""The FLUX Kontext training objective as pure tensor functions.

Shapes: B batch, C latent channels (16), H x W latent grid (image / 8), N = H/2 * W/2 tokens of C*4 features.

    x0      = pack(vae_latents(target))                  (B, N, 64)
    ctrl    = pack(vae_latents(control))                 (B, M, 64)
    t       ~ timestep distribution in (0, 1)            (B,)
    x_t     = (1 - t) x0 + t noise                       (B, N, 64)
    pred    = transformer([x_t ; ctrl], ids=[ids(0) ; ids(1)])[:, :N]
    (several controls: [x_t ; ctrl_1 ; ctrl_2 ...] with ids [ids(0) ; ids(1) ; ids(2) ...]; loss on x_t only)
    loss    = mean_b w(t_b) * mean((pred - (noise - x0))^2)

The control tokens go AFTER the noisy target tokens, with position-id first coordinate 1, exactly as diffusers'
FluxKontextPipeline does at inference, so a LoRA trained here behaves the same there.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

TimestepType = Literal["sigmoid", "linear", "weighted", "shift"]

# Integral of exp(-2 (t - 0.5)^2) over [0, 1]: normalises the "weighted" loss weights to mean 1.
_BELL_MEAN = math.sqrt(math.pi / 2.0) * math.erf(math.sqrt(2.0) * 0.5)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C * 4): each 2x2 latent patch becomes one token (FLUX's layout)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even, got {h}x{w}")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of pack_latents for a latent grid of `height` x `width`: (B, N, C*4) -> (B, C, H, W)."""
    b, n, d = tokens.shape
    if n != (height // 2) * (width // 2):
        raise ValueError(f"{n} tokens do not fit a {height}x{width} latent grid")
    x = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def position_ids(latent_height: int, latent_width: int, frame: int, device=None) -> torch.Tensor:
    """(H/2 * W/2, 3) ids [frame, row, col] of packed tokens; frame 0 = target, k >= 1 = the k-th control image."""
    rows = torch.arange(latent_height // 2, device=device, dtype=torch.float32)
    cols = torch.arange(latent_width // 2, device=device, dtype=torch.float32)
    grid_r, grid_c = torch.meshgrid(rows, cols, indexing="ij")
    frame_col = torch.full_like(grid_r, float(frame))
    return torch.stack([frame_col, grid_r, grid_c], dim=-1).reshape(-1, 3)


def kontext_position_ids(target_hw: tuple[int, int], *control_hws: tuple[int, int], device=None) -> torch.Tensor:
    """Ids of the joint sequence [target ; control 1 ; control 2 ; ...] for the latent grids of the target and of
    each control image: frame 0 for the target, frame k for the k-th control, rows and columns from 0 in each.

    With one control this is exactly diffusers' FluxKontextPipeline layout (its image ids have frame 1)."""
    if not control_hws:
        raise ValueError("kontext_position_ids needs at least one control grid")
    grids = [position_ids(*target_hw, frame=0, device=device)]
    grids += [position_ids(*hw, frame=k, device=device) for k, hw in enumerate(control_hws, start=1)]
    return torch.cat(grids, dim=0)


def resolution_shift_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                        base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent time shift (same line as diffusers' calculate_shift)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def shift_timesteps(t: torch.Tensor, mu: float) -> torch.Tensor:
    """Map t in (0,1) towards noise as FLUX's scheduler does: exp(mu) / (exp(mu) + 1/t - 1)."""
    e = math.exp(mu)
    return e / (e + (1.0 / t - 1.0))


def sample_timesteps(kind: TimestepType, batch: int, generator: torch.Generator, image_seq_len: int,
                     device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw flow-matching times t in (0,1) and per-sample loss weights (mean 1), both (B,) fp32.

    sigmoid:  t = sigmoid(N(0,1)), concentrates on mid noise levels (SD3 / FLUX fine-tuning default).
    linear:   t ~ U(0,1).
    shift:    U(0,1) shifted by FLUX's resolution-dependent mu, the schedule the sampler uses.
    weighted: t ~ U(0,1) with a bell-shaped loss weight exp(-2 (t - 0.5)^2) (ai-toolkit's "weighted").
    """
    dev = generator.device
    weights = torch.ones(batch, device=dev)
    if kind == "sigmoid":
        t = torch.sigmoid(torch.randn(batch, generator=generator, device=dev))
    elif kind == "linear":
        t = torch.rand(batch, generator=generator, device=dev)
    elif kind == "shift":
        u = torch.rand(batch, generator=generator, device=dev).clamp(1e-4, 1 - 1e-4)
        t = shift_timesteps(u, resolution_shift_mu(image_seq_len))
    elif kind == "weighted":
        t = torch.rand(batch, generator=generator, device=dev)
        weights = torch.exp(-2.0 * (t - 0.5) ** 2) / _BELL_MEAN
    else:
        raise ValueError(f"unknown timestep_type {kind!r}")
    t = t.clamp(1e-4, 1.0 - 1e-4)
    return t.to(device), weights.to(device)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise, with t (B,) broadcast over the token dims."""
    tt = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1.0 - tt) * x0 + tt * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity the transformer predicts: d x_t / d t = noise - x0."""
    return noise - x0


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted MSE in fp32: per-sample mean over tokens and features, then weighted mean over the batch."""
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return (per_sample * weights.float()).mean()
