"""Rectified-flow (flow-matching) objective as pure tensor functions, for any latent denoiser.

Shapes: B batch, N tokens (or any trailing dims) of the clean latents x0.

    t       ~ timestep distribution in (0, 1)            (B,)
    x_t     = (1 - t) x0 + t noise                       (B, N, D)
    target  = noise - x0                                 (B, N, D)   the velocity d x_t / d t
    loss    = mean_b w_b * mean(m * rho(pred - target))  w: timestep x dataset weight, m: loss mask (or 1),
                                                         rho: squared error (mse), |.| (mae), pseudo-Huber

How the architecture turns x_t into a prediction (packing, position ids, conditioning tokens) lives in its
extensions/<arch>/ package; the train step (jobs/process/BaseSDTrainProcess.py: compute_loss) calls these.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch

from toolkit.train import timesteps as timestep_tables

TimestepType = Literal["sigmoid", "linear", "weighted", "shift", "flux_shift", "lognorm_blend"]
LossType = Literal["mse", "mae", "pseudo_huber"]

# ai-toolkit's fixed pseudo-Huber width: quadratic for |error| << 0.01, linear beyond.
PSEUDO_HUBER_C = 0.01

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
                     device=None, content_or_style: timestep_tables.ContentOrStyle = "balanced"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw flow-matching times t in (0,1) and per-sample loss weights (mean 1), both (B,) fp32.

    sigmoid:  t = sigmoid(N(0,1)), concentrates on mid noise levels (SD3 / FLUX fine-tuning default).
    linear:   t ~ U(0,1).
    shift:    U(0,1) shifted by FLUX's resolution-dependent mu, the schedule the sampler uses.
    weighted: t ~ U(0,1) with a bell-shaped loss weight exp(-2 (t - 0.5)^2) (ai-toolkit's "weighted").
    flux_shift, lognorm_blend, and any kind with content_or_style content/style: ai-toolkit's table of 1000 times
    and index rule (toolkit.train.timesteps), t in [0, 1] unclamped as there.
    """
    dev = generator.device
    weights = torch.ones(batch, device=dev)
    if kind in timestep_tables.TABLE_KINDS or content_or_style != "balanced":
        t = timestep_tables.draw(kind, content_or_style, batch, generator, resolution_shift_mu(image_seq_len))
        if kind == "weighted":
            weights = torch.exp(-2.0 * (t - 0.5) ** 2) / _BELL_MEAN
        return t.to(device), weights.to(device)
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


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: LossType = "mse") -> torch.Tensor:
    """Per-element error in fp32, as ai-toolkit's train.loss_type: mse (pred - target)^2, mae |pred - target|,
    pseudo_huber sqrt((pred - target)^2 + c^2) - c with c = 0.01."""
    diff = pred.float() - target.float()
    if loss_type == "mse":
        return diff.pow(2)
    if loss_type == "mae":
        return diff.abs()
    if loss_type == "pseudo_huber":
        return torch.sqrt(diff.pow(2) + PSEUDO_HUBER_C ** 2) - PSEUDO_HUBER_C
    raise ValueError(f"unknown loss_type {loss_type!r}")


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                       loss_type: LossType = "mse", element_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weighted loss in fp32: per-sample mean of the element loss over tokens and features, then weighted mean over
    the batch (ai-toolkit's order: element loss, timestep weight, mean per sample, mean over the batch).
    `element_weights` (shaped as pred, e.g. a loss mask in the token layout) weigh each element's loss first."""
    losses = elementwise_loss(pred, target, loss_type)
    if element_weights is not None:
        losses = losses * element_weights.float()
    per_sample = losses.flatten(1).mean(dim=1)
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
