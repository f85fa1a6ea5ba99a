"""Build a random-weight FLUX.2 [dev] pipeline folder (diffusers' Flux2Pipeline) offline, byte-identically per seed.

Every component is made from config: a tiny Flux2Transformer2DModel, AutoencoderKLFlux2, a
Mistral3ForConditionalGeneration (Mistral text model + Pixtral vision tower) and a Mistral-style ("tekken") byte-level
BPE learned here from the shared corpus plus FLUX.2's system message, with a chat template in Mistral Small 3.1's
format.

Choices that keep the tiny model faithful to the real one:
- Flux2Pipeline stacks the text encoder's hidden states 10, 20 and 30 (`text_encoder_out_layers`), so the tiny
  text model has 30 layers: the real defaults work unchanged, and the transformer's joint_attention_dim is
  3 x the text hidden size, as 15360 = 3 x 5120 in the real model.
- Latents have FLUX.2's 32 channels (128 after the 2x2 patchify the transformer sees), the VAE keeps the real
  scale factor 8, and its BatchNorm statistics (which the pipeline uses to normalise latents) are random rather
  than the identity mean 0 / var 1, so code that forgets them gives a different result.
- The special tokens carry the real ids (`<unk>` 0, `<s>` 1, `</s>` 2, `[INST]` 3, `[/INST]` 4, `[IMG]` 10,
  `<pad>` 11, `[SYSTEM_PROMPT]` 17 ...), and the chat template renders a conversation as Mistral Small 3.1 does:
  `<s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]`.

Trap: transformers 5.23's PixtralProcessor needs torchvision, which does not import beside our CPU torch. The
pipeline only applies the chat template to text (the prompt upsampler is the one path that needs images), so the
`tokenizer` component here is the plain tokenizer (model_index names `PreTrainedTokenizerFast`, the runtime class
of transformers 5); its folder also holds the Pixtral processor files, so `AutoProcessor` loads the real class
wherever torchvision is installed. The real FLUX.2-dev folder names `PixtralProcessor`: loading it without
torchvision needs `tokenizer=AutoTokenizer.from_pretrained(path, subfolder="tokenizer")`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from toolkit.errors import UserError
from tools.tiny_common import byte_level_words, corpus_lines, install_atomically, learn_bpe_merges

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MARKER_NAME = "tiny_model_build.json"

# tekken's first special tokens, in id order (the real vocabulary has 1000 reserved slots; we keep these).
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                  "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
                  "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                  "[TOOL_CONTENT]")
# tekken's pre-tokenizer split (as in the HF conversion of Mistral's tekken.json).
_TEKKEN_SPLIT = (r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"""
                 r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"""
                 r""" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# Mistral Small 3.1's conversation format; message content may be a string or a list of text/image blocks
# (Flux2Pipeline passes lists). Written for this builder, the rendered text is what the real template renders.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for block in content -%}"
    "{%- if block['type'] == 'text' -%}{{- block['text'] -}}"
    "{%- elif block['type'] in ['image', 'image_url'] -%}{{- '[IMG]' -}}"
    "{%- else -%}{{- raise_exception('only text and image blocks are supported') -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- '[SYSTEM_PROMPT]' + render(message['content']) + '[/SYSTEM_PROMPT]' -}}"
    "{%- elif message['role'] == 'user' -%}{{- '[INST]' + render(message['content']) + '[/INST]' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- render(message['content']) + eos_token -}}"
    "{%- else -%}{{- raise_exception('only system, user and assistant roles are supported') -}}{%- endif -%}"
    "{%- endfor -%}"
)

SHAPES: dict[str, dict[str, Any]] = {
    # head_dim 16 = sum(axes_dims_rope) (four rope axes: time, height, width, layer); joint = 3 x text hidden.
    "transformer": {"num_layers": 1, "num_single_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16,
                    "joint_attention_dim": 96, "axes_dims_rope": (4, 4, 4, 4), "timestep_guidance_channels": 256},
    # Four blocks keep the real scale factor 8; 32 latent channels as FLUX.2's autoencoder.
    "vae": {"block_out_channels": (16, 16, 16, 16), "layers_per_block": 1, "norm_num_groups": 8,
            "latent_channels": 32},
    # 30 layers: hidden state 30 is the deepest the pipeline reads.
    "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 30, "num_attention_heads": 2,
             "num_key_value_heads": 1, "head_dim": 16},
    # Real tower: patch 14, spatial merge 2 (one text token per 28x28 pixels).
    "vision": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
               "head_dim": 8, "patch_size": 14, "image_size": 1540},
}
SPATIAL_MERGE_SIZE = 2
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
    "base_image_seq_len": 256, "max_image_seq_len": 4096,
}


