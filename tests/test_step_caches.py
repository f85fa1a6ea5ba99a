"""Per-bucket constants computed once (extensions/flux_kontext/rope_cache.py): the same id tensors per bucket, RoPE
tables reused per bucket, and outputs and gradients bit-identical to diffusers' uncached forward."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel

from extensions.flux_kontext.model import KontextDenoiser
from extensions.flux_kontext.rope_cache import CachedPosEmbed, IdTables
from extensions.flux_kontext import packing

CPU = torch.device("cpu")


def test_id_tables_give_the_same_tensor_per_bucket_and_the_right_ids():
    tables = IdTables(entries=2)
    a = tables.image_ids((4, 8), [(4, 8)], CPU)
    assert tables.image_ids((4, 8), [(4, 8)], "cpu") is a
    assert torch.equal(a, packing.kontext_position_ids((4, 8), (4, 8)))
    b = tables.image_ids((8, 4), [(4, 8)], CPU)  # same token count, other grid: other ids
    assert b is not a and torch.equal(b, packing.kontext_position_ids((8, 4), (4, 8)))
    txt = tables.text_ids(16, CPU, torch.float32)
    assert tables.text_ids(16, CPU, torch.float32) is txt and torch.equal(txt, torch.zeros(16, 3))
    assert tables.text_ids(16, CPU, torch.float64) is not txt
    tables.image_ids((2, 2), [(2, 2)], CPU)
    tables.image_ids((6, 6), [(6, 6)], CPU)  # bounded: the least recently used entry goes
    assert len(tables._img) == 2 and tables.image_ids((4, 8), [(4, 8)], CPU) is not a


@pytest.fixture(scope="module")
def transformer(tiny_model_dir):
    torch.manual_seed(0)
    return FluxTransformer2DModel.from_pretrained(tiny_model_dir / "transformer").eval()


def _inputs(transformer, tables: IdTables, target_hw, control_hw, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    n, m = target_hw[0] * target_hw[1] // 4, control_hw[0] * control_hw[1] // 4
    return {"hidden_states": torch.randn(1, n, cfg.in_channels, generator=g),
            "control_tokens": torch.randn(1, m, cfg.in_channels, generator=g),
            "encoder_hidden_states": torch.randn(1, 16, cfg.joint_attention_dim, generator=g),
            "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=g),
            "timestep": torch.tensor([0.4]), "guidance": torch.tensor([1.0]) if cfg.guidance_embeds else None,
            "img_ids": tables.image_ids(target_hw, [control_hw], CPU),
            "txt_ids": tables.text_ids(16, CPU, torch.float32)}


def _uncached(transformer, inputs: dict) -> torch.Tensor:
    """diffusers' own forward: pos_embed recomputed from the ids (no `ids` context active)."""
    n = inputs["hidden_states"].shape[1]
    out = transformer(hidden_states=torch.cat([inputs["hidden_states"], inputs["control_tokens"]], dim=1),
                      encoder_hidden_states=inputs["encoder_hidden_states"],
                      pooled_projections=inputs["pooled_projections"], timestep=inputs["timestep"],
                      guidance=inputs["guidance"], img_ids=inputs["img_ids"].clone(),
                      txt_ids=inputs["txt_ids"].clone(), return_dict=False)[0]
    return out[:, :n]


def test_rope_tables_are_computed_once_per_bucket_and_outputs_are_bit_identical(transformer):
    denoiser = KontextDenoiser(transformer)
    pos_embed = transformer.pos_embed
    assert isinstance(pos_embed, CachedPosEmbed)
    assert not any("inner" in k for k in transformer.state_dict())  # no parameters: keys unchanged
    tables = IdTables()
    # Two buckets with the same token count but transposed grids: a cache keyed by length would mix them up.
    buckets = [((4, 8), (4, 8)), ((8, 4), (8, 4)), ((4, 8), (4, 8)), ((8, 4), (8, 4))]
    with torch.no_grad():
        for i, (target_hw, control_hw) in enumerate(buckets):
            inputs = _inputs(transformer, tables, target_hw, control_hw, seed=i)
            assert torch.equal(denoiser(**inputs), _uncached(transformer, inputs))
    assert pos_embed.computed == 2


def test_cached_rope_gives_bit_identical_gradients(transformer):
    denoiser = KontextDenoiser(transformer)
    tables = IdTables()
    inputs = _inputs(transformer, tables, (4, 4), (4, 4), seed=3)
    inputs["hidden_states"].requires_grad_(True)
    grads = []
    for forward in (lambda: denoiser(**inputs), lambda: denoiser(**inputs), lambda: _uncached(transformer, inputs)):
        inputs["hidden_states"].grad = None
        forward().square().mean().backward()
        grads.append(inputs["hidden_states"].grad.clone())
    assert torch.equal(grads[0], grads[2]) and torch.equal(grads[1], grads[2])


def test_other_id_tensors_are_never_served_a_stale_table(transformer):
    """Fresh id tensors with other contents (not from IdTables) get their own tables, even if shaped alike."""
    denoiser = KontextDenoiser(transformer)
    tables = IdTables()
    inputs = _inputs(transformer, tables, (4, 4), (4, 4), seed=4)
    with torch.no_grad():
        denoiser(**inputs)
        shifted = dict(inputs, img_ids=inputs["img_ids"] + 1.0)
        assert torch.equal(denoiser(**shifted), _uncached(transformer, shifted))
