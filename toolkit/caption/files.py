"""Which images a caption process captions: every image (with pairs: every target with its control images) whose
caption file is missing or empty, or every one with recaption."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from toolkit.errors import ConfigError

__all__ = ["CaptionItem", "Found", "caption_file", "find_items", "has_caption"]


@dataclass(frozen=True)
class CaptionItem:
    """One caption to write: the image described (with pairs the target), its control images in the order the
    model sees them, and the caption file."""

    image: Path
    controls: tuple[Path, ...]
    caption_file: Path


@dataclass(frozen=True)
class Found:
    """Every image found, split into those to caption and those already captioned (skipped)."""

    todo: list[CaptionItem]
    skipped: list[Path]


def caption_file(image: Path, extension: str) -> Path:
    return image.with_name(f"{image.stem}.{extension}")


def has_caption(path: Path) -> bool:
    """A caption file with text in it (an empty or whitespace-only file counts as missing)."""
    try:
        return bool(path.read_text(encoding="utf-8", errors="replace").strip())
    except FileNotFoundError:
        return False


def _is_image(path: Path, extensions: Sequence[str]) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower().lstrip(".") in extensions


def _images(folder: Path, extensions: Sequence[str], recursive: bool) -> list[Path]:
    if not recursive:
        return sorted(p for p in folder.iterdir() if _is_image(p, extensions))
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "_controls")
        found += [Path(root) / f for f in files if _is_image(Path(root) / f, extensions)]
    return sorted(found)


def _folder(raw: str, key: str) -> Path:
    folder = Path(raw)
    if not folder.is_dir():
        raise ConfigError(f"{key}: {raw} is not a folder")
    return folder


def _by_stem(images: Sequence[Path], key: str) -> dict[str, Path]:
    by_stem: dict[str, Path] = {}
    for image in images:
        if image.stem in by_stem:
            raise ConfigError(f"{key}: {by_stem[image.stem].name} and {image.name} share the name {image.stem!r}; "
                              "keep one image per name")
        by_stem[image.stem] = image
    return by_stem


def find_items(path_to_caption: str, control_paths: Sequence[str], extensions: Sequence[str], caption_ext: str,
               recaption: bool, key: str = "caption") -> Found:
    """Targets of ``path_to_caption`` (not its subfolders) with one control per folder of ``control_paths``, or,
    without control folders, every image under ``path_to_caption`` (subfolders too, hidden ones and ai-toolkit's
    ``_controls`` skipped). A target missing from a control folder is an error naming both."""
    folder = _folder(path_to_caption, f"{key}.path_to_caption")
    controls = [_by_stem(_images(_folder(raw, f"{key}.control_path"), extensions, False), f"{key}.control_path")
                for raw in control_paths]
    images = _images(folder, extensions, recursive=not control_paths)
    if not images:
        raise ConfigError(f"{key}.path_to_caption: no {'/'.join(extensions)} images in {folder}")
    missing = [f"{image}: no control image named '{image.stem}.*' in {raw}"
               for image in images for raw, by_stem in zip(control_paths, controls) if image.stem not in by_stem]
    if missing:
        raise ConfigError(f"{len(missing)} target(s) without a control image:\n  " + "\n  ".join(missing[:20]))
    todo, skipped = [], []
    for image in images:
        item = CaptionItem(image, tuple(by_stem[image.stem] for by_stem in controls), caption_file(image, caption_ext))
        if has_caption(item.caption_file) and not recaption:
            skipped.append(image)
        else:
            todo.append(item)
    return Found(todo, skipped)
