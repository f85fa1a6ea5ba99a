"""Qwen-Image-Edit-Plus training inputs equal what QwenImageEditPlusPipeline gives its transformer."""

from __future__ import annotations

import pytest
import torch
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as upstream

from extensions.qwen_image_edit import conditioning, model as qwen_model
from extensions.qwen_image_edit.packing import (denormalize_latents, img_shapes, normalize_latents, pack_latents,
                                                unpack_latents)
from tests.qwen_helpers import batch_of, control_image, load_qwen

# The pipeline encodes every reference at about 1024x1024 px, 10 s per image for the tiny VAE on a CPU; the
# module constant is read at call time, so these tests shrink it on both sides (one test keeps the real one).
SMALL_AREA = 128 * 128


@pytest.fixture(scope="module")
def qwen(tiny_qwen_dir):
    return load_qwen(tiny_qwen_dir)


def small_reference_area(monkeypatch):
    monkeypatch.setattr(upstream, "VAE_IMAGE_SIZE", SMALL_AREA)
    monkeypatch.setattr(qwen_model, "VAE_IMAGE_SIZE", SMALL_AREA)


def test_pack_and_unpack_match_the_pipeline() -> None:
    latents = torch.randn(2, 16, 6, 8)
    packed = pack_latents(latents)
    assert torch.equal(packed, upstream.QwenImageEditPlusPipeline._pack_latents(latents, 2, 16, 6, 8))
    assert torch.equal(unpack_latents(packed, (6, 8)), latents)
    theirs = upstream.QwenImageEditPlusPipeline._unpack_latents(packed, 48, 64, 8)
    assert torch.equal(unpack_latents(packed, (6, 8)).unsqueeze(2), theirs)


def test_normalisation_matches_the_pipeline(qwen) -> None:
    pipe = qwen.pipe
    pixels = torch.rand(1, 3, 1, 32, 32) * 2 - 1
    theirs = pipe._encode_vae_image(pixels, generator=None)
    ours = conditioning.encode_pixels(pipe.vae, pixels[:, :, 0])
    assert torch.equal(ours, theirs[:, :, 0])
    mean, std = pipe.vae.config.latents_mean, pipe.vae.config.latents_std
    assert torch.allclose(denormalize_latents(normalize_latents(theirs, mean, std), mean, std), theirs, atol=1e-5)


def test_img_shapes_list_target_then_each_reference() -> None:
    assert img_shapes((6, 8), [(4, 4), (8, 6)], 2) == [[(1, 3, 4), (1, 2, 2), (1, 4, 3)]] * 2


def capture_transformer_call(pipe, **call):
    """Run the pipeline (two steps, seed 0) and return the keyword arguments and output of its first transformer
    call, and the pipeline's result (with one step the scheduler's shift_terminal stretch divides 0 by 0 upstream)."""
    seen = {}

    def hook(module, args, kwargs, output):
        if not seen:
            seen.update(kwargs=kwargs, output=output[0])

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        result = pipe(num_inference_steps=2, true_cfg_scale=1.0, generator=torch.Generator().manual_seed(0), **call)
    finally:
        handle.remove()
    return seen["kwargs"], seen["output"], result


def assert_denoiser_matches_pipeline(qwen, controls, target_size=(64, 48), caption="make it blue") -> None:
    width, height = target_size
    seen, out, _ = capture_transformer_call(qwen.pipe, image=controls, prompt=caption, width=width, height=height)
    target = control_image(width, height, seed=9)  # the target's pixels only set x0, which the pipeline never sees
    encoded = qwen.encode_batch(batch_of([target], [controls], [caption]))
    n = encoded.x0.shape[1]
    x_t = seen["hidden_states"][:, :n]
    assert torch.equal(encoded.references, seen["hidden_states"][:, n:])
    assert torch.equal(encoded.prompt_embeds, seen["encoder_hidden_states"])
    inputs = qwen.denoiser_inputs(encoded, x_t, seen["timestep"], guidance=1.0)
    assert inputs["img_shapes"] == seen["img_shapes"]
    assert torch.equal(inputs["timestep"], seen["timestep"])  # sigma in [0, 1]: scheduler timestep / 1000
    with torch.no_grad():
        pred = qwen.denoiser()(**inputs)
    # Ours passes an all-ones mask where the pipeline passes None: the same attention, up to summation order.
    torch.testing.assert_close(pred, out[:, :n], rtol=0, atol=1e-6)


