"""Build a random-weight FLUX.2 [klein] pipeline folder offline, byte-identically on every rebuild.

Every component is made from config: a tiny Flux2Transformer2DModel (no guidance embedding, as [klein] base),
AutoencoderKLFlux2, Qwen3ForCausalLM, a Qwen2 byte-level BPE learned here from the shared corpus with a short chat
template, and the scheduler configured as the real FLUX.2 folders'.

Choices that keep the tiny model faithful to the real one:
- The pipeline stacks the text encoder's hidden states 9, 18 and 27 (`text_encoder_out_layers`); the tiny Qwen3 has
  28 layers so those are intermediate layers, as in the 36-layer Qwen3-4B / 8B, and joint_attention_dim is three
  times its hidden size.
- The chat template renders what Qwen3's does for one user message with `enable_thinking=False`
  (`<|im_start|>user ... <|im_end|>` then the assistant turn with an empty think block).
- The VAE's batch-norm running statistics (the latent normalisation the pipeline applies) are random, not the 0 / 1
  of a fresh BatchNorm, so a forgotten (de)normalisation shows in the tests.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from toolkit.errors import UserError
from tools.tiny_common import QWEN_SPLIT, byte_level_words, corpus_lines, install_atomically, learn_bpe_merges

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MARKER_NAME = "tiny_model_build.json"
ARCHS = ("flux2_klein",)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
# Qwen3 with enable_thinking=False, for the conversations the pipeline builds (one user message).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)

TEXT_HIDDEN = 16
SHAPES: dict[str, dict[str, Any]] = {
    # head_dim 16 = sum(axes_dims_rope) over the 4 position axes (t, h, w, l); 128 input channels = 32 latent
    # channels patchified 2x2, as in the real model.
    "transformer": {"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16,
                    "joint_attention_dim": 3 * TEXT_HIDDEN, "timestep_guidance_channels": 32,
                    "axes_dims_rope": (4, 4, 4, 4)},
    # Four blocks keep the real VAE's scale factor 8; 32 latent channels as the real one.
    "vae": {"block_out_channels": (8, 8, 8, 8), "layers_per_block": 1, "norm_num_groups": 4, "latent_channels": 32},
    "text": {"hidden_size": TEXT_HIDDEN, "intermediate_size": 32, "num_hidden_layers": 28, "num_attention_heads": 2,
             "num_key_value_heads": 1, "head_dim": 8},
}
# What the real FLUX.2 folders ship in scheduler/scheduler_config.json.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
    "base_image_seq_len": 256, "max_image_seq_len": 4096, "time_shift_type": "exponential",
}


def _pretokens() -> Counter[tuple[str, ...]]:
    """Corpus + chat-template words split as Qwen2Tokenizer splits them, as byte-level symbol tuples."""
    return byte_level_words(corpus_lines() + ["user\n", "user\n", "assistant\n", "assistant\n", "\n\n", "\n\n"],
                            QWEN_SPLIT)



def build_tokenizer() -> Any:
    """A Qwen2Tokenizer: the 256 byte symbols, the learned merges, the special tokens and the chat template."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    merges = learn_bpe_merges(_pretokens(), 2000)
    vocab: dict[str, int] = {}
    for token in sorted(pre_tokenizers.ByteLevel.alphabet()) + [a + b for a, b in merges]:
        vocab.setdefault(token, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768, errors="replace",
                               pad_token="<|endoftext|>", eos_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _text_encoder(tokenizer: Any) -> Any:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=len(tokenizer), max_position_embeddings=4096, rms_norm_eps=1e-6,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True, **SHAPES["text"])
    return Qwen3ForCausalLM(config)


def _vae() -> Any:
    import torch
    from diffusers import AutoencoderKLFlux2

    shape = SHAPES["vae"]
    vae = AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                             **shape)
    with torch.no_grad():  # random latent statistics (drawn under the caller's seed)
        vae.bn.running_mean.copy_(torch.randn_like(vae.bn.running_mean) * 0.5)
        vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) + 0.5)
    return vae


def build_components(seed: int, guidance_embeds: bool = False) -> dict[str, Any]:
    """The transformer, VAE and scheduler (shared with the [dev] builder); each random module gets its own seed."""
    import torch
    from diffusers import Flux2Transformer2DModel, FlowMatchEulerDiscreteScheduler

    def seeded(offset: int, make: Callable[[], Any]) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + offset)
            return make().eval()

    return {
        "transformer": seeded(1, lambda: Flux2Transformer2DModel(patch_size=1, in_channels=128,
                                                                 guidance_embeds=guidance_embeds,
                                                                 **SHAPES["transformer"])),
        "vae": seeded(2, _vae),
        "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
    }


def _write_pipeline(workdir: Path, seed: int) -> None:
    import torch
    from diffusers import Flux2KleinPipeline

    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + 3)
        text_encoder = _text_encoder(tokenizer).eval()
    pipe = Flux2KleinPipeline(text_encoder=text_encoder, tokenizer=tokenizer, is_distilled=False,
                              **build_components(seed))
    pipe.save_pretrained(workdir, safe_serialization=True)
    index_path = workdir / "model_index.json"  # stable key order: rebuilds are byte-identical
    index = json.loads(index_path.read_text(encoding="utf-8"))
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_tiny_flux2_pipeline(out_dir: str | Path, arch: str = "flux2_klein", seed: int = 0,
                              overwrite: bool = False) -> Path:
    """Build (or reuse) a random-weight FLUX.2 [klein] folder; returns its absolute path."""
    if arch not in ARCHS:
        raise UserError(f"unknown FLUX.2 arch {arch!r}; choose one of {list(ARCHS)}")
    marker = {"format_version": FORMAT_VERSION, "arch": arch, "seed": seed}
    return install_atomically(out_dir, MARKER_NAME, marker, overwrite, lambda tmp: _write_pipeline(tmp, seed))
