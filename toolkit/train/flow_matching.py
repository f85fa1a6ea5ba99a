"""Rectified-flow (flow-matching) objective as pure tensor functions, for any latent denoiser.

Shapes: B batch, N tokens (or any trailing dims) of the clean latents x0.

    t       ~ timestep distribution in (0, 1)            (B,)
    x_t     = (1 - t) x0 + t noise                       (B, N, D)
    target  = noise - x0                                 (B, N, D)   the velocity d x_t / d t
    loss    = mean_b w_b * mean(m * (pred - target)^2)   w: timestep x dataset weight, m: loss mask (or 1)

How the architecture turns x_t into a prediction (packing, position ids, conditioning tokens) lives in its
extensions/<arch>/ package; the train step (jobs/process/BaseSDTrainProcess.py: compute_loss) calls these.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch

TimestepType = Literal["sigmoid", "linear", "weighted", "shift"]

# Integral of exp(-2 (t - 0.5)^2) over [0, 1]: normalises the "weighted" loss weights to mean 1.
_BELL_MEAN = math.sqrt(math.pi / 2.0) * math.erf(math.sqrt(2.0) * 0.5)


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


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                       element_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weighted MSE in fp32: per-sample mean over tokens and features, then weighted mean over the batch.
    `element_weights` (shaped as pred, e.g. a loss mask in the token layout) weigh each squared error first."""
    squared = (pred.float() - target.float()).pow(2)
    if element_weights is not None:
        squared = squared * element_weights.float()
    per_sample = squared.flatten(1).mean(dim=1)
    return (per_sample * weights.float()).mean()


def inputs_and_target(model, encoded, noise: torch.Tensor, t: torch.Tensor, guidance: float
                      ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Denoiser inputs at x_t and the flow-matching target for a given `noise` and `t`, for an Architecture
    (toolkit.arch) and one of its encoded batches: the objective of the train step for callers that fix noise and t
    (validation, benchmarks, tests)."""
    x0 = model.clean_latents(encoded)
    noise = noise.to(x0.device, x0.dtype)
    inputs = model.denoiser_inputs(encoded, noisy_latents(x0, noise, t.to(x0.device)), t, guidance)
    return inputs, flow_target(x0, noise)
