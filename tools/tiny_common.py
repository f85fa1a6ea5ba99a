"""What every tiny-model builder shares: the small text corpus its tokenizers learn from, and the atomic install.

Kept apart from the builders so each architecture's builder (tools.tiny_model for FLUX Kontext, tools.tiny_qwen for
Qwen-Image-Edit) can use them without importing the other.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from collections import Counter
from typing import Any, Callable

from toolkit.errors import UserError

logger = logging.getLogger(__name__)

# Shared by every tiny tokenizer; covers lower/upper case letters, digits and common punctuation so that
# ordinary English prompts rarely hit the unknown token.
CORPUS = """\
Make it red. Make the sky blue and the grass green. Turn the car yellow, the house white and the door black.
Invert the colors of the image. Invert the colours of this photo, please. Change the background to a sunset.
Add a small red hat to the cat. Remove the dog from the picture. Replace the apple with an orange.
Put a blue umbrella in the girl's hand. Give the man a beard and glasses. Make the woman smile.
Convert the photo into a pencil sketch. Make it look like a watercolor painting. Turn the scene into night.
Add snow on the roof, rain on the street and fog over the river. Make the lighting warm and golden.
The circle is purple, the square is pink, the triangle is brown, the rectangle is gray and the ellipse is cyan.
Draw a large green tree next to the small stone bridge. Move the chair to the left side of the table.
Zoom out and show the whole city. Crop the edges. Make the image brighter, darker, sharper or softer.
Keep the face the same but change the shirt to orange. Keep the pose; change only the hair color to silver.
A red ball, a blue box, a yellow cup, a green bottle, a white plate and a black phone lie on the desk.
Replace the text on the sign with "OPEN". Write HELLO in big letters. Add the number 42 to the jersey.
Colors: red, orange, yellow, green, blue, indigo, violet, magenta, teal, gold, beige, navy, olive, maroon.
Objects: cat, dog, bird, horse, car, bus, bicycle, boat, tree, flower, house, bridge, mountain, lake, cloud.
Swap day for night. Restore the old photograph. Remove the scratches, noise and blur. Colorize it.
Place 3 birds on the wire and 2 boats on the lake; 1 sun, 10 stars, 5 clouds, 7 apples, 8 pears, 9 plums.
Make the shapes bigger. Rotate the picture 90 degrees. Mirror the image horizontally? Flip it vertically!
Quickly jump over the lazy fox: qu, x, z, j, k, v, w. ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789.
Style of an oil painting, a comic book, pixel art, a 3D render, a charcoal drawing or a vintage postcard.
Edit: make the walls light blue (not dark blue) & the floor wooden; add a rug + a lamp - nothing else.
"""


def corpus_lines() -> list[str]:
    return [line for line in CORPUS.splitlines() if line.strip()]


# Qwen2's pre-tokenizer split (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX), used by the tiny
# Qwen2.5-VL and Qwen3 tokenizers.
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
              r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def byte_level_words(lines: list[str], split_regex: str, nfc: bool = True) -> Counter:
    """`lines` cut by `split_regex` (each match its own word) into byte-level symbol tuples, counted: the input of
    learn_bpe_merges for a GPT-2-style byte-level BPE. `nfc`: NFC-normalise each line first, as Qwen's
    tokenizers do."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    split = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split_regex), behavior="isolated"),
                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    words: Counter = Counter()
    for line in lines:
        for word, _ in split.pre_tokenize_str(normalizers.NFC().normalize_str(line) if nfc else line):
            words[tuple(word)] += 1
    return words


def learn_bpe_merges(words: Counter, max_merges: int) -> list[tuple[str, str]]:
    """Byte-pair merges learned from `words` (symbol tuple -> count): the most frequent pair first, ties broken by
    the pair's text, until `max_merges` or no pair occurs twice. `tokenizers.trainers.BpeTrainer` breaks ties by
    hash-map order, so its merges differ from one process to the next; this loop is deterministic and trivial for
    the small corpora of the tiny models."""
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        if pairs[best] < 2:
            break
        merges.append(best)
        words = Counter({_merge_pair(symbols, best): count for symbols, count in words.items()})
    return merges


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if symbols[i:i + 2] == pair:
            merged.append(pair[0] + pair[1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


def _read_marker(folder: Path, marker_name: str) -> dict[str, Any] | None:
    try:
        return json.loads((folder / marker_name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def install_atomically(
    out_dir: str | Path, marker_name: str, marker: dict[str, Any], overwrite: bool, write: Callable[[Path], None]
) -> Path:
    """Run write(tmp) in a sibling folder, add the marker, then rename it to out_dir.

    Readers never see a half-built folder, and the marker (written last) tells a later call that the build is
    complete and which build it is, so it is reused. Anything else already at out_dir is only replaced with
    overwrite=True (or when it is an empty folder), so a typo in --out cannot delete someone's data.
    """
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not overwrite:
        if _read_marker(out_dir, marker_name) == marker:
            logger.info("reusing complete build at %s", out_dir)
            return out_dir
        if any(out_dir.iterdir()):
            raise UserError(f"{out_dir} exists and is not a build of {marker}; pass --overwrite to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write(tmp)
        (tmp / marker_name).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if out_dir.exists():
            out_dir.rename(old)
        try:
            tmp.rename(out_dir)
        except OSError:
            # Another process finished the same build between our check and our rename: theirs is as good.
            if _read_marker(out_dir, marker_name) != marker:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out_dir
