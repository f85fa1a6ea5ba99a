"""The tiny FLUX.2 [klein] folder: Qwen3's chat format with thinking off, intermediate hidden-state taps, non-trivial
latent statistics, and a byte-identical rebuild from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.test_tiny_model import tree_digest
from tools import tiny_model


def test_prompt_format_and_text_encoder_match_what_the_pipeline_reads(tiny_flux2_dir: Path) -> None:
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(tiny_flux2_dir, dtype=torch.float32)
    text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": "make it red"}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=False)
    assert text == "<|im_start|>user\nmake it red<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert len(pipe.tokenizer("<|im_start|><think>").input_ids) == 2  # special tokens are single ids
    # hidden states 9, 18, 27 are intermediate layers, side by side: the transformer's joint_attention_dim
    assert pipe.text_encoder.config.num_hidden_layers > 27
    assert 3 * pipe.text_encoder.config.hidden_size == pipe.transformer.config.joint_attention_dim
    assert not pipe.transformer.config.guidance_embeds and not pipe.config.is_distilled
    assert not torch.allclose(pipe.vae.bn.running_var, torch.ones_like(pipe.vae.bn.running_var))


def test_cli_rebuild_is_byte_identical(tmp_path: Path, tiny_flux2_dir: Path) -> None:
    tiny_model.main(["--arch", "flux2_klein", "--out", str(tmp_path / "again")])
    assert tree_digest(tmp_path / "again") == tree_digest(tiny_flux2_dir)
    marker = json.loads((tmp_path / "again" / "tiny_model_build.json").read_text())
    assert marker["arch"] == "flux2_klein"
