"""FLUX.2 training inputs equal what Flux2KleinPipeline gives its transformer, and our sampler equals the pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from extensions.flux2.conditioning import mask_weights, pack, position_ids, text_ids
from tests.qwen_helpers import batch_of, control_image
from toolkit.config.schema import ModelConfig
from toolkit.render.sampling import SampleRequest

MAX_LENGTH = 32


def load_flux2(folder, arch: str = "flux2_klein_4b", **overrides):
    from extensions import flux2  # importing it registers the architectures

    arch_cls = {c.name: c for c in (flux2.Flux2Klein, flux2.Flux2Klein9B, flux2.Flux2Dev)}[arch]
    cfg = ModelConfig(name_or_path=str(folder), arch=arch, **{"max_sequence_length": MAX_LENGTH, **overrides})
    return arch_cls.load(cfg, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def klein(tiny_flux2_dir):
    return load_flux2(tiny_flux2_dir)


def capture_transformer_call(pipe, **call):
    """The keyword arguments and output of the pipeline's first transformer call (two steps, seed 0)."""
    seen = {}

    def hook(module, args, kwargs, output):
        if not seen:
            seen.update(kwargs=kwargs, output=output[0])

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        pipe(num_inference_steps=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
             max_sequence_length=MAX_LENGTH, output_type="latent", **call)
    finally:
        handle.remove()
    return seen["kwargs"], seen["output"]


@pytest.mark.parametrize("n_controls", [0, 2])  # text-to-image, and several references
def test_denoiser_matches_the_pipeline(klein, n_controls) -> None:
    width, height, caption = 96, 64, "make it blue"
    controls = [control_image(width, height, seed=k) for k in range(n_controls)]
    seen, out = capture_transformer_call(klein.pipe, image=controls or None, prompt=caption, width=width,
                                         height=height)
    encoded = klein.encode_batch(batch_of([control_image(width, height, 9)], [controls], [caption]))
    n = encoded.x0.shape[1]
    assert encoded.references.shape[1] == n * n_controls
    # Dataset pixels are x / 127.5 - 1, the pipeline's (x / 255) * 2 - 1: equal up to float rounding.
    torch.testing.assert_close(encoded.references, seen["hidden_states"][:, n:], rtol=0, atol=1e-5)
    assert torch.equal(encoded.prompt_embeds, seen["encoder_hidden_states"])
    inputs = klein.denoiser_inputs(encoded, seen["hidden_states"][:, :n], seen["timestep"], guidance=1.0)
    assert torch.equal(inputs["img_ids"], seen["img_ids"][0])  # time offsets 0, 10, 20 ... as the pipeline's
    assert torch.equal(inputs["txt_ids"], seen["txt_ids"][0])
    assert inputs["guidance"] is None and seen["guidance"] is None  # [klein]: no guidance embedding
    assert torch.equal(inputs["timestep"], seen["timestep"])
    inputs["reference_tokens"] = seen["hidden_states"][:, n:]
    with torch.no_grad():
        pred = klein.denoiser()(**inputs)
    assert torch.equal(pred, out[:, :n])


def test_position_ids_offset_each_reference_in_time() -> None:
    ids = position_ids((2, 3), [(2, 3), (1, 2)], torch.device("cpu"))
    assert ids.shape == (6 + 6 + 2, 4)
    assert ids[:6, 0].eq(0).all() and ids[6:12, 0].eq(10).all() and ids[12:, 0].eq(20).all()
    assert ids[12:, 1:].tolist() == [[0, 0, 0], [0, 1, 0]]
    assert text_ids(3, torch.device("cpu"))[:, 3].tolist() == [0, 1, 2]


def test_mask_weights_follow_the_patchified_latent_layout() -> None:
    """A mask covering the left half of the image weights exactly the left half of every token's 2x2 patch."""
    masks = torch.zeros(1, 1, 32, 64)
    masks[..., :, :32] = 1  # target 32 x 64 px -> latent 4 x 8 -> tokens 2 x 4
    weights = mask_weights(masks, (2, 4), 128)
    assert weights.shape == (1, 8, 128)
    latent = torch.zeros(1, 32, 4, 8)
    latent[..., :4] = 1
    from diffusers import Flux2KleinPipeline
    expected = pack(Flux2KleinPipeline._patchify_latents(latent))
    assert torch.equal(weights > 0, expected > 0)


def test_sample_equals_the_pipeline(klein) -> None:
    """Two references and [klein]'s true CFG against the empty prompt."""
    guidance = 3.0
    controls = [control_image(64, 64, seed=k) for k in range(2)]
    request = SampleRequest(index=0, prompt="make it red", ctrl_img=None, seed=7, width=64, height=64,
                            guidance_scale=guidance, steps=2)
    ours = klein.sample([request], [controls])[0]
    theirs = klein.pipe(image=controls, prompt="make it red", width=64, height=64, num_inference_steps=2,
                        guidance_scale=guidance, generator=torch.Generator().manual_seed(7),
                        max_sequence_length=MAX_LENGTH).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_stop_ends_sampling_early(klein) -> None:
    calls = []
    request = SampleRequest(index=0, prompt="x", ctrl_img=None, seed=0, width=64, height=64, guidance_scale=1.0,
                            steps=4)
    hook = klein.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        klein.sample([request], [[]], stop=lambda: True)
    finally:
        hook.remove()
    assert len(calls) == 1  # of 4 steps



def test_a_control_under_64_px_is_scaled_up_instead_of_failing(klein) -> None:
    """The pipeline refuses references with a side under 64 px; a 4:3 control at a 64x64 sample's area is 74x55."""
    request = SampleRequest(index=0, prompt="x", ctrl_img=None, seed=0, width=64, height=64, guidance_scale=1.0,
                            steps=1)
    with pytest.raises(ValueError, match="too small"):
        klein.pipe(image=[control_image(74, 55, 1)], prompt="x", width=64, height=64, num_inference_steps=1)
    assert klein.sample([request], [[control_image(74, 55, 1)]])[0].size == (64, 64)