def _system_message() -> str:
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    return SYSTEM_MESSAGE


def _pretokens() -> Counter[tuple[str, ...]]:
    """Corpus + system message split as tekken splits them, as byte-level symbol tuples."""
    # The system message twice: each of its words occurs at least twice, so the merge loop learns it whole.
    return byte_level_words(corpus_lines() + [_system_message()] * 2, _TEKKEN_SPLIT, nfc=False)



def learn_merges(max_merges: int = 2000) -> list[tuple[str, str]]:
    """Deterministic BPE merges (tools.tiny_common.learn_bpe_merges)."""
    return learn_bpe_merges(_pretokens(), max_merges)


def build_tokenizer() -> Any:
    """A byte-level BPE tokenizer with tekken's special tokens first, then the 256 bytes, then the merges."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    merges = learn_merges()
    vocab: dict[str, int] = {}
    for token in list(SPECIAL_TOKENS) + sorted(pre_tokenizers.ByteLevel.alphabet()) + [a + b for a, b in merges]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_TEKKEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=131072, chat_template=CHAT_TEMPLATE)


def _text_encoder_config(tokenizer: Any) -> Any:
    from transformers import Mistral3Config

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    text = dict(SHAPES["text"], model_type="mistral", vocab_size=len(tokenizer), max_position_embeddings=1024,
                rms_norm_eps=1e-5, rope_theta=1000000000.0, sliding_window=None, **ids)
    vision = dict(SHAPES["vision"], model_type="pixtral", num_channels=3, rope_theta=10000.0)
    return Mistral3Config(text_config=text, vision_config=vision, image_token_index=tokenizer.convert_tokens_to_ids(
        "[IMG]"), spatial_merge_size=SPATIAL_MERGE_SIZE, vision_feature_layer=-1, multimodal_projector_bias=False,
        projector_hidden_act="gelu", tie_word_embeddings=False, **ids)


def _vae(seed: int) -> Any:
    import torch
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                             up_block_types=("UpDecoderBlock2D",) * 4, **SHAPES["vae"])
    # Latent statistics the pipeline normalises with; non-trivial so that skipping them shows.
    channels = vae.bn.running_mean.numel()
    generator = torch.Generator().manual_seed(seed * 1000 + 20)
    vae.bn.running_mean.copy_(0.1 * torch.randn(channels, generator=generator))
    vae.bn.running_var.copy_(0.5 + torch.rand(channels, generator=generator))
    return vae


def build_components(seed: int = 0) -> dict[str, Any]:
    """Every Flux2Pipeline component; each random module gets its own seed so one shape change leaves the others."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Mistral3ForConditionalGeneration

    def seeded(offset: int, make: Callable[[], Any]) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + offset)
            return make().eval()

    tokenizer = build_tokenizer()
    in_channels = SHAPES["vae"]["latent_channels"] * 4
    return {
        "transformer": seeded(1, lambda: Flux2Transformer2DModel(
            patch_size=1, in_channels=in_channels, guidance_embeds=True, **SHAPES["transformer"])),
        "vae": seeded(2, lambda: _vae(seed)),
        "text_encoder": seeded(3, lambda: Mistral3ForConditionalGeneration(_text_encoder_config(tokenizer))),
        "tokenizer": tokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
    }


def _write_processor_files(folder: Path) -> None:
    """The Pixtral image-processor and processor configs the real tokenizer/ folder holds (for AutoProcessor)."""
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    patch = SHAPES["vision"]["patch_size"]
    PixtralImageProcessorPil(patch_size={"height": patch, "width": patch},
                             size={"longest_edge": SHAPES["vision"]["image_size"]}).save_pretrained(folder)
    processor = {"processor_class": "PixtralProcessor", "patch_size": patch, "spatial_merge_size": SPATIAL_MERGE_SIZE,
                 "image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}
    (folder / "processor_config.json").write_text(json.dumps(processor, indent=2, sort_keys=True) + "\n",
                                                  encoding="utf-8")


def _write_pipeline(workdir: Path, seed: int) -> None:
    from diffusers import Flux2Pipeline

    Flux2Pipeline(**build_components(seed)).save_pretrained(workdir, safe_serialization=True)
    _write_processor_files(workdir / "tokenizer")
    index_path = workdir / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    index["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_tiny_flux2_dev_pipeline(out_dir: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Build (or reuse) a random-weight FLUX.2 [dev] folder for Flux2Pipeline; returns its absolute path."""
    if seed < 0:
        raise UserError(f"seed must be >= 0, got {seed}")
    marker = {"format_version": FORMAT_VERSION, "arch": "flux2", "seed": seed}
    return install_atomically(out_dir, MARKER_NAME, marker, overwrite, lambda tmp: _write_pipeline(tmp, seed))
