"""Sample prompts with ai-toolkit's inline flags, and the contact sheet of a sampling round.

A prompt is `text --ctrl_img PATH [--seed N] [--w N] [--h N] [--cfg F] [--steps N]`. A flag's value runs to the
next flag, so paths with spaces work without quoting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image, ImageDraw, ImageOps

from toolkit.errors import ConfigError

_FLAG = re.compile(r"(?:^|\s)--(ctrl_img|seed|w|h|cfg|steps|neg)(?=\s|$)")
_INT_FLAGS = {"seed", "w", "h", "steps"}


@dataclass(frozen=True)
class SampleRequest:
    """One image to render: the prompt text and everything the sampler needs."""

    index: int
    prompt: str
    ctrl_img: Path
    seed: int
    width: int
    height: int
    guidance_scale: float
    steps: int


def parse_prompt_flags(text: str) -> tuple[str, dict[str, str]]:
    """Split `text --flag value ...` into the prompt and its flags; unknown `--words` stay in the prompt."""
    matches = list(_FLAG.finditer(text))
    if not matches:
        return text.strip(), {}
    prompt = text[: matches[0].start()].strip()
    flags: dict[str, str] = {}
    for m, nxt in zip(matches, matches[1:] + [None]):
        end = nxt.start() if nxt is not None else len(text)
        flags[m.group(1)] = text[m.end():end].strip()
    return prompt, flags


def build_requests(prompts: Sequence[str], *, seed: int, walk_seed: bool, width: int, height: int,
                   guidance_scale: float, steps: int, key_path: str = "sample.prompts") -> list[SampleRequest]:
    """Resolve every prompt's flags against the sample defaults; problems name the prompt's key path."""
    requests, problems = [], []
    for i, raw in enumerate(prompts):
        prompt, flags = parse_prompt_flags(raw)
        where = f"{key_path}[{i}]"
        try:
            values = {k: (int(v) if k in _INT_FLAGS else v) for k, v in flags.items() if k not in ("ctrl_img", "neg")}
            cfg = float(values.get("cfg", guidance_scale))
        except ValueError as exc:
            problems.append(f"{where}: bad flag value ({exc})")
            continue
        ctrl = flags.get("ctrl_img")
        if not ctrl:
            problems.append(f"{where}: needs --ctrl_img PATH (the image Kontext edits)")
            continue
        ctrl_path = Path(ctrl).expanduser()
        if not ctrl_path.is_file():
            problems.append(f"{where}: --ctrl_img {ctrl_path} does not exist")
            continue
        w, h = int(values.get("w", width)), int(values.get("h", height))
        if w % 16 or h % 16:
            problems.append(f"{where}: --w/--h must be multiples of 16, got {w}x{h}")
            continue
        requests.append(SampleRequest(index=i, prompt=prompt, ctrl_img=ctrl_path,
                                      seed=int(values.get("seed", seed + i if walk_seed else seed)),
                                      width=w, height=h, guidance_scale=cfg, steps=int(values.get("steps", steps))))
    if problems:
        raise ConfigError("sample prompts have problems:\n  " + "\n  ".join(problems))
    return requests


def sample_file_name(step: int, index: int) -> str:
    return f"{step:09d}_{index:02d}.png"


def contact_sheet(rows: Sequence[tuple], max_cell: int = 256, min_cell: int = 128, caption_height: int = 20,
                  column_titles: Optional[Sequence[str]] = None) -> Image.Image:
    """One row per prompt: its images side by side (control | sample | ...), each scaled to fit a square cell, with
    the row's caption (its last element) underneath; `column_titles` add a header line.

    Size: (columns * cell) x (header + rows * (cell + caption_height)), header = caption_height with titles, else 0.
    The cell follows the images' size within [min_cell, max_cell], so 64 px samples are enlarged, 1024 px shrunk.
    """
    columns = max((len(row) - 1 for row in rows), default=2)
    largest = max((max(img.size) for row in rows for img in row[:-1]), default=min_cell)
    cell = max(min_cell, min(max_cell, largest))
    header = caption_height if column_titles else 0
    sheet = Image.new("RGB", (columns * cell, header + max(1, len(rows)) * (cell + caption_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(column_titles or ()):
        draw.text((c * cell + 4, 4), str(title)[: cell // 7], fill="black")
    for r, (*images, caption) in enumerate(rows):
        top = header + r * (cell + caption_height)
        for c, img in enumerate(images):
            thumb = ImageOps.contain(img.convert("RGB"), (cell, cell), Image.NEAREST)
            sheet.paste(thumb, (c * cell + (cell - thumb.width) // 2, top + (cell - thumb.height) // 2))
        draw.text((4, top + cell + 4), caption[: max(80, columns * cell // 7)], fill="black")
    return sheet


def fit_to_area(width: int, height: int, area: int, step: int = 16) -> tuple[int, int]:
    """A size with the image's aspect ratio and about `area` pixels, sides multiples of `step`."""
    scale = (area / float(width * height)) ** 0.5
    return max(step, int(width * scale) // step * step), max(step, int(height * scale) // step * step)


def load_control(path: Path, width: int, height: int, loader=None) -> Image.Image:
    """The control image, resized to the sample's pixel area keeping its aspect ratio (as during training)."""
    from toolkit.data.images import load_rgb  # local: keeps this module importable without the data package

    img = (loader or load_rgb)(path)
    w, h = fit_to_area(img.width, img.height, width * height)
    return img.resize((w, h), Image.LANCZOS)

