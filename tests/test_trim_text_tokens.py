"""model.trim_text_tokens: a batch's T5 sequence cut after its longest caption, and what that changes."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel

from extensions.flux_kontext.model import FluxKontext
from extensions.flux_kontext.packing import kontext_position_ids
from tests.helpers import merge, tiny_config_dict
from toolkit.config.loader import load_job_dict
from toolkit.config.schema import ModelConfig
from toolkit.errors import UserError

LONG = " ".join(["invert the colors of the zebra and the xylophone"] * 12)


def test_text_is_cut_after_the_longest_caption_rounded_up_to_64(tiny_model_dir):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), arch="flux_kontext", max_sequence_length=128)
    model = FluxKontext.load(cfg, torch.device("cpu"), torch.float32)

    def encoded(trim: bool, captions: list[str]):
        model.trim_text_tokens = trim
        pixels = torch.zeros(len(captions), 3, 32, 32)
        return model.encode_batch({"target": pixels, "control": pixels, "caption": captions})

    full, cut = encoded(False, ["invert", "make it red"]), encoded(True, ["invert", "make it red"])
    assert full.prompt_embeds.shape[1] == 128 and cut.prompt_embeds.shape[1] == 64 and cut.text_ids.shape[0] == 64
    assert torch.equal(cut.prompt_embeds, full.prompt_embeds[:, :64])  # encoded at full length, then cut
    assert encoded(True, ["invert", LONG]).prompt_embeds.shape[1] == 128  # over 64 tokens: all 128 kept


def test_cut_equals_masking_the_padding_which_flux_attends_to_without_a_mask(tiny_model_dir):
    transformer = FluxTransformer2DModel.from_pretrained(tiny_model_dir / "transformer").eval()
    generator = torch.Generator().manual_seed(0)
    text = torch.randn(1, 128, transformer.config.joint_attention_dim, generator=generator)
    inputs = {"hidden_states": torch.randn(1, 32, 64, generator=generator),
              "pooled_projections": torch.randn(1, transformer.config.pooled_projection_dim, generator=generator),
              "timestep": torch.tensor([0.5]), "guidance": torch.tensor([1.0]),
              "img_ids": kontext_position_ids((8, 8), (8, 8)), "return_dict": False}
    ids = torch.zeros(128, 3)
    keep = torch.ones(1, 1, 1, 128 + 32, dtype=torch.bool)  # joint sequence [text ; image]
    keep[..., 64:128] = False
    with torch.no_grad():
        cut = transformer(encoder_hidden_states=text[:, :64], txt_ids=ids[:64], **inputs)[0]
        masked = transformer(encoder_hidden_states=text, txt_ids=ids, joint_attention_kwargs={"attention_mask": keep},
                             **inputs)[0]
        unmasked = transformer(encoder_hidden_states=text, txt_ids=ids, **inputs)[0]
    torch.testing.assert_close(cut, masked, rtol=1e-5, atol=1e-5)
    assert (cut - unmasked).abs().max() > 1e-3  # the padding tokens do change the prediction without a mask


def test_refused_with_preservation_and_for_other_architectures(tmp_path):
    base = tiny_config_dict(tmp_path / "out", tmp_path / "model", tmp_path / "data")
    with pytest.raises(UserError, match="trim_text_tokens: cannot be combined with train.diff_output_preservation"):
        load_job_dict(merge(base, {"model.trim_text_tokens": True, "train.diff_output_preservation": True}), "t")
    from jobs.extensions import load_extensions
    from toolkit.arch import get_architecture

    load_extensions()
    cfg = ModelConfig(name_or_path="x", arch="qwen_image_edit_plus", trim_text_tokens=True)
    assert get_architecture("qwen_image_edit_plus").check_model_options(cfg) == [
        "model.trim_text_tokens: not implemented for qwen_image_edit_plus; remove the option"]
