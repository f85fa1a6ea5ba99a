"""Caption files and the per-sample caption transforms (trigger word, token dropout and shuffle, dropout).

``prepare_caption`` takes its randomness from the ``random.Random`` it is given, so the dataset can derive one from
(seed, epoch, index): every rank and a resumed run then see exactly the same caption for the same sample.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Optional, Union

from toolkit.errors import DatasetError

TRIGGER_PLACEHOLDER = "[trigger]"


def read_caption(path: Union[str, Path]) -> str:
    """Caption text of a file, whitespace stripped. UTF-8 (with or without BOM) only.

    Other encodings are refused rather than guessed: a mis-decoded caption trains silently wrong text.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DatasetError(f"{path}: cannot read caption file ({err.strerror or err})") from err
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        hint = " (it looks like UTF-16)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise DatasetError(
            f"{path}: caption is not UTF-8 text{hint} (invalid byte 0x{data[err.start]:02x} at offset {err.start}); "
            "re-save the file as UTF-8"
        ) from err
    return text.strip()


def caption_lines(text: str) -> list[str]:
    """The captions of one caption file: each non-empty line is one (several instructions for one pair); a file of
    one line, or an empty one, gives exactly its text."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines if len(lines) > 1 else [text.strip()]


def line_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The RNG that picks item `index`'s caption line in `epoch`: string seeding is the same in every process and
    run, so every rank and a resumed run pick the same line; apart from the caption RNG, so a one-line file draws
    nothing and its dropout and shuffling are what they were."""
    return random.Random(f"caption-line:{seed}:{epoch}:{index}")


def pick_line(text: str, rng: random.Random) -> str:
    """One caption of a possibly several-line caption file (see caption_lines); draws only with two or more."""
    lines = caption_lines(text)
    return lines[0] if len(lines) == 1 else rng.choice(lines)


def _tidy(caption: str) -> str:
    """Remove the empty comma parts and double spaces left where a placeholder was deleted."""
    parts = [" ".join(part.split()) for part in caption.split(",")]
    return ", ".join(part for part in parts if part)


def _contains_word(text: str, word: str) -> bool:
    """Whole-word match, so trigger 'ohwx' is not taken as present in 'ohwxyz'."""
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text) is not None


def apply_trigger(caption: str, trigger_word: Optional[str], add_if_absent: bool = True) -> str:
    """Replace ``[trigger]`` with the trigger word (or delete it) and, with `add_if_absent`, prepend the word when
    it is absent (ai-toolkit does not add it to regularisation captions)."""
    if TRIGGER_PLACEHOLDER in caption:
        caption = _tidy(caption.replace(TRIGGER_PLACEHOLDER, trigger_word or ""))
    if add_if_absent and trigger_word and not _contains_word(caption, trigger_word):
        caption = f"{trigger_word}, {caption}" if caption else trigger_word
    return caption


def shuffle_parts(caption: str, rng: random.Random) -> str:
    """Shuffle comma-separated parts, keeping the first part (the trigger word when one is set) first."""
    parts = [part.strip() for part in caption.split(",") if part.strip()]
    if len(parts) <= 2:
        return ", ".join(parts)
    rest = parts[1:]
    rng.shuffle(rest)
    return ", ".join([parts[0], *rest])


def drop_parts(caption: str, rate: float, keep: int, rng: random.Random) -> str:
    """ai-toolkit's token dropout: each comma-separated part after the first `keep` is dropped with probability
    `rate` (rate 1 drops them all without drawing)."""
    parts = [part.strip() for part in caption.split(",")]
    kept = [part for k, part in enumerate(parts) if k < keep or (rate < 1.0 and rng.random() >= rate)]
    return ", ".join(part for part in kept if part)


def prepare_caption(
    raw: str,
    trigger_word: Optional[str],
    shuffle_tokens: bool,
    dropout_rate: float,
    rng: random.Random,
    token_dropout_rate: float = 0.0,
    keep_tokens: int = 0,
    add_trigger: bool = True,
) -> str:
    """The caption a training step sees. Pure given ``rng``.

    Dropout (empty caption with probability ``dropout_rate``) is drawn first, and only when the rate is positive,
    so the same rng state gives the same caption whatever the other options are. Token dropout acts on the raw
    caption's parts before the trigger word is applied, so the trigger word is never dropped (as ai-toolkit).
    """
    if not 0.0 <= dropout_rate <= 1.0:
        raise ValueError(f"caption dropout rate must be in [0, 1], got {dropout_rate}")
    if dropout_rate > 0.0 and rng.random() < dropout_rate:
        return ""
    raw = raw.strip()
    if token_dropout_rate > 0.0:
        raw = drop_parts(raw, token_dropout_rate, keep_tokens, rng)
    caption = apply_trigger(raw, trigger_word, add_if_absent=add_trigger)
    if shuffle_tokens:
        caption = shuffle_parts(caption, rng)
    return caption
