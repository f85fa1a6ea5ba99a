"""Sample prompts with ai-toolkit's inline flags, and the contact sheet of a sampling round.

A prompt is `text [--ctrl_img PATH [--ctrl_img PATH2 ...]] [--seed N] [--w N] [--h N] [--cfg F] [--steps N]`. A
flag's value runs to the next flag, so paths with spaces work without quoting. Several `--ctrl_img` give the model
several control images, in order (for a LoRA trained with a list of control folders); none renders text-to-image (as
datasets without control_path train); other repeated flags: the last one counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image, ImageDraw, ImageOps

from toolkit.errors import ConfigError, UserError

_FLAG = re.compile(r"(?:^|\s)--(ctrl_img|seed|w|h|cfg|steps|neg)(?=\s|$)")
_INT_FLAGS = {"seed", "w", "h", "steps"}


@dataclass(frozen=True)
class SampleRequest:
    """One image to render: the prompt text and everything the sampler needs."""

    index: int
    prompt: str
    ctrl_img: Optional[Path]  # None: no --ctrl_img, a text-to-image sample
    seed: int
    width: int
    height: int
    guidance_scale: float
    steps: int
    extra_ctrl_imgs: tuple[Path, ...] = ()  # the 2nd, 3rd ... --ctrl_img

    @property
    def ctrl_imgs(self) -> tuple[Path, ...]:
        """Every control image, in the order the model sees them (position-id frames 1, 2, ...); () for none."""
        return () if self.ctrl_img is None else (self.ctrl_img, *self.extra_ctrl_imgs)


def parse_prompt_flag_lists(text: str) -> tuple[str, dict[str, list[str]]]:
    """Split `text --flag value ...` into the prompt and every value of each flag, in order; unknown `--words` stay
    in the prompt."""
    matches = list(_FLAG.finditer(text))
    if not matches:
        return text.strip(), {}
    prompt = text[: matches[0].start()].strip()
    flags: dict[str, list[str]] = {}
    for m, nxt in zip(matches, matches[1:] + [None]):
        end = nxt.start() if nxt is not None else len(text)
        flags.setdefault(m.group(1), []).append(text[m.end():end].strip())
    return prompt, flags


def parse_prompt_flags(text: str) -> tuple[str, dict[str, str]]:
    """Split `text --flag value ...` into the prompt and its flags (the last value of a repeated flag)."""
    prompt, flags = parse_prompt_flag_lists(text)
    return prompt, {name: values[-1] for name, values in flags.items()}


def build_requests(prompts: Sequence[str], *, seed: int, walk_seed: bool, width: int, height: int,
                   guidance_scale: float, steps: int, key_path: str = "sample.prompts",
                   keep_aspect: bool = True) -> list[SampleRequest]:
    """Resolve every prompt's flags against the sample defaults; problems name the prompt's key path. A prompt
    without --w/--h follows its (first) control image's aspect ratio at width x height pixels (`keep_aspect`)."""
    requests, problems = [], []
    for i, raw in enumerate(prompts):
        prompt, all_flags = parse_prompt_flag_lists(raw)
        flags = {name: values[-1] for name, values in all_flags.items()}
        where = f"{key_path}[{i}]"
        try:
            values = {k: (int(v) if k in _INT_FLAGS else v) for k, v in flags.items() if k not in ("ctrl_img", "neg")}
            cfg = float(values.get("cfg", guidance_scale))
        except ValueError as exc:
            problems.append(f"{where}: bad flag value ({exc})")
            continue
        ctrls = all_flags.get("ctrl_img", [])
        if not all(ctrls):
            problems.append(f"{where}: --ctrl_img needs a PATH (the image Kontext edits; repeat it for several)")
            continue
        ctrl_paths = [Path(ctrl).expanduser() for ctrl in ctrls]
        missing = [path for path in ctrl_paths if not path.is_file()]
        if missing:
            problems.extend(f"{where}: --ctrl_img {path} does not exist" for path in missing)
            continue
        w, h = int(values.get("w", width)), int(values.get("h", height))
        if keep_aspect and ctrl_paths and "w" not in values and "h" not in values:  # the control's shape, same area
            from toolkit.data.images import read_image_size  # local: keeps this module light to import

            try:
                w, h = fit_to_area(*read_image_size(ctrl_paths[0]), width * height)
            except UserError as exc:
                problems.append(f"{where}: --ctrl_img {ctrl_paths[0]}: {exc}")
                continue
        if w % 16 or h % 16:
            problems.append(f"{where}: --w/--h must be multiples of 16, got {w}x{h}")
            continue
        requests.append(SampleRequest(index=i, prompt=prompt, ctrl_img=ctrl_paths[0] if ctrl_paths else None,
                                      seed=int(values.get("seed", seed + i if walk_seed else seed)),
                                      width=w, height=h, guidance_scale=cfg, steps=int(values.get("steps", steps)),
                                      extra_ctrl_imgs=tuple(ctrl_paths[1:])))
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



def load_controls(request: SampleRequest, loader=None) -> list[Image.Image]:
    """Every control image of a request, each resized like `load_control` (one image per --ctrl_img)."""
    return [load_control(path, request.width, request.height, loader) for path in request.ctrl_imgs]
