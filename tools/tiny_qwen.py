"""Build a random-weight Qwen-Image-Edit(-Plus) pipeline folder offline, byte-identically on every rebuild.

Every component is made from config: a tiny QwenImageTransformer2DModel, AutoencoderKLQwenImage and
Qwen2_5_VLForConditionalGeneration (text + vision tower), a Qwen2 byte-level BPE learned here from a small corpus, a
Qwen2VLProcessor around the PIL image processor (torchvision does not import beside our CPU torch), and the
scheduler configured as the real Qwen-Image-Edit-2509 folder's.

Choices that keep the tiny model faithful to the real one:
- The pipeline drops the first 64 hidden states (`prompt_template_encode_start_idx`): the system prompt of its
  template is 64 tokens in the real tokenizer. Our BPE learns every word of the template (it repeats in the corpus),
  so the template splits into the same 64 pre-tokens and the drop removes exactly the system prompt here too.
- The special tokens are the real ones (`<|im_start|>`, `<|vision_start|>`, `<|image_pad|>` ...), and the text
  encoder's config carries their ids, so the processor's expanded image tokens reach the vision tower.
- variant 2511 sets `zero_cond_t` (Qwen-Image-Edit-2511's transformer: reference tokens get timestep 0).
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
VARIANTS = ("2509", "2511")

# The system part of the prompt template; QwenImageEditPipeline and QwenImageEditPlusPipeline use the same one.
SYSTEM_PROMPT = (
    "Describe the key features of the input image (color, shape, size, texture, objects, background), then explain "
    "how the user's text instruction should alter or modify the image. Generate a new image that meets the user's "
    "requirements while maintaining consistency with the original input where appropriate."
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")

SHAPES: dict[str, dict[str, Any]] = {
    # head_dim 16 = sum(axes_dims_rope); joint_attention_dim = the text encoder's hidden size.
    "transformer": {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "joint_attention_dim": 32,
                    "axes_dims_rope": (4, 6, 6)},
    # Four stages keep the real VAE's spatial factor 8 (three downsamplings) and 16 latent channels.
    "vae": {"base_dim": 8, "z_dim": 16, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1},
    "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 1},
    # out_hidden_size must equal the text hidden size; window 112 px = 8 patches of 14 as in the real tower.
    "vision": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 32,
               "fullatt_block_indexes": (1,), "window_size": 112},
}
# What the real Qwen-Image(-Edit) folders ship in scheduler/scheduler_config.json.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9,
    "base_image_seq_len": 256, "max_image_seq_len": 8192, "shift_terminal": 0.02, "time_shift_type": "exponential",
}


def _pretokens() -> Counter[tuple[str, ...]]:
    """Corpus + template words split as Qwen2Tokenizer splits them, as byte-level symbol tuples."""
    # The templates twice: every word of them occurs at least twice, so the merge loop learns each one whole.
    return byte_level_words(corpus_lines() + [SYSTEM_PROMPT, SYSTEM_PROMPT,
                                              "system\n", "system\n", "user\n", "user\n", "assistant\n",
                                              "assistant\n", "Picture 1: Picture 2: Picture 3: "], QWEN_SPLIT)



def learn_merges(max_merges: int = 2000) -> list[tuple[str, str]]:
    """Deterministic BPE merges of the Qwen corpus (tools.tiny_common.learn_bpe_merges)."""
    return learn_bpe_merges(_pretokens(), max_merges)


def build_tokenizer() -> Any:
    """A Qwen2Tokenizer: the 256 byte symbols, the learned merges, then the special tokens."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    merges = learn_merges()
    vocab: dict[str, int] = {}
    for token in sorted(pre_tokenizers.ByteLevel.alphabet()) + [a + b for a, b in merges]:
        vocab.setdefault(token, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768, errors="replace")
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    return tokenizer


def _text_encoder_config(tokenizer: Any) -> Any:
    from transformers import Qwen2_5_VLConfig

    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = SHAPES["text"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    # mrope splits half the head dim into (temporal, height, width) sections, as (16, 24, 24) of 64 in the real one.
    section = [head_dim // 8, head_dim * 3 // 16, head_dim // 2 - head_dim // 8 - head_dim * 3 // 16]
    text_config = dict(text, vocab_size=len(tokenizer), max_position_embeddings=4096, rms_norm_eps=1e-6,
                       bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                       eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                       pad_token_id=tokenizer.pad_token_id,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section})
    return Qwen2_5_VLConfig(text_config=text_config, vision_config=dict(SHAPES["vision"]), **ids)


def _build_components(variant: str, seed: int) -> dict[str, Any]:
    """Every pipeline component; each random module gets its own seed so one shape change leaves the others alone."""
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    from extensions.qwen_image_edit.processor import images_only_processor

    def seeded(offset: int, make: Callable[[], Any]) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + offset)
            return make().eval()

    tokenizer = build_tokenizer()
    processor = images_only_processor(tokenizer)
    return {
        "transformer": seeded(1, lambda: QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, guidance_embeds=False, zero_cond_t=variant == "2511",
            **SHAPES["transformer"])),
        "vae": seeded(2, lambda: AutoencoderKLQwenImage(temperal_downsample=[False, True, True], **SHAPES["vae"])),
        "text_encoder": seeded(3, lambda: Qwen2_5_VLForConditionalGeneration(_text_encoder_config(tokenizer))),
        "tokenizer": tokenizer,
        "processor": processor,
        "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
    }


def _write_pipeline(workdir: Path, arch: str, variant: str, seed: int) -> None:
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline

    components = _build_components(variant, seed)
    pipe_class = QwenImageEditPipeline if arch == "qwen_image_edit" else QwenImageEditPlusPipeline
    pipe = pipe_class(**components)
    pipe.save_pretrained(workdir, safe_serialization=True)
    # Name the class the real folders name (our subclass only exists to load without torchvision).
    index_path = workdir / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


ARCHS = ("qwen_image_edit_plus", "qwen_image_edit")


def build_tiny_qwen_pipeline(out_dir: str | Path, arch: str = "qwen_image_edit_plus", variant: str = "2509",
                             seed: int = 0, overwrite: bool = False) -> Path:
    """Build (or reuse) a random-weight Qwen-Image-Edit(-Plus) folder; returns its absolute path."""
    if arch not in ARCHS:
        raise UserError(f"unknown Qwen arch {arch!r}; choose one of {list(ARCHS)}")
    if variant not in VARIANTS:
        raise UserError(f"unknown variant {variant!r}; choose one of {list(VARIANTS)}")
    marker = {"format_version": FORMAT_VERSION, "arch": arch, "variant": variant, "seed": seed}
    return install_atomically(out_dir, MARKER_NAME, marker, overwrite,
                              lambda tmp: _write_pipeline(tmp, arch, variant, seed))