def test_denoiser_matches_pipeline_two_controls(qwen, monkeypatch) -> None:
    small_reference_area(monkeypatch)
    assert_denoiser_matches_pipeline(qwen, [control_image(64, 48, 1), control_image(48, 64, 2)])


def test_denoiser_matches_pipeline_at_the_real_reference_size(qwen) -> None:
    assert_denoiser_matches_pipeline(qwen, [control_image(64, 48, 1)])


def test_match_target_res_encodes_references_at_the_target_size(tiny_qwen_dir) -> None:
    qwen = load_qwen(tiny_qwen_dir, match_target_res=True)
    controls = [control_image(64, 64, 1)]
    encoded = qwen.encode_batch(batch_of([control_image(64, 64, 2)], [controls], ["x"]))
    assert encoded.reference_hws == [encoded.target_hw] == [(8, 8)]


def test_batch_prompts_are_padded_with_a_mask(qwen, monkeypatch) -> None:
    small_reference_area(monkeypatch)
    controls = [[control_image(32, 32, 1)], [control_image(32, 32, 2)]]
    targets = [control_image(32, 32, 3)] * 2
    encoded = qwen.encode_batch(batch_of(targets, controls, ["red", "make the whole picture a deep ocean blue"]))
    lengths = encoded.prompt_mask.sum(dim=1)
    assert lengths[0] < lengths[1] == encoded.prompt_embeds.shape[1]
    assert torch.all(encoded.prompt_embeds[0, lengths[0]:] == 0)
    alone = qwen.encode_batch(batch_of(targets[:1], controls[:1], ["red"]))
    assert torch.equal(alone.prompt_embeds[0], encoded.prompt_embeds[0, :lengths[0]])


def test_every_default_lora_layer_gets_a_gradient(tiny_qwen_dir) -> None:
    """The last block's text-stream output feeds nothing: LoRA there would never train and DDP would stop on it."""
    import re

    from extensions.qwen_image_edit.model import LORA_TARGETS
    from toolkit.adapters.lora import add_lora, make_lora_config

    def grads(targets) -> dict[str, bool]:
        qwen = load_qwen(tiny_qwen_dir, match_target_res=True)
        params = add_lora(qwen.transformer, make_lora_config(4, 4, targets))
        encoded = qwen.encode_batch(batch_of([control_image(32, 32, 1)], [[control_image(32, 32, 2)]], ["x"]))
        x_t = torch.randn_like(encoded.x0)
        qwen.denoiser()(**qwen.denoiser_inputs(encoded, x_t, torch.tensor([0.5]), 1.0)).square().mean().backward()
        names = {id(p): n for n, p in qwen.transformer.named_parameters()}
        return {names[id(p)]: p.grad is not None for p in params if ".lora_B." in names[id(p)]}

    qwen = load_qwen(tiny_qwen_dir, match_target_res=True)
    assert qwen.lora_targets() != LORA_TARGETS
    assert re.fullmatch(qwen.lora_targets(), "transformer_blocks.0.txt_mlp.net.2")
    assert not re.fullmatch(qwen.lora_targets(), "transformer_blocks.1.txt_mlp.net.2")
    ours = grads(qwen.lora_targets())
    assert ours and all(ours.values())
    everything = grads(LORA_TARGETS)
    assert sorted(n for n, has in everything.items() if not has) == [
        "transformer_blocks.1.attn.to_add_out.lora_B.default.weight",
        "transformer_blocks.1.txt_mlp.net.0.proj.lora_B.default.weight",
        "transformer_blocks.1.txt_mlp.net.2.lora_B.default.weight"]
