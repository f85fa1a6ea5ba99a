"""Build a random-weight FLUX.1 Kontext pipeline folder offline, byte-identically on every rebuild.

Tests, examples and the CPU benchmark need a real diffusers-format folder that `FluxKontextPipeline.from_pretrained`
loads, but no model hub is reachable and the real weights are 24 GB. Every part is built from config: random weights
from fixed seeds, a CLIP byte-level BPE (words split by `tokenizers` exactly as CLIPTokenizer splits them) and a T5
sentencepiece unigram model, both learned from the small corpus below.

Traps met (transformers 5.23 / diffusers 0.42.1):
- transformers 5 has no separate fast tokenizer classes: `T5TokenizerFast` is an alias of `T5Tokenizer` (tokenizers
  backend) and `save_pretrained` writes only tokenizer.json + tokenizer_config.json, never vocab.json / merges.txt /
  spiece.model. We write those source files ourselves so the folder also loads with the older slow classes.
- model_index.json would name the class `T5Tokenizer` (the runtime type); we name `T5TokenizerFast` as the real
  FLUX.1-Kontext-dev folder does, which resolves to the same class in transformers 5.
- `tokenizers.trainers.BpeTrainer` is not reproducible across processes (ties follow hash-map order), so the CLIP
  merges are learned by a small deterministic loop instead. SentencePiece is reproducible with num_threads=1.
- CLIP pools at the first `eos_token_id`; the config must carry the tokenizer's ids (the default 2 means "argmax").
- FluxKontextPipeline.__call__ rescales height/width to `max_area` (default 1024**2) keeping the aspect ratio:
  pass max_area=height*width (and _auto_resize=False for the control image) to really generate at 64x64.
- diffusers 0.42 deprecates `from_pretrained(torch_dtype=...)` (FutureWarning): use `dtype=`.

torch, diffusers and transformers are imported inside the functions that need them, so `--help` and the
lightweight `install_atomically` (reused by tools.demo_data) do not pay seconds of imports.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from toolkit.errors import UserError
from tools.tiny_common import corpus_lines, install_atomically, learn_bpe_merges
from tools.tiny_flux2_dev import build_tiny_flux2_dev_pipeline
from tools.tiny_qwen import VARIANTS, build_tiny_qwen_pipeline

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MARKER_NAME = "tiny_model_build.json"

_TINY_VAE: dict[str, Any] = {
    # Four blocks keep FLUX's real VAE scale factor 8; 16 latent channels pack 2x2 into 64 transformer channels.
    "block_out_channels": (16, 16, 16, 16),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "latent_channels": 16,
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "transformer": {
            "num_layers": 1, "num_single_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16,
            "joint_attention_dim": 32, "pooled_projection_dim": 32, "axes_dims_rope": (4, 6, 6),
        },
        "clip": {
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "projection_dim": 32,
        },
        "t5": {"d_model": 32, "d_ff": 64, "d_kv": 8, "num_layers": 2, "num_heads": 4},
        "vae": _TINY_VAE,
    },
    "medium": {
        "transformer": {
            "num_layers": 2, "num_single_layers": 4, "num_attention_heads": 6, "attention_head_dim": 128,
            "joint_attention_dim": 512, "pooled_projection_dim": 256, "axes_dims_rope": (16, 56, 56),
        },
        "clip": {
            "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 4,
            "projection_dim": 256,
        },
        "t5": {"d_model": 512, "d_ff": 1024, "d_kv": 64, "num_layers": 2, "num_heads": 8},
        "vae": _TINY_VAE,
    },
    # FLUX.1's real text shapes from small encoders (T5 sequence 4096 wide, CLIP pooled 768): tools.gpu_check caches
    # their embeddings and swaps in a random transformer of the real size; this folder's own transformer is small.
    "kontext-shapes": {
        "transformer": {
            "num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2, "attention_head_dim": 32,
            "joint_attention_dim": 4096, "pooled_projection_dim": 768, "axes_dims_rope": (8, 12, 12),
        },
        "clip": {
            "hidden_size": 768, "intermediate_size": 256, "num_hidden_layers": 1, "num_attention_heads": 4,
            "projection_dim": 768,  # FLUX pools CLIPTextModel's pooler_output: hidden_size wide
        },
        "t5": {"d_model": 4096, "d_ff": 64, "d_kv": 16, "num_layers": 1, "num_heads": 2},
        "vae": _TINY_VAE,
    },
}

_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_CLIP_BOS, _CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


def _clip_words() -> Counter[tuple[str, ...]]:
    """Corpus words split exactly as CLIPTokenizer splits them, as byte-level symbols with `</w>` on the last."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    words: Counter[tuple[str, ...]] = Counter()
    for line in corpus_lines():
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)):
            words[tuple(word[:-1]) + (word[-1] + "</w>",)] += 1
    return words


def _learn_clip_bpe_merges(num_merges: int) -> list[tuple[str, str]]:
    """Deterministic BPE merges of the CLIP corpus (tools.tiny_common.learn_bpe_merges)."""
    return learn_bpe_merges(_clip_words(), num_merges)


