"""The pure Kontext math agrees with diffusers' pipeline and with the flow-matching definitions."""

import math

import pytest
import torch
from diffusers import FluxKontextPipeline

from extensions.flux_kontext import packing
from toolkit.train import flow_matching


def test_pack_matches_diffusers_and_round_trips():
    lat = torch.randn(2, 16, 6, 10)
    packed = packing.pack_latents(lat)
    assert packed.shape == (2, 15, 64)
    ref = FluxKontextPipeline._pack_latents(lat, 2, 16, 6, 10)
    assert torch.equal(packed, ref)
    assert torch.equal(packing.unpack_latents(packed, 6, 10), lat)


def test_pack_rejects_odd_grid():
    with pytest.raises(ValueError):
        packing.pack_latents(torch.zeros(1, 16, 5, 4))


def test_position_ids_match_pipeline_target_and_control():
    ref = FluxKontextPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32)
    assert torch.equal(packing.position_ids(6, 10, frame=0), ref)
    ctrl = packing.position_ids(4, 4, frame=1)
    assert torch.all(ctrl[:, 0] == 1) and ctrl.shape == (4, 3)
    joint = packing.kontext_position_ids((6, 10), (4, 4))
    assert joint.shape == (15 + 4, 3)
    assert torch.all(joint[:15, 0] == 0) and torch.all(joint[15:, 0] == 1)


def test_noisy_latents_endpoints_and_target():
    x0, noise = torch.randn(3, 4, 64), torch.randn(3, 4, 64)
    t = torch.tensor([0.0, 0.5, 1.0])
    xt = flow_matching.noisy_latents(x0, noise, t)
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[2], noise[2])
    assert torch.allclose(xt[1], 0.5 * (x0[1] + noise[1]))
    # x_t moves along the target velocity: d/dt x_t = noise - x0
    dt = 1e-3
    velocity = (flow_matching.noisy_latents(x0, noise, t + dt) - xt) / dt
    assert torch.allclose(velocity, flow_matching.flow_target(x0, noise), atol=1e-3)


@pytest.mark.parametrize("kind", ["sigmoid", "linear", "weighted", "shift"])
def test_timesteps_in_range_and_deterministic(kind):
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    t1, w1 = flow_matching.sample_timesteps(kind, 4096, g1, image_seq_len=1024)
    t2, w2 = flow_matching.sample_timesteps(kind, 4096, g2, image_seq_len=1024)
    assert torch.equal(t1, t2) and torch.equal(w1, w2)
    assert t1.min() > 0 and t1.max() < 1 and t1.shape == (4096,)
    assert abs(w1.mean().item() - 1.0) < 0.02


def test_timestep_distributions_differ_as_documented():
    g = torch.Generator().manual_seed(0)
    sig, _ = flow_matching.sample_timesteps("sigmoid", 20000, g, 256)
    lin, _ = flow_matching.sample_timesteps("linear", 20000, g, 256)
    shifted, _ = flow_matching.sample_timesteps("shift", 20000, g, 4096)
    _, weights = flow_matching.sample_timesteps("weighted", 20000, g, 256)
    assert sig.std() < lin.std()  # sigmoid concentrates mid-range
    assert shifted.mean() > lin.mean() + 0.1  # large images are shifted towards noise
    assert weights.max() > 1.0 > weights.min()


def test_shift_mu_matches_diffusers():
    from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift

    for n in (256, 1024, 4096):
        assert math.isclose(flow_matching.resolution_shift_mu(n), calculate_shift(n, 256, 4096, 0.5, 1.15))


def test_loss_weights_and_value():
    pred, target = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    target[1] *= 2
    assert flow_matching.flow_matching_loss(pred, target, torch.ones(2)).item() == pytest.approx(2.5)
    assert flow_matching.flow_matching_loss(pred, target, torch.tensor([2.0, 0.0])).item() == pytest.approx(1.0)
