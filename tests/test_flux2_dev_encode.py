"""What FLUX.2 [dev]'s conditioning looks like on the tiny model, as the flux2 architecture must reproduce it:
prompt embeddings of joint_attention_dim (hidden states 10, 20, 30 of the Mistral text model, side by side), text
ids (0, 0, 0, token), and reference-image latents with time coordinate 10, 20, ... that the transformer takes."""

from __future__ import annotations

import pytest
import torch
from diffusers import Flux2Pipeline

SEQ = 32


@pytest.fixture(scope="module")
def pipe(tiny_flux2_dev_dir):
    return Flux2Pipeline.from_pretrained(tiny_flux2_dev_dir, dtype=torch.float32)


def test_prompt_embeds_have_the_transformers_joint_attention_dim(pipe):
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    with torch.no_grad():
        embeds, text_ids = pipe.encode_prompt(["make it red", "invert the colors of the image"], device="cpu",
                                              max_sequence_length=SEQ)
    assert embeds.shape == (2, SEQ, pipe.transformer.config.joint_attention_dim)
    assert not torch.equal(embeds[0], embeds[1])
    assert text_ids.shape == (2, SEQ, 4)
    assert torch.equal(text_ids[0], torch.stack([torch.zeros(SEQ), torch.zeros(SEQ), torch.zeros(SEQ),
                                                 torch.arange(SEQ)], dim=1).long())
    # The recipe by hand: chat template padded to SEQ, hidden states 10, 20, 30 concatenated per token.
    inputs = pipe.tokenizer.apply_chat_template(format_input(["make it red"], system_message=pipe.system_message),
                                                tokenize=True, return_dict=True, return_tensors="pt",
                                                padding="max_length", truncation=True, max_length=SEQ)
    with torch.no_grad():
        hidden = pipe.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                   output_hidden_states=True, use_cache=False).hidden_states
    torch.testing.assert_close(embeds[:1], torch.cat([hidden[10], hidden[20], hidden[30]], dim=-1))


def test_transformer_takes_prompt_target_and_two_reference_latents(pipe):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        embeds, text_ids = pipe.encode_prompt("make it red", device="cpu", max_sequence_length=SEQ)
        channels = pipe.transformer.config.in_channels
        latents, latent_ids = pipe.prepare_latents(1, channels // 4, 64, 64, torch.float32, "cpu", gen)
        images = [torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1, torch.rand(1, 3, 32, 64, generator=gen) * 2 - 1]
        refs, ref_ids = pipe.prepare_image_latents(images, 1, gen, "cpu", torch.float32)
        # 64 px -> 8x8 latent -> 4x4 tokens of 4 x 32 channels; the second reference 2x4 tokens.
        assert latents.shape == (1, 16, channels) and refs.shape == (1, 16 + 8, channels)
        assert latent_ids[0, :, 0].unique().tolist() == [0]
        assert ref_ids[0, :16, 0].unique().tolist() == [10] and ref_ids[0, 16:, 0].unique().tolist() == [20]
        out = pipe.transformer(hidden_states=torch.cat([latents, refs], dim=1), timestep=torch.tensor([0.5]),
                               guidance=torch.tensor([4.0]), encoder_hidden_states=embeds, txt_ids=text_ids,
                               img_ids=torch.cat([latent_ids, ref_ids], dim=1), return_dict=False)[0]
    assert out.shape == (1, 16 + 24, channels) and torch.isfinite(out).all()