def write_clip_tokenizer_files(folder: Path, num_merges: int = 256) -> None:
    """Write vocab.json + merges.txt laid out like OpenAI CLIP's: bytes, bytes + `</w>`, merges, then BOS/EOS.

    Every byte exists with and without the word suffix, so any text encodes without an unknown token.
    """
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = _learn_clip_bpe_merges(num_merges)
    vocab: dict[str, int] = {}
    for token in alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges] + [_CLIP_BOS, _CLIP_EOS]:
        vocab.setdefault(token, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")


def train_t5_sentencepiece(vocab_size: int = 400) -> bytes:
    """Train a unigram sentencepiece model with T5's special ids (pad 0, eos 1, unk 2, no bos).

    One thread and no sampling keep the model bytes identical between runs; the soft vocab limit lets the small
    corpus decide the final size.
    """
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()), model_writer=buffer, model_type="unigram", vocab_size=vocab_size,
        hard_vocab_limit=False, character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        num_threads=1, minloglevel=2,
    )
    return buffer.getvalue()


def _build_tokenizers(workdir: Path) -> tuple[Any, Any]:
    """Return (CLIP tokenizer, T5 tokenizer) loaded through transformers from source files under workdir."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    write_clip_tokenizer_files(workdir / "tokenizer")
    clip = CLIPTokenizer.from_pretrained(workdir / "tokenizer", model_max_length=77)
    (workdir / "tokenizer_2").mkdir(parents=True, exist_ok=True)
    (workdir / "tokenizer_2" / "spiece.model").write_bytes(train_t5_sentencepiece())
    # extra_ids=0: no sentinel tokens, nothing in FLUX uses them and they would only inflate the vocab.
    t5 = T5TokenizerFast.from_pretrained(workdir / "tokenizer_2", model_max_length=512, extra_ids=0)
    return clip, t5


def _build_modules(shapes: dict[str, dict[str, Any]], clip_tok: Any, t5_tok: Any, seed: int) -> dict[str, Any]:
    """Instantiate all random-weight modules; each gets its own seed so one shape change leaves the others alone."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    def seeded(offset: int, make: Callable[[], Any]) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + offset)
            return make().eval()

    clip_config = CLIPTextConfig(
        vocab_size=len(clip_tok), max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id,
        **shapes["clip"],
    )
    t5_config = T5Config(
        vocab_size=len(t5_tok), feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
        pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id, decoder_start_token_id=0, **shapes["t5"],
    )
    vae_kwargs = dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False, **shapes["vae"],
    )
    return {
        "transformer": seeded(1, lambda: FluxTransformer2DModel(
            in_channels=64, patch_size=1, guidance_embeds=True, **shapes["transformer"])),
        "vae": seeded(2, lambda: AutoencoderKL(**vae_kwargs)),
        "text_encoder": seeded(3, lambda: CLIPTextModel(clip_config)),
        "text_encoder_2": seeded(4, lambda: T5EncoderModel(t5_config)),
        "tokenizer": clip_tok,
        "tokenizer_2": t5_tok,
        "scheduler": FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096,
        ),
    }


def _write_pipeline(workdir: Path, preset: str, seed: int) -> None:
    """Write every component of the pipeline into workdir (a fresh folder)."""
    from diffusers import FluxKontextPipeline

    clip_tok, t5_tok = _build_tokenizers(workdir)
    pipe = FluxKontextPipeline(**_build_modules(PRESETS[preset], clip_tok, t5_tok, seed))
    pipe.save_pretrained(workdir, safe_serialization=True)
    index_path = workdir / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    index["tokenizer_2"] = ["transformers", "T5TokenizerFast"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_tiny_pipeline(out_dir: str | Path, preset: str = "tiny", seed: int = 0, overwrite: bool = False) -> Path:
    """Build (or reuse) a random-weight FLUX Kontext folder of the given preset; returns its absolute path."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    marker = {"format_version": FORMAT_VERSION, "preset": preset, "seed": seed}
    return install_atomically(out_dir, MARKER_NAME, marker, overwrite, lambda tmp: _write_pipeline(tmp, preset, seed))


ARCHS = ("flux_kontext", "qwen_image_edit_plus", "qwen_image_edit", "flux2")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a random-weight pipeline folder offline (FLUX.1 Kontext by "
                                                 "default; Qwen-Image-Edit(-Plus) or FLUX.2 [dev] with --arch).")
    parser.add_argument("--out", required=True, type=Path, help="folder to write (created atomically)")
    parser.add_argument("--arch", default="flux_kontext", choices=ARCHS, help="which pipeline to build")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model shapes (flux_kontext)")
    parser.add_argument("--variant", default="2509", choices=VARIANTS,
                        help="Qwen-Image-Edit-Plus release whose transformer config to follow (2511: zero_cond_t)")
    parser.add_argument("--seed", default=0, type=int, help="weight seed; same seed gives byte-identical files")
    parser.add_argument("--overwrite", action="store_true", help="replace whatever is at --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.arch == "flux_kontext":
        path = build_tiny_pipeline(args.out, preset=args.preset, seed=args.seed, overwrite=args.overwrite)
    elif args.arch == "flux2":
        path = build_tiny_flux2_dev_pipeline(args.out, seed=args.seed, overwrite=args.overwrite)
    else:
        path = build_tiny_qwen_pipeline(args.out, arch=args.arch, variant=args.variant, seed=args.seed,
                                        overwrite=args.overwrite)
    logger.info("tiny %s pipeline ready at %s", args.arch, path)


if __name__ == "__main__":
    main()
